"""The served /openapi.json: valid OpenAPI, a request body for every POST that reads one, the real error
statuses, and schemas that the server's actual requests and responses validate against."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx
import jsonschema
from openapi_spec_validator import validate

from tests.server.api.fake_server import make_app

AUTH = {"Authorization": "Bearer test-key"}
ROOT = Path(__file__).resolve().parents[3]


def _get(app, method: str, path: str, **kw) -> httpx.Response:
    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=AUTH) as c:
            return await c.request(method, path, **kw)

    return asyncio.run(run())


def _check(spec: dict, name: str, instance: object) -> None:
    schema = {"$ref": f"#/components/schemas/{name}", "components": spec["components"]}
    jsonschema.Draft202012Validator(schema).validate(instance)


def test_document_validates_and_declares_every_body() -> None:
    app, _ = make_app()
    r = _get(app, "GET", "/openapi.json")
    assert r.status_code == 200
    spec = r.json()
    validate(spec)
    schemas = spec["components"]["schemas"]
    posts = [(p, op) for p, ops in spec["paths"].items() for m, op in ops.items() if m == "post"]
    assert {p for p, _ in posts} >= {"/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"}
    for path, op in posts:
        if path == "/v1/sessions/{session_id}/save":  # the one POST that reads no body
            assert "requestBody" not in op and "application/json" in op["responses"]["200"]["content"]
            continue
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert op["requestBody"]["required"] and ref.rsplit("/", 1)[1] in schemas, path
        assert "application/json" in op["responses"]["200"]["content"], path
    assert "422" not in json.dumps(spec) and "HTTPValidationError" not in schemas
    chat = spec["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert chat["text/event-stream"]["x-event-data"]["$ref"].endswith("/ChatCompletionChunk")


def test_declared_error_statuses_are_ones_the_server_returns() -> None:
    spec = make_app()[0].openapi()
    declared = {int(s) for ops in spec["paths"].values() for op in ops.values() for s in op["responses"]}
    source = "\n".join(p.read_text() for p in (ROOT / "server").rglob("*.py"))
    raised = {int(s) for s in re.findall(r"http_status = (\d{3})", source)} | {200, 400}
    assert declared <= raised, declared - raised


def test_real_bodies_validate_against_the_declared_schemas() -> None:
    app, _ = make_app()
    spec = app.openapi()
    chat_req = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "logprobs": True, "top_logprobs": 2,
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}}
    _check(spec, "ChatCompletionRequest", chat_req)
    r = _get(app, "POST", "/v1/chat/completions", json={"messages": chat_req["messages"], "max_tokens": 3,
                                                         "logprobs": True, "top_logprobs": 2})
    assert r.status_code == 200, r.text
    _check(spec, "ChatCompletionResponse", r.json())
    r = _get(app, "POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 3, "stream": True})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert events
    for e in events:
        _check(spec, "CompletionResponse", e)
    r = _get(app, "POST", "/v1/completions", json={"prompt": "hi", "max_tokens": "x"})
    assert r.status_code == 400
    _check(spec, "ErrorResponse", r.json())
    _check(spec, "ModelList", _get(app, "GET", "/v1/models").json())


def test_every_operation_declares_what_the_middleware_answers() -> None:
    """Provoked on each documented operation: a bad Content-Length (400), a body over the limit
    (413), headers over the limit (431), no API key (401) and draining (503) where they apply; each
    status that comes back is declared for that operation, with the error body it really has."""
    app, _ = make_app()
    spec = app.openapi()
    ops = [(p, m) for p, o in spec["paths"].items() for m in o if not p.startswith("/_fake")]
    provoke = {
        "bad Content-Length": {"headers": {**AUTH, "Content-Length": "-5"}},
        "body": {"headers": {**AUTH, "Content-Length": str(10**9)}},
        "headers": {"headers": {**AUTH, "X-Big": "x" * 70_000}},
        "no key": {"headers": {}},
    }

    async def run() -> list[tuple[str, str, str, httpx.Response]]:
        out = []
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            for path, method in ops:
                url = path.replace("{model_id}", "m")
                for why, kw in provoke.items():
                    out.append((path, method, why, await c.request(method.upper(), url, **kw)))
            app.state.ctx.drain.begin()
            for path, method in ops:
                r = await c.request(method.upper(), path.replace("{model_id}", "m"), headers=AUTH)
                out.append((path, method, "draining", r))
        return out

    seen: dict[str, set[int]] = {}
    for path, method, why, r in asyncio.run(run()):
        declared = spec["paths"][path][method]["responses"]
        if r.status_code != 200:
            assert str(r.status_code) in declared, (method, path, why, r.status_code)
            seen.setdefault(why, set()).add(r.status_code)
            if path != "/health":
                _check(spec, "ErrorResponse", r.json())
    assert seen == {"bad Content-Length": {400}, "body": {413}, "headers": {431}, "no key": {401}, "draining": {503}}
