"""Structured outputs: llguidance grammars as one batch bitmask in the sampler, on the tiny random model."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch

from mcserve.server.engine.sampler import Sampler, SamplingRow
from mcserve.server.engine.sampling_params import SamplingParams
from mcserve.server.engine.structured.compiler import GrammarCompiler
from mcserve.server.engine.structured.grammars import GrammarError
from mcserve.server.engine.structured.masks import TokenMasks
from mcserve.server.engine.structured.spec import StructuredSpec
from mcserve.server.errors import InvalidRequestError
from mcserve.server.model.init_model import init_weights
from mcserve.server.model.loader import load_model
from mcserve.server.model.model import MCGatedDeltaNetForCausalLM
from mcserve.server.text.tokenizer import Tokenizer
from tests.server.engine.helpers import generate, make_engine, random_prompts

# Bounded everywhere, so a random model cannot wander past max_tokens inside a string or a number.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["name", "ok", "n", "tags"],
    "additionalProperties": False,
}


def _spec(kind: str, value: object = "") -> StructuredSpec:
    return StructuredSpec.json_schema(value, "guided_json") if kind == "json" else StructuredSpec(kind, value)


@pytest.fixture(scope="module")
def compiler(tokenizer: Tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer.backend.to_str(), tokenizer.eos_token_ids)


@pytest.mark.parametrize(
    "spec, needle",
    [
        (StructuredSpec("json", '{"type": "objekt"}', "response_format"), "objekt"),
        (StructuredSpec("json", '{"$ref": "#/nope"}', "guided_json"), "/nope"),
        (StructuredSpec("json", "{not json", "guided_json"), "guided_json"),
        (StructuredSpec("regex", "[a-", "guided_regex"), "guided_regex"),
        (StructuredSpec("grammar", "start: undefined_rule", "guided_grammar"), "undefined_rule"),
    ],
)
def test_a_grammar_that_cannot_compile_is_a_400_naming_the_problem(compiler, spec, needle) -> None:
    with pytest.raises(InvalidRequestError) as e:
        compiler.check(spec)
    assert e.value.param == spec.param and needle in e.value.message and e.value.http_status == 400


def test_spec_shape_errors_name_the_field() -> None:
    with pytest.raises(InvalidRequestError, match="guided_choice"):
        StructuredSpec("choice", "[]", "guided_choice")
    with pytest.raises(InvalidRequestError, match="guided_choice"):
        StructuredSpec("choice", '["a", 1]', "guided_choice")
    with pytest.raises(InvalidRequestError, match="must not be empty"):
        StructuredSpec("regex", "", "guided_regex")


def _reference_mask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Token by token: bit t % 32 of word t // 32; past the bitmask's width everything is banned."""
    out = logits.clone()
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            w = t // 32
            if w >= bitmask.shape[1] or not (int(bitmask[b, w]) >> (t % 32)) & 1:
                out[b, t] = float("-inf")
    return out


@pytest.mark.parametrize("vocab, words", [(77, 3), (64, 2), (70, 2), (33, 1)])
def test_bitmask_is_applied_bit_for_bit(vocab: int, words: int) -> None:
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(5, vocab + 3, generator=g)  # wider than the vocab: a padded lm_head
    bitmask = torch.randint(-(2**31), 2**31, (5, words), generator=g, dtype=torch.int64).to(torch.int32)
    bitmask[0] = -1  # a row without a grammar
    sampler = Sampler(vocab, "cpu", seed=0)
    rows = [SamplingRow(SamplingParams(temperature=0.0, logprobs=0))] * 5
    want = _reference_mask(logits[:, :vocab], bitmask)
    assert torch.equal(sampler._mask(logits[:, :vocab], bitmask), want)
    out = sampler(logits, rows, bitmask)
    assert out.token_ids == want.argmax(-1).tolist()
    assert out.token_ids[0] == logits[0, :vocab].argmax().item()  # an all-ones row is left alone
    assert torch.isfinite(logits).all(), "the caller's logits are not modified"


