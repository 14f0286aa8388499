"""Request parsing, conversion to SamplingParams, error mapping, and settings (no server)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from mcserve.server.api.errors import invalid_request_from_validation
from mcserve.server.api.protocol import ChatCompletionRequest, CompletionRequest
from mcserve.server.errors import ConfigError, InvalidRequestError
from mcserve.server.settings import DEFAULT_MAX_BODY_BYTES, ApiSettings

MSG = [{"role": "user", "content": "hi"}]


def _error(model: type, raw: str) -> InvalidRequestError:
    with pytest.raises(ValidationError) as info:
        model.model_validate_json(raw)
    return invalid_request_from_validation(list(info.value.errors()))


def test_chat_request_to_sampling_params() -> None:
    req = ChatCompletionRequest.model_validate(
        {
            "messages": MSG,
            "max_completion_tokens": 7,
            "stop": "x",
            "top_k": 0,
            "logprobs": True,
            "top_logprobs": 3,
            "logit_bias": {"12": -5.0},
            "seed": 4,
            "n": 2,
            "mc_top_k": 2,
            "stop_token_ids": [9],
        }
    )
    p = req.to_sampling_params(max_tokens=req.requested_max_tokens)
    assert (p.max_tokens, p.stop, p.top_k, p.logprobs, p.logit_bias) == (7, ("x",), -1, 3, {12: -5.0})
    assert (p.seed, p.n, p.mc_top_k, p.stop_token_ids, p.temperature) == (4, 2, 2, (9,), 1.0)
    plain = ChatCompletionRequest.model_validate({"messages": MSG}).to_sampling_params(max_tokens=None)
    assert plain.logprobs is None and plain.max_tokens is None


def test_sampling_errors_name_the_field_the_client_sent() -> None:
    req = ChatCompletionRequest.model_validate({"messages": MSG, "max_completion_tokens": 0})
    with pytest.raises(InvalidRequestError) as info:
        req.to_sampling_params(max_tokens=0)
    assert info.value.param == "max_completion_tokens" and "got 0" in info.value.message
    req = ChatCompletionRequest.model_validate({"messages": MSG, "logprobs": True, "top_logprobs": 21})
    with pytest.raises(InvalidRequestError) as info:
        req.to_sampling_params(max_tokens=None)
    assert info.value.param == "top_logprobs"


def test_completion_prompt_forms() -> None:
    def prompts(p: object) -> list:
        return CompletionRequest.model_validate({"prompt": p}).prompts()

    assert prompts("a") == ["a"] and prompts(["a", "b"]) == ["a", "b"]
    assert prompts([1, 2]) == [[1, 2]] and prompts([[1], [2, 3]]) == [[1], [2, 3]]
    with pytest.raises(InvalidRequestError, match="at most 64 prompts"):
        prompts(["a"] * 65)
    assert CompletionRequest.model_validate({"prompt": "a"}).requested_max_tokens == 16
    assert CompletionRequest.model_validate({"prompt": "a", "max_tokens": None}).requested_max_tokens is None


@pytest.mark.parametrize(
    "raw,param,fragment",
    [
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}',
            "messages[1].role",
            "'bot'",
        ),
        ('{"messages": [{"role": "user", "content": [{"text": "x"}]}]}', "messages[0].content", "accepted types"),
        ('{"messages": [], "n": 1}', "messages", "at least 1"),
        (
            '{"messages": [{"role": "user", "content": "a"}], "stream_options": {"include_usage": 1}}',
            "stream_options.include_usage",
            "boolean",
        ),
        ('{"messages": 3}', "messages", "valid array"),
    ],
)
def test_validation_errors_point_at_the_field(raw: str, param: str, fragment: str) -> None:
    err = _error(ChatCompletionRequest, raw)
    assert err.param == param and fragment in err.message and err.message.startswith(param)


def test_strict_parsing_refuses_coercion_and_non_finite_numbers() -> None:
    assert _error(ChatCompletionRequest, '{"messages": [], "max_tokens": 1.0}').param == "messages"
    assert _error(CompletionRequest, '{"prompt": "a", "max_tokens": 1.5}').param == "max_tokens"
    assert _error(CompletionRequest, '{"prompt": "a", "temperature": Infinity}').param == "temperature"
    assert _error(CompletionRequest, '{"prompt": [true]}').message.startswith("prompt: [True] matches none")
    # Unknown fields are ignored (newer clients send fields this server does not know).
    assert CompletionRequest.model_validate_json('{"prompt": "a", "brand_new_field": 1}').prompt == "a"


def test_settings_precedence_and_errors() -> None:
    env = {"MCSERVE_PORT": "9000", "MCSERVE_API_KEY": "k1, k2", "MCSERVE_HOST": "0.0.0.0", "OTHER": "x"}
    s = ApiSettings.from_env(env, port=9100, host=None)
    assert (s.port, s.host, s.api_keys, s.max_body_bytes) == (9100, "0.0.0.0", ("k1", "k2"), DEFAULT_MAX_BODY_BYTES)
    assert ApiSettings.from_env({}).api_keys == ()
    with pytest.raises(ConfigError, match="MCSERVE_PORT must be a number, got 'eighty'"):
        ApiSettings.from_env({"MCSERVE_PORT": "eighty"})
    with pytest.raises(ConfigError, match="port must be in \\[0, 65535\\], got 70000"):
        ApiSettings(port=70000)
    with pytest.raises(ConfigError, match="max_body_bytes must be an integer >= 1024, got 10"):
        ApiSettings.from_env({}, max_body_bytes=10)
    with pytest.raises(ConfigError, match="unknown settings \\['colour'\\]"):
        ApiSettings.from_env({}, colour="red")
