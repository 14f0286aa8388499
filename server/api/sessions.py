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

from fastapi import FastAPI, Path, Request
from pydantic import BaseModel
from starlette.responses import JSONResponse, Response

from mcserve.server.api.middleware import API_KEY_SCOPE_KEY
from mcserve.server.api.serving import MAX_SESSION_ID_LEN, ServingContext


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


# the id in the path, as the schema documents it (a violation is a 400, server/api/errors.py)
SessionIdPath = Path(min_length=1, max_length=MAX_SESSION_ID_LEN, description="the session's id")


def install_session_routes(app: FastAPI, ctx: ServingContext) -> None:
    engine = ctx.engine

    @app.get("/v1/sessions")
    async def list_sessions(request: Request) -> Response:
        ctx.check_ready()
        found = await engine.list_sessions(request.scope.get(API_KEY_SCOPE_KEY))
        return JSONResponse(SessionList(data=[SessionInfo(**s) for s in found]).model_dump(mode="json"))

    @app.post("/v1/sessions/{session_id}/save")
    async def save_session(request: Request, session_id: str = SessionIdPath) -> Response:
        ctx.check_ready()
        saved = await engine.save_session(request.scope.get(API_KEY_SCOPE_KEY), session_id)
        return JSONResponse(SessionSaved(**saved).model_dump(mode="json"))

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(request: Request, session_id: str = SessionIdPath) -> Response:
        ctx.check_ready()
        await engine.delete_session(request.scope.get(API_KEY_SCOPE_KEY), session_id)
        return JSONResponse(SessionDeleted(id=session_id).model_dump(mode="json"))