def test_masked_sampling_of_random_logits_follows_each_grammar(tokenizer: Tokenizer, compiler) -> None:
    """Eight rows, three grammars and unguided rows, random logits 4 columns wider than the vocab:
    every guided row ends in text its grammar accepts; unguided rows sample as without masks."""
    masks = TokenMasks(compiler)
    specs = [_spec("json", SCHEMA), _spec("regex", r"[a-z]{2,4}-[0-9]{3}"), _spec("choice", '["yes", "no", "maybe"]'),
             None, _spec("json_object"), None, _spec("json", SCHEMA), _spec("grammar", 'start: "x" ("+" "y")? "!"')]
    for i, s in enumerate(specs):
        if s is not None:
            masks.add(i, s)
    vocab = tokenizer.vocab_size
    sampler, plain = Sampler(vocab, "cpu", seed=1), Sampler(vocab, "cpu", seed=1)
    g = torch.Generator().manual_seed(0)
    out: dict[int, list[int]] = {i: [] for i in range(len(specs))}
    done: set[int] = set()
    for _ in range(80):
        live = [i for i in range(len(specs)) if i not in done]
        if not live:
            break
        masks.launch()
        logits = torch.randn(len(live), vocab + 4, generator=g) * 3
        rows = [SamplingRow(SamplingParams(temperature=0.0 if i % 2 else 1.0, seed=i)) for i in live]
        toks = sampler(logits, rows, masks.bitmask(live)).token_ids
        if not any(specs[i] for i in live):
            assert toks == plain(logits, rows).token_ids
        statuses = masks.accept(list(zip(live, toks, strict=True)))
        assert set(statuses) == {i for i in live if specs[i] is not None}
        for i, t in zip(live, toks, strict=True):
            out[i].append(t)
            if statuses.get(i) == "done" or t in tokenizer.eos_token_ids:
                done.add(i)
    texts = {i: tokenizer.decode(ids) for i, ids in out.items()}
    for i in (0, 6):
        jsonschema.validate(json.loads(texts[i]), SCHEMA)
    assert re.fullmatch(r"[a-z]{2,4}-[0-9]{3}", texts[1])
    assert texts[2] in ("yes", "no", "maybe")
    assert isinstance(json.loads(texts[4]), dict)
    assert texts[7] in ("x!", "x+y!")
    assert {0, 1, 2, 4, 6, 7} <= done
    masks.close()


def test_engine_generates_schema_valid_json_next_to_free_rows(model, tokenizer) -> None:
    prompts = random_prompts(3, [5, 20, 9, 33])
    free = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    guided = SamplingParams(temperature=0.0, max_tokens=120, structured=_spec("json", SCHEMA))
    sampled = dataclasses.replace(guided, temperature=1.0, seed=5, n=2)
    outs = generate(make_engine(model, tokenizer), prompts, [guided, free, sampled, free])
    for o in (outs[0].outputs[0], *outs[2].outputs):
        jsonschema.validate(json.loads(o.text), SCHEMA)
        assert o.finish_reason == "stop"
    alone = generate(make_engine(model, tokenizer), [prompts[1], prompts[3]], free)
    assert [o.outputs[0].token_ids for o in alone] == [outs[1].outputs[0].token_ids, outs[3].outputs[0].token_ids]


def test_engine_refuses_a_bad_schema_up_front(model, tokenizer) -> None:
    from mcserve.server.engine.client import GenerateRequest

    engine = make_engine(model, tokenizer)
    bad = SamplingParams(structured=StructuredSpec("json", '{"type": 5}', "response_format"))
    with pytest.raises(InvalidRequestError, match="response_format"):
        engine.add_request(GenerateRequest("r", (5, 6, 7), bad))
    assert not engine.has_unfinished()


def test_padded_lm_head_never_samples_past_the_tokenizer(model_dir: Path, tokenizer: Tokenizer) -> None:
    """lm_head 40 columns wider than the tokenizer: the grammar's mask covers the tokenizer's ids only."""
    base = load_model(model_dir, dtype=torch.float32, device="cpu")
    cfg = dataclasses.replace(base.cfg, vocab_size=tokenizer.vocab_size + 40)
    model = MCGatedDeltaNetForCausalLM(cfg)
    init_weights(model, seed=1)
    with torch.no_grad():  # make the padding columns the model's favourites
        model.lm_head.weight[tokenizer.vocab_size:] = model.lm_head.weight[:40] * 50
    params = SamplingParams(temperature=0.0, max_tokens=60, structured=_spec("regex", "[0-9]{4}"))
    out = generate(make_engine(model, tokenizer), [[5, 6, 7]], params)[0].outputs[0]
    assert re.fullmatch("[0-9]{4}", out.text) and out.finish_reason == "stop", out


def test_a_token_the_grammar_refuses_is_reported_not_raised(tokenizer: Tokenizer, compiler) -> None:
    masks = TokenMasks(compiler)
    masks.add(7, _spec("regex", "[0-9]+"))
    letter = tokenizer.encode("x", add_special_tokens=False)[0]
    digit = tokenizer.encode("5", add_special_tokens=False)[0]
    masks.launch()
    assert masks.accept([(7, digit), (8, letter)]) == {7: "open"}  # 8 has no grammar
    masks.launch()
    (status,) = masks.accept([(7, letter)]).values()
    assert isinstance(status, GrammarError) and str(status)
    masks.close()
