"""The context-length rule that the API, /tokenize and the engine share."""

from __future__ import annotations

import pytest

from mcserve.server.errors import ContextLengthError, check_context_length


def test_context_length_boundaries_and_the_field_named() -> None:
    check_context_length(63, 64)  # one position left for the output
    with pytest.raises(ContextLengthError, match="is 64 tokens, but the prompt has 64 tokens") as e:
        check_context_length(64, 64, param="messages")
    assert (e.value.param, e.value.code) == ("messages", "context_length_exceeded")
    check_context_length(64, 64, need_output=False)  # /tokenize: the prompt alone may fill the context
    with pytest.raises(ContextLengthError, match="has 65 tokens; shorten"):
        check_context_length(65, 64, need_output=False)
    check_context_length(60, 64, max_tokens=4)
    with pytest.raises(ContextLengthError, match=r"65 tokens were requested \(60 in the prompt \+ 5 in n_out\)") as e:
        check_context_length(60, 64, max_tokens=5, max_tokens_param="n_out")
    assert e.value.param == "n_out"
