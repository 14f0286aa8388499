"""The stop rules on their own, with a detokenizer over a toy vocabulary (token i = one letter)."""

from __future__ import annotations

from mcserve.server.engine.sampling_params import SamplingParams
from mcserve.server.engine.stop_rules import StopRules
from mcserve.server.text.detokenizer import IncrementalDetokenizer

EOS = frozenset({0})


def _decode(ids: list[int]) -> str:
    return "".join(chr(ord("a") + i) for i in ids)


def _ids(text: str) -> list[int]:
    return [ord(ch) - ord("a") for ch in text]


def run(params: SamplingParams, tokens: list[int], ended_at: int | None = None) -> tuple[str, list]:
    """Feed tokens until a rule fires: (all text, [(index, finish_reason, stop_reason)])."""
    rules = StopRules(params, EOS, IncrementalDetokenizer(_decode, stop=params.stop,
                                                          include_stop_str_in_output=params.include_stop_str_in_output))
    text, events = "", []
    for i, t in enumerate(tokens):
        text += rules.check(t, i + 1, "length" if i == ended_at else None)
        if rules.finish_reason is not None:
            events.append((i, rules.finish_reason, rules.stop_reason))
            break
    return text, events


def test_stop_token_then_eos_then_ignore_eos() -> None:
    p = SamplingParams(max_tokens=None, stop_token_ids=(3,))
    assert run(p, _ids("bcdbb")) == ("bc", [(2, "stop", 3)])  # the stop token adds no text
    assert run(p, [1, 2, 0, 1]) == ("bc", [(2, "stop", None)])
    ignore = SamplingParams(max_tokens=4, ignore_eos=True)
    assert run(ignore, [1, 0, 2, 0, 1]) == (_decode([1, 0, 2, 0]), [(3, "length", None)])


def test_stop_strings_count_only_from_min_tokens() -> None:
    tokens = _ids("xyzqxyzqq")
    early = SamplingParams(max_tokens=None, stop=("yz",))
    assert run(early, tokens) == ("x", [(2, "stop", "yz")])
    # min_tokens=2: the first "yz" starts at the 2nd token, which counts; with min_tokens=3 its "y" was
    # emitted before stop strings counted, so the first "yz" is not matched, nor with min_tokens=4.
    assert run(SamplingParams(max_tokens=None, stop=("yz",), min_tokens=2), tokens) == ("x", [(2, "stop", "yz")])
    assert run(SamplingParams(max_tokens=None, stop=("yz",), min_tokens=3), tokens) == ("xyzqx", [(6, "stop", "yz")])
    deferred = SamplingParams(max_tokens=None, stop=("yz",), min_tokens=4)
    assert run(deferred, tokens) == ("xyzqx", [(6, "stop", "yz")])
    kept = SamplingParams(max_tokens=None, stop=("yz",), min_tokens=4, include_stop_str_in_output=True)
    assert run(kept, tokens) == ("xyzqxyz", [(6, "stop", "yz")])


def test_length_flushes_held_back_text() -> None:
    # "xy" could start the stop string "xyz": held back until the choice ends by length.
    p = SamplingParams(max_tokens=3, stop=("xyz",))
    assert run(p, _ids("qxyq")) == ("qxy", [(2, "length", None)])
    assert run(SamplingParams(max_tokens=None, stop=("xyz",)), _ids("qxyq"), ended_at=2) == (
        "qxy", [(2, "length", None)])


def test_earlier_rules_win() -> None:
    # The last allowed token is a stop token: "stop" beats "length", also at max_model_len.
    p = SamplingParams(max_tokens=3, stop_token_ids=(5,))
    assert run(p, [1, 2, 5]) == ("bc", [(2, "stop", 5)])
    assert run(SamplingParams(max_tokens=None, stop_token_ids=(5,)), [1, 5], ended_at=1) == ("b", [(1, "stop", 5)])
    # A stop string completed by the max_tokens-th token: "stop" with the string.
    assert run(SamplingParams(max_tokens=3, stop=("cd",)), _ids("bcd")) == ("b", [(2, "stop", "cd")])


def test_a_completed_grammar_stops_after_stop_strings_before_length() -> None:
    p = SamplingParams(max_tokens=2, stop=("bc",))
    rules = StopRules(p, EOS, IncrementalDetokenizer(_decode, stop=("bc",)))
    assert rules.check(1, 1, grammar_done=False) == "" and rules.finish_reason is None  # "b" held back
    rules.check(2, 2, grammar_done=True)  # stop string, grammar and length at once
    assert (rules.finish_reason, rules.stop_reason) == ("stop", "bc")
    rules = StopRules(SamplingParams(max_tokens=2), EOS, IncrementalDetokenizer(_decode))
    text = rules.check(1, 2, grammar_done=True)
    assert (rules.finish_reason, rules.stop_reason, text) == ("stop", None, "b")


def test_a_kept_stop_string_is_matched_across_one_letter_pushes_from_the_start() -> None:
    # With include_stop_str_in_output the text before a possible stop string is emitted at once, and only
    # the last len(stop) - 1 characters are kept to match across pushes: all of them, also while the text
    # is shorter than that (a slice from a negative start kept one character of "xy", and "xyzw" was missed).
    kept = SamplingParams(max_tokens=None, stop=("xyzw",), include_stop_str_in_output=True)
    assert run(kept, _ids("xyzwq")) == ("xyzw", [(3, "stop", "xyzw")])
    assert run(kept, _ids("qxyzwq")) == ("qxyzw", [(4, "stop", "xyzw")])
    assert run(SamplingParams(max_tokens=None, stop=("xyzw",)), _ids("xyzwq")) == ("", [(3, "stop", "xyzw")])
