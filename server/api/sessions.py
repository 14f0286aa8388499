"""`/v1/sessions`: a caller's named sessions (those it sent with `session_id` or `X-Session-Id`).

- `GET /v1/sessions`: the caller's sessions, in this process's memory or saved in `--session-dir`;
- `POST /v1/sessions/{session_id}/save`: save the session's cached states now (400 without
  `--session-dir`; 404 when nothing of it is cached);
- `DELETE /v1/sessions/{session_id}`: forget it: its file and every state cached under it (404 if
  neither exists).

Keys own sessions: every call sees only the sessions of its own API key (the engine keys them by a
hash of it), so another key's session of the same id is simply not found.
"""

from __future__ import annotations

from typing import Literal

from fastapi import FastAPI, Request
from pydantic import BaseModel
from starlette.responses import JSONResponse, Response

from mcserve.server.api.middleware import API_KEY_SCOPE_KEY
from mcserve.server.api.serving import MAX_SESSION_ID_LEN, ServingContext
from mcserve.server.errors import InvalidRequestError


class SessionInfo(BaseModel):
    """One session. `tokens`: the tokens of its last saved turn (None if never saved); `saved_at`:
    Unix time of its file (None: not saved); `in_memory`: this process knows it."""

    id: str
    object: Literal["session"] = "session"
    in_memory: bool
    saved_at: float | None = None
    tokens: int | None = None


class SessionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SessionInfo]


class SessionSaved(BaseModel):
    """What a save wrote: `tokens` covered, `checkpoints` (whole segments) and whether the end-of-turn
    `snapshot` was still parked, the file's size in `bytes`."""

    id: str
    object: Literal["session.saved"] = "session.saved"
    tokens: int
    checkpoints: int
    snapshot: bool
    saved_at: float
    bytes: int


class SessionDeleted(BaseModel):
    id: str
    object: Literal["session.deleted"] = "session.deleted"
    deleted: Literal[True] = True


def _session_id(value: str) -> str:
    if not 1 <= len(value) <= MAX_SESSION_ID_LEN:
        raise InvalidRequestError(f"a session id has 1 to {MAX_SESSION_ID_LEN} characters, got {len(value)}",
                                  param="session_id", code="invalid_session_id")
    return value


def install_session_routes(app: FastAPI, ctx: ServingContext) -> None:
    engine = ctx.engine

    @app.get("/v1/sessions")
    async def list_sessions(request: Request) -> Response:
        ctx.check_ready()
        found = await engine.list_sessions(request.scope.get(API_KEY_SCOPE_KEY))
        return JSONResponse(SessionList(data=[SessionInfo(**s) for s in found]).model_dump(mode="json"))

    @app.post("/v1/sessions/{session_id}/save")
    async def save_session(session_id: str, request: Request) -> Response:
        ctx.check_ready()
        saved = await engine.save_session(request.scope.get(API_KEY_SCOPE_KEY), _session_id(session_id))
        return JSONResponse(SessionSaved(**saved).model_dump(mode="json"))

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(session_id: str, request: Request) -> Response:
        ctx.check_ready()
        await engine.delete_session(request.scope.get(API_KEY_SCOPE_KEY), _session_id(session_id))
        return JSONResponse(SessionDeleted(id=session_id).model_dump(mode="json"))
