"""Bad input of every kind gets its exact 4xx and an OpenAI error body; the server stays healthy."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server.api.conftest import LiveServer
from tests.server.api.tiny_tokenizer import TinyTokenizer

MSG = [{"role": "user", "content": "hi"}]
CHAT, COMP = "/v1/chat/completions", "/v1/completions"
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def chat(**fields: object) -> bytes:
    return json.dumps({"messages": MSG, "max_tokens": 4, **fields}).encode()


def comp(**fields: object) -> bytes:
    return json.dumps({"prompt": "hi", "max_tokens": 4, **fields}).encode()


# (name, path, raw body, status, param, code); param/code None = must be null.
# fmt: off
CASES = [
    ("malformed json", CHAT, b'{"messages": [', 400, None, "invalid_json"),
    ("empty body", CHAT, b"", 400, None, "invalid_json"),
    ("not an object", CHAT, b"[1, 2]", 400, None, "invalid_json"),
    ("invalid utf-8", CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, None, "invalid_json"),
    ("NaN literal", CHAT, chat()[:-1] + b', "temperature": NaN}', 400, "temperature", "invalid_value"),
    ("infinite number", CHAT, chat()[:-1] + b', "top_p": 1e400}', 400, "top_p", "invalid_value"),
    ("messages is a string", CHAT, json.dumps({"messages": "hi"}).encode(), 400, "messages", "invalid_value"),
    ("missing messages", CHAT, b"{}", 400, "messages", "invalid_value"),
    ("empty messages", CHAT, chat(messages=[]), 400, "messages", "invalid_value"),
    ("unknown role", CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages[0].role",
     "invalid_value"),
    ("content is a number", CHAT, chat(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content",
     "invalid_value"),
    ("image part", CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     400, "messages[0].content[0]", None),
    ("user message without content", CHAT, chat(messages=[{"role": "user"}]), 400, "messages[0].content", None),
    ("template refuses", CHAT, chat(messages=[*MSG, {"role": "system", "content": "late"}]), 400, "messages", None),
    ("temperature string", CHAT, chat(temperature="hot"), 400, "temperature", "invalid_value"),
    ("max_tokens string", CHAT, chat(max_tokens="10"), 400, "max_tokens", "invalid_value"),
    ("n boolean", CHAT, chat(n=True), 400, "n", "invalid_value"),
    ("stop number", CHAT, chat(stop=5), 400, "stop", "invalid_value"),
    ("stream string", CHAT, chat(stream="yes"), 400, "stream", "invalid_value"),
    ("negative max_tokens", CHAT, chat(max_tokens=-1), 400, "max_tokens", None),
    ("zero max_completion_tokens", CHAT, chat(max_completion_tokens=0), 400, "max_completion_tokens", None),
    ("negative temperature", CHAT, chat(temperature=-1), 400, "temperature", None),
    ("top_p zero", CHAT, chat(top_p=0), 400, "top_p", None),
    ("n zero", CHAT, chat(n=0), 400, "n", None),
    ("huge n", CHAT, chat(n=10**6), 400, "n", "limit_exceeded"),
    ("presence_penalty 3", CHAT, chat(presence_penalty=3), 400, "presence_penalty", None),
    ("huge seed", CHAT, chat(seed=2**70), 400, "seed", None),
    ("huge max_tokens", CHAT, chat(max_tokens=10**30), 400, "max_tokens", "context_length_exceeded"),
    ("top_logprobs 50", CHAT, chat(logprobs=True, top_logprobs=50), 400, "top_logprobs", None),
    ("top_logprobs without logprobs", CHAT, chat(top_logprobs=2), 400, "top_logprobs", None),
    ("logit_bias key not an id", CHAT, chat(logit_bias={"abc": 1}), 400, "logit_bias", None),
    ("logit_bias id out of vocab", CHAT, chat(logit_bias={"99999": 1}), 400, "logit_bias", None),
    ("logit_bias value 1000", CHAT, chat(logit_bias={"5": 1000}), 400, "logit_bias", None),
    ("negative stop_token_ids", CHAT, chat(stop_token_ids=[-1]), 400, "stop_token_ids", None),
    ("mc_top_k zero", CHAT, chat(mc_top_k=0), 400, "mc_top_k", None),
    ("stream_options without stream", CHAT, chat(stream_options={"include_usage": True}), 400, "stream_options", None),
    ("json_schema without a schema", CHAT, chat(response_format={"type": "json_schema"}), 400,
     "response_format.json_schema", None),
    ("unknown response_format", CHAT, chat(response_format={"type": "yaml"}), 400, "response_format.type",
     "invalid_value"),
    ("two constraints", CHAT, chat(response_format={"type": "json_object"}, guided_regex="a+"), 400, "response_format",
     None),
    ("structured_outputs with two", COMP, comp(structured_outputs={"regex": "a", "choice": ["b"]}), 400,
     "structured_outputs", None),
    ("empty guided_choice", COMP, comp(guided_choice=[]), 400, "guided_choice", None),
    ("tool_choice required without tools", CHAT, chat(tool_choice="required"), 400, "tool_choice", None),
    ("tool_choice names an unknown tool", CHAT, chat(tools=[TOOL], tool_choice={"type": "function", "function": {
     "name": "nope"}}), 400, "tool_choice.function.name", None),
    ("tool without a name", CHAT, chat(tools=[{"type": "function", "function": {}}]), 400, "tools[0].function.name",
     "invalid_value"),
    ("unknown model", CHAT, chat(model="gpt-5"), 404, "model", "model_not_found"),
    ("prompt over the context", CHAT, chat(messages=[{"role": "user", "content": "x" * 600}]), 400, "messages",
     "context_length_exceeded"),
    ("engine refuses the prompt", CHAT, chat(messages=[{"role": "user", "content": "[[invalid]]"}]), 400,
     "prompt", None),
    ("empty prompt list", COMP, comp(prompt=[]), 400, "prompt", None),
    ("mixed prompt list", COMP, comp(prompt=["a", [1]]), 400, "prompt", "invalid_value"),
    ("token id out of vocab", COMP, comp(prompt=[5, 300]), 400, "prompt", None),
    ("negative token id", COMP, comp(prompt=[[5], [-1]]), 400, "prompt[1]", None),
    ("negative logprobs", COMP, comp(logprobs=-1), 400, "logprobs", None),
    ("suffix", COMP, comp(suffix="x"), 400, "suffix", None),
    ("token prompt over the context", COMP, comp(prompt=[5] * 600), 400, "prompt", "context_length_exceeded"),
    ("1.5 MB prompt", COMP, comp(prompt="y" * 1_500_000), 400, "prompt", "context_length_exceeded"),
    ("3 MB body", COMP, comp(prompt="y" * 3_000_000), 413, None, "request_too_large"),
    ("duplicate key", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "max_tokens": 9}',
     400, None, "duplicate_key"),
    ("duplicate key in a message", CHAT, b'{"messages": [{"role": "user", "role": "system", "content": "x"}]}',
     400, None, "duplicate_key"),
    ("nested too deeply", CHAT, b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None,
     "invalid_json"),
    ("too many messages", CHAT, chat(messages=MSG * 2049), 400, "messages", "limit_exceeded"),
    ("too many stop strings", CHAT, chat(stop=[str(i) for i in range(17)]), 400, "stop", "limit_exceeded"),
    ("long stop string", CHAT, chat(stop=["ok", "s" * 257]), 400, "stop[1]", "limit_exceeded"),
    ("too many stop_token_ids", CHAT, chat(stop_token_ids=[5] * 1025), 400, "stop_token_ids", "limit_exceeded"),
    ("too many logit_bias entries", CHAT, chat(logit_bias={str(i): 1 for i in range(1025)}), 400, "logit_bias",
     "limit_exceeded"),
    ("long message name", CHAT, chat(messages=[{"role": "user", "content": "x", "name": "n" * 257}]), 400,
     "messages[0].name", "limit_exceeded"),
    ("long model name", CHAT, chat(model="m" * 257), 400, "model", "limit_exceeded"),
    ("1.9 MB chat prompt", CHAT, chat(messages=[{"role": "user", "content": "q" * 1_900_000}]), 400, "messages",
     "context_length_exceeded"),
    ("tokenize over the context", "/tokenize", json.dumps({"prompt": "t" * 5000}).encode(), 400, "prompt",
     "context_length_exceeded"),
    ("detokenize over the context", "/detokenize", json.dumps({"tokens": [5] * 513}).encode(), 400, "tokens",
     "limit_exceeded"),
    ("tokenize both", "/tokenize", json.dumps({"prompt": "a", "messages": MSG}).encode(), 400, "prompt", None),
    ("detokenize bad id", "/detokenize", json.dumps({"tokens": [-5]}).encode(), 400, "tokens", None),
]
# fmt: on


def _json(headers: dict[str, str]) -> dict[str, str]:
    return {**headers, "Content-Type": "application/json"}


def _check_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"]) == (param, code), error
    return error


@pytest.mark.parametrize("name,path,body,status,param,code", CASES, ids=[c[0] for c in CASES])
def test_bad_input_table(
    live_server: LiveServer, name: str, path: str, body: bytes, status: int, param: str | None, code: str | None
) -> None:
    r = httpx.post(
        live_server.base_url + path,
        content=body,
        timeout=10,
        headers=_json(live_server.auth),
    )
    error = _check_error(r, status, param, code)
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert live_server.health() == 200


def _prompt_len(live: LiveServer, messages: list[dict]) -> int:
    return httpx.post(live.base_url + "/tokenize", json={"messages": messages}, headers=live.auth).json()["count"]


def test_context_overflow_message_gives_both_lengths(live_server: LiveServer) -> None:
    long = [{"role": "user", "content": "x" * 600}]
    r = httpx.post(live_server.base_url + CHAT, content=chat(messages=long), headers=_json(live_server.auth), timeout=5)
    message = _check_error(r, 400, "messages", "context_length_exceeded")["message"]
    # Refused before tokenizing; TinyTokenizer's tokens are 1 byte each, so the lower bound is exact.
    rendered = len(TinyTokenizer().apply_chat_template(long).encode())
    assert f"is 512 tokens, but the prompt has at least {rendered} tokens" in message
    r = httpx.post(
        live_server.base_url + CHAT, content=chat(max_tokens=500), headers=_json(live_server.auth), timeout=5
    )
    message = _check_error(r, 400, "max_tokens", "context_length_exceeded")["message"]
    n = _prompt_len(live_server, MSG)
    assert f"is 512 tokens, but {n + 500} tokens were requested ({n} in the prompt + 500 in max_tokens)" in message


def test_chunked_body_over_the_limit_without_content_length(live_server: LiveServer) -> None:
    def body():  # a generator makes httpx send chunked transfer encoding: no Content-Length to trust
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"z" * 65536
        yield b'"}'

    r = httpx.post(live_server.base_url + COMP, content=body(), headers=_json(live_server.auth), timeout=10)
    _check_error(r, 413, None, "request_too_large")
    assert live_server.health() == 200


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic dGVzdC1rZXk="},
        {"Authorization": "Bearer test-key-and-more"},
    ],
)
def test_bad_api_key_is_401_and_open_paths_stay_open(live_server: LiveServer, headers: dict) -> None:
    r = httpx.post(live_server.base_url + CHAT, content=chat(), headers=_json(headers), timeout=5)
    error = _check_error(r, 401, None, "invalid_api_key")
    assert error["type"] == "authentication_error"
    assert httpx.get(live_server.base_url + "/v1/models", headers=headers).status_code == 401
    for path in ("/health", "/metrics", "/version"):
        assert httpx.get(live_server.base_url + path, headers=headers).status_code == 200


def test_unknown_route_and_method(live_server: LiveServer) -> None:
    _check_error(httpx.get(live_server.base_url + "/v1/nothing", headers=live_server.auth), 404, None, "not_found")
    r = httpx.get(live_server.base_url + CHAT, headers=live_server.auth)
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


def test_engine_crash_is_a_logged_500_and_the_server_keeps_serving(live_server: LiveServer) -> None:
    r = httpx.post(
        live_server.base_url + CHAT,
        content=chat(messages=[{"role": "user", "content": "[[crash]]"}]),
        headers=_json(live_server.auth),
        timeout=5,
    )
    assert r.status_code == 500 and r.json()["error"]["type"] == "internal_server_error"
    assert "fake engine crashed before the first token" in live_server.log()
    ok = httpx.post(live_server.base_url + CHAT, content=chat(), headers=_json(live_server.auth), timeout=5)
    assert ok.status_code == 200 and live_server.health() == 200
