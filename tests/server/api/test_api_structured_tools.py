"""Structured outputs and tool calls through the official `openai` client, on the tiny random model:
it knows nothing of JSON or tools, so every valid answer below is the grammar's doing."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from tests.server.api.tiny_live import MODEL, client, tiny_server

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "unit": {"type": "string", "enum": ["c", "f"]},
            },
            "required": ["city", "days", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "boolean"}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris this week?"}]


class Forecast(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: Literal["Paris", "Rome", "Oslo"]
    celsius: int = Field(ge=-40, le=45)
    sunny: bool
    note: str = Field(max_length=12)
    hours: list[Literal["am", "pm"]] = Field(max_length=3)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with tiny_server(tmp_path_factory.mktemp("tiny") / "model") as url:
        yield url


def test_parse_with_a_pydantic_schema_returns_a_valid_object(base: str) -> None:
    c = client(base)
    for seed, temperature in ((0, 0.0), (1, 1.0), (2, 1.0)):
        r = c.chat.completions.parse(model=MODEL, messages=ASK, response_format=Forecast, max_tokens=200,
                                     temperature=temperature, seed=seed)
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice
        assert isinstance(choice.message.parsed, Forecast)
        assert Forecast.model_validate_json(choice.message.content) == choice.message.parsed


def test_json_object_and_vllm_extras(base: str) -> None:
    c = client(base)
    # Any object: a random model would fill keys forever, so `}` is made its favourite token; without
    # the grammar it would answer "}" at once, with it the answer must open with "{".
    close = httpx.post(base + "/tokenize", json={"prompt": "}"}, timeout=30).json()["tokens"]
    assert len(close) == 1
    r = c.chat.completions.create(model=MODEL, messages=ASK, response_format={"type": "json_object"}, max_tokens=20,
                                  temperature=0, logit_bias={str(close[0]): 30})
    assert r.choices[0].message.content == "{}" and r.choices[0].finish_reason == "stop"
    r = c.completions.create(model=MODEL, prompt="Pick one:", max_tokens=20, temperature=0.8, seed=4, n=3,
                             extra_body={"guided_choice": ["red", "green", "blue"]})
    assert {ch.text for ch in r.choices} <= {"red", "green", "blue"}
    assert all(ch.finish_reason == "stop" for ch in r.choices)
    r = c.completions.create(model=MODEL, prompt="Code:", max_tokens=30, temperature=0,
                             extra_body={"structured_outputs": {"regex": "[A-Z]{3}-[0-9]{4}"}})
    assert len(r.choices[0].text) == 8 and r.choices[0].text[3] == "-"


def test_a_schema_the_engine_cannot_compile_is_a_400(base: str) -> None:
    r = httpx.post(base + "/v1/chat/completions", timeout=30, json={
        "messages": ASK, "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "response_format.json_schema.schema" and "missing" in err["message"]
    r = httpx.post(base + "/v1/completions", timeout=30, json={"prompt": "x", "guided_regex": "(unclosed"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_regex"


def _check_call(call, tools=(WEATHER, ADD)) -> dict:
    spec = next(t["function"] for t in tools if t["function"]["name"] == call.function.name)
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, spec["parameters"])
    assert call.type == "function" and call.id.startswith("call_")
    return args


def _stream_calls(c: openai.OpenAI, **kwargs) -> tuple[list[dict], str | None, str]:
    calls: dict[int, dict] = {}
    finish, content = None, ""
    for chunk in c.chat.completions.create(stream=True, **kwargs):
        for ch in chunk.choices:
            content += ch.delta.content or ""
            finish = ch.finish_reason or finish
            for d in ch.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
                if d.id:
                    assert entry["id"] is None, "the id comes once, in the call's first delta"
                    entry["id"], entry["name"] = d.id, d.function.name
                entry["arguments"] += d.function.arguments or ""
    return [calls[i] for i in sorted(calls)], finish, content


@pytest.mark.parametrize("temperature, seed", [(0.0, 0), (1.0, 7)])
def test_required_tool_choice_forces_a_valid_call_streamed_and_not(base: str, temperature: float, seed: int) -> None:
    c = client(base)
    kwargs = dict(model=MODEL, messages=ASK, tools=[WEATHER, ADD], tool_choice="required", parallel_tool_calls=False,
                  max_tokens=120, temperature=temperature, seed=seed)
    r = c.chat.completions.create(**kwargs)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    assert len(choice.message.tool_calls) == 1
    _check_call(choice.message.tool_calls[0])
    streamed, finish, content = _stream_calls(c, **kwargs)
    assert finish == "tool_calls" and content == ""
    want = choice.message.tool_calls[0].function
    assert [(s["name"], s["arguments"]) for s in streamed] == [(want.name, want.arguments)]


def test_named_tool_choice_calls_that_function(base: str) -> None:
    c = client(base)
    r = c.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, ADD], max_tokens=80, temperature=1.0,
                                  seed=3, tool_choice={"type": "function", "function": {"name": "add"}})
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and [t.function.name for t in calls] == ["add"]
    _check_call(calls[0])


def test_a_tool_round_trip_over_three_turns(base: str) -> None:
    c = client(base)
    messages: list = list(ASK)
    r = c.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="required",
                                  parallel_tool_calls=False, max_tokens=80, temperature=0)
    call = r.choices[0].message.tool_calls[0]
    args = _check_call(call, (WEATHER,))
    messages.append(r.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": f"sunny, 21 C in {args['city']}"})
    r2 = c.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=8, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert r2.choices[0].finish_reason in ("length", "stop", "tool_calls")
    # What the model saw: the call as a Hermes block and the result as a tool turn.
    ids = httpx.post(base + "/tokenize", json={"messages": messages}, timeout=30).json()["tokens"]
    prompt = httpx.post(base + "/detokenize", json={"tokens": ids}, timeout=30).json()["prompt"]
    # arguments reach the template as an object (what Hugging Face templates expect), re-serialised
    block = f'<tool_call>\n{{"name": "get_weather", "arguments": {json.dumps(args)}}}\n</tool_call>'
    assert block in prompt
    assert f"\ntool\n<tool_response>\nsunny, 21 C in {args['city']}\n</tool_response>" in prompt
    messages.append({"role": "assistant", "content": r2.choices[0].message.content or "ok"})
    messages.append({"role": "user", "content": "And in Rome?"})
    r3 = c.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="required",
                                   parallel_tool_calls=False, max_tokens=80, temperature=0)
    _check_call(r3.choices[0].message.tool_calls[0], (WEATHER,))


def test_tool_choice_none_renders_no_tools_and_parses_nothing(base: str, tmp_path: Path) -> None:
    c = client(base)
    r = c.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=5,
                                  temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(
        httpx.post(base + "/tokenize", json={"messages": ASK}, timeout=30).json()["tokens"])


def test_every_vllm_spelling_constrains_the_output(base: str) -> None:
    """guided_json, guided_grammar and structured_outputs' json / choice / grammar, on both endpoints;
    two constraints at once are a 400 naming the second."""
    c = client(base)
    point = {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                              "ok": {"type": "boolean"}},
             "required": ["x", "ok"], "additionalProperties": False}
    lark = 'start: "v" DIGIT DIGIT\nDIGIT: /[0-9]/'
    for extra, check in (
        ({"guided_json": point}, lambda t: jsonschema.validate(json.loads(t), point)),
        ({"structured_outputs": {"json": point}}, lambda t: jsonschema.validate(json.loads(t), point)),
        ({"guided_grammar": lark}, lambda t: _assert_match(r"v[0-9]{2}", t)),
        ({"structured_outputs": {"grammar": lark}}, lambda t: _assert_match(r"v[0-9]{2}", t)),
        ({"structured_outputs": {"choice": ["yes", "no"]}}, lambda t: _assert_match("yes|no", t)),
    ):
        r = c.completions.create(model=MODEL, prompt="Go:", max_tokens=40, temperature=1.0, seed=5, extra_body=extra)
        check(r.choices[0].text)
        assert r.choices[0].finish_reason == "stop", (extra, r.choices[0])
        r = c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=40, temperature=1.0, seed=6,
                                      extra_body=extra)
        check(r.choices[0].message.content)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, response_format={"type": "json_object"},
                                  extra_body={"guided_regex": "[a-z]+"})
    assert e.value.body["param"] == "response_format" and "at most one" in e.value.body["message"]


def _assert_match(pattern: str, text: str) -> None:
    assert re.fullmatch(pattern, text), (pattern, text)
