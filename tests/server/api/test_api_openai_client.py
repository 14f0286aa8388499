"""The live server driven by the official `openai` client: sync and async, streaming and not."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.server.api.conftest import LiveServer

MODEL = "fake-model"


def _client(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.v1, api_key=live.api_key, max_retries=0, timeout=10)


def _tokenize(live: LiveServer, **body: object) -> list[int]:
    r = httpx.post(live.base_url + "/tokenize", json=body, headers=live.auth, timeout=5)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def _letters(prompt_ids: list[int], count: int, seed: int = 0, choice: int = 0) -> str:
    """What FakeEngine generates for these prompt ids (see fake_engine.py)."""
    start = (sum(prompt_ids) + seed) % 26
    return "".join(chr(ord("a") + (start + step + 5 * choice) % 26) for step in range(count))


def test_chat_non_streaming_matches_the_template_and_reports_usage(live_server: LiveServer) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    r = _client(live_server).chat.completions.create(model=MODEL, messages=messages, max_tokens=5, seed=3)
    ids = _tokenize(live_server, messages=messages)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    assert len(r.choices) == 1
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == _letters(ids, 5, seed=3)
    assert choice.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 5, len(ids) + 5)
    assert r.usage.prompt_tokens_details.cached_tokens == len(ids) // 2


def test_text_parts_and_developer_role_render_like_plain_strings(live_server: LiveServer) -> None:
    c = _client(live_server)
    plain = c.chat.completions.create(
        model=MODEL,
        max_tokens=2,
        messages=[{"role": "system", "content": "rules"}, {"role": "user", "content": "line one\nline two"}],
    )
    parts = c.chat.completions.create(
        model=MODEL,
        max_tokens=2,
        messages=[
            {"role": "developer", "content": [{"type": "text", "text": "rules"}]},
            {"role": "user", "content": [{"type": "text", "text": "line one"}, {"type": "text", "text": "line two"}]},
        ],
    )
    assert parts.usage.prompt_tokens == plain.usage.prompt_tokens
    assert parts.choices[0].message.content == plain.choices[0].message.content


def test_chat_streaming_n2_with_usage(live_server: LiveServer) -> None:
    stream = _client(live_server).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "count"}],
        max_tokens=4,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts, finish, roles, usage = ["", ""], [None, None], [None, None], None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if not chunk.choices:
            usage = chunk.usage
            continue
        for ch in chunk.choices:
            assert finish[ch.index] is None, "no chunk after a choice's finish_reason"
            if ch.delta.role:
                roles[ch.index] = ch.delta.role
            assert roles[ch.index] == "assistant", "the role comes first"
            texts[ch.index] += ch.delta.content or ""
            finish[ch.index] = ch.finish_reason
    assert finish == ["length", "length"]
    assert [len(t) for t in texts] == [4, 4] and texts[0] != texts[1]
    assert usage is not None and usage.completion_tokens == 8


def test_stop_string_and_eos(live_server: LiveServer) -> None:
    c = _client(live_server)
    messages = [{"role": "user", "content": "stop please"}]
    full = _letters(_tokenize(live_server, messages=messages), 6)
    r = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, stop=[full[3]])
    assert r.choices[0].message.content == full[:3]
    assert r.choices[0].finish_reason == "stop"
    raw = httpx.post(
        live_server.v1 + "/chat/completions",
        headers=live_server.auth,
        timeout=5,
        json={"messages": messages, "max_tokens": 6, "stop": full[3]},
    ).json()
    assert raw["choices"][0]["stop_reason"] == full[3]
    eos = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "[[eos]]"}], max_tokens=10)
    assert eos.choices[0].finish_reason == "stop" and len(eos.choices[0].message.content) == 2
    assert eos.usage.completion_tokens == 3  # the EOS token counts, but is not shown


def test_chat_logprobs(live_server: LiveServer) -> None:
    r = _client(live_server).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "lp"}], max_tokens=3, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    assert [round(t.logprob, 2) for t in content] == [-0.25, -0.26, -0.27]
    assert all(len(t.top_logprobs) == 2 and t.bytes == list(t.token.encode()) for t in content)


def test_completions_token_prompts_n2_and_echo(live_server: LiveServer) -> None:
    c = _client(live_server)
    prompts = [[40, 41, 42], [50, 51]]
    r = c.completions.create(model=MODEL, prompt=prompts, max_tokens=3, n=2)
    assert r.object == "text_completion" and [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert [ch.text for ch in r.choices] == [_letters(p, 3, choice=j) for p in prompts for j in range(2)]
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 12
    echoed = c.completions.create(model=MODEL, prompt="Say", max_tokens=2, echo=True)
    assert echoed.choices[0].text.startswith("Say") and len(echoed.choices[0].text) == 5


def test_completions_logprobs_and_offsets(live_server: LiveServer) -> None:
    r = _client(live_server).completions.create(model=MODEL, prompt="abc", max_tokens=4, logprobs=2)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [0, 1, 2, 3]
    assert all(len(top) == 2 for top in lp.top_logprobs)


def test_extras_reach_the_engine(live_server: LiveServer) -> None:
    r = _client(live_server).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "extras"}],
        max_completion_tokens=4,
        temperature=0.5,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        seed=11,
        user="u1",
        extra_body={
            "top_k": 5,
            "min_p": 0.1,
            "repetition_penalty": 1.1,
            "min_tokens": 1,
            "stop_token_ids": [7],
            "ignore_eos": True,
            "mc_top_k": 2,
            "session_id": "s-1",
            "priority": 3,
            "skip_special_tokens": False,
            "include_stop_str_in_output": True,
        },
    )
    seen = live_server.fake_request(r.id)["seen"]
    assert (seen["priority"], seen["session_id"], seen["api_key"]) == (3, "s-1", live_server.api_key)
    p = seen["params"]
    assert (p["max_tokens"], p["temperature"], p["top_p"], p["top_k"], p["min_p"]) == (4, 0.5, 0.9, 5, 0.1)
    assert (p["presence_penalty"], p["frequency_penalty"], p["repetition_penalty"]) == (0.5, -0.5, 1.1)
    assert (p["seed"], p["min_tokens"], p["stop_token_ids"], p["ignore_eos"], p["mc_top_k"]) == (11, 1, [7], True, 2)
    assert (p["skip_special_tokens"], p["include_stop_str_in_output"], p["logprobs"]) == (False, True, None)


def test_default_max_tokens_fill_the_context(live_server: LiveServer) -> None:
    messages = [{"role": "user", "content": "x" * 10}]
    r = httpx.post(
        live_server.v1 + "/chat/completions", headers=live_server.auth, timeout=10, json={"messages": messages}
    )
    body = r.json()
    assert body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] == 512  # the context limit
    assert body["choices"][0]["finish_reason"] == "length"


def test_models_version_tokenize_detokenize(live_server: LiveServer) -> None:
    models = _client(live_server).models.list().data
    assert [m.id for m in models] == [MODEL] and models[0].model_extra["max_model_len"] == 512
    assert httpx.get(live_server.base_url + "/version").json()["version"]
    ids = _tokenize(live_server, prompt="héllo", add_special_tokens=False)
    assert len(ids) == 6  # é is two bytes
    r = httpx.post(live_server.base_url + "/detokenize", json={"tokens": ids}, headers=live_server.auth)
    assert r.json() == {"prompt": "héllo"}


def test_async_client_streaming_and_not(live_server: LiveServer) -> None:
    async def run() -> tuple[str, str, str]:
        async with openai.AsyncOpenAI(base_url=live_server.v1, api_key=live_server.api_key, max_retries=0) as c:
            chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a"}], max_tokens=3)
            comp = c.completions.create(model=MODEL, prompt="b", max_tokens=3)

            async def streamed() -> str:
                text = ""
                async for chunk in await c.completions.create(model=MODEL, prompt="b", max_tokens=3, stream=True):
                    text += "".join(ch.text for ch in chunk.choices)
                return text

            r1, r2, s = await asyncio.gather(chat, comp, streamed())
            return r1.choices[0].message.content, r2.choices[0].text, s

    chat_text, comp_text, streamed_text = asyncio.run(run())
    assert len(chat_text) == 3 and comp_text == streamed_text and len(comp_text) == 3


def test_mid_stream_error_raises_api_error_in_the_client(live_server: LiveServer) -> None:
    stream = _client(live_server).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "[[error]]"}], max_tokens=10, stream=True
    )
    with pytest.raises(openai.APIError, match="fake failure"):
        for _ in stream:
            pass
    assert live_server.health() == 200
