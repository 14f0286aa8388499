"""`GrammarCompiler`: `StructuredSpec` -> llguidance grammar, checked against the tokenizer, cached.

llguidance (MIT, a Rust core with no Python dependencies) reads the model's `tokenizer.json` itself,
so the token trie it masks over is the serving tokenizer's, byte for byte. Why llguidance and not
xgrammar: docs/STRUCTURED_OUTPUTS.md.

JSON is generated compact by default (no whitespace between tokens, `,` and `:` as separators):
a grammar that allows free whitespace lets a weak model emit whitespace until max_tokens. A schema
may ask otherwise with llguidance's `"x-guidance": {"whitespace_flexible": true}`.

Thread safety: `check` runs on the HTTP event loop, `matcher` on the engine thread; the cache is
shared under a lock. Compilation itself releases the GIL.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable

import llguidance as llg

from mcserve.server.engine.structured.spec import StructuredSpec
from mcserve.server.errors import InvalidRequestError

JSON_DEFAULTS = {"whitespace_flexible": False}
CACHE_SIZE = 256  # compiled grammars kept (the same schema is usually sent again and again)


def grammar_text(spec: StructuredSpec) -> str:
    """The llguidance grammar (its JSON form) of `spec`; ValueError for input it cannot read."""
    if spec.kind == "json":
        return llg.LLMatcher.grammar_from_json_schema(spec.value, defaults=JSON_DEFAULTS)  # type: ignore[arg-type]
    if spec.kind == "json_object":
        return llg.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=JSON_DEFAULTS)  # type: ignore[arg-type]
    if spec.kind == "regex":
        return llg.LLMatcher.grammar_from_regex(spec.value)
    if spec.kind == "choice":
        return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in json.loads(spec.value)))
    return llg.grammar_from("grammar", spec.value)


class GrammarCompiler:
    """Compiles specs for one tokenizer. `tokenizer_json`: the serving tokenizer's `tokenizer.json`
    text; `eos_token_ids`: the ids a finished grammar allows (every id the engine stops on)."""

    def __init__(self, tokenizer_json: str, eos_token_ids: Iterable[int]) -> None:
        eos = sorted(eos_token_ids)
        self.tokenizer = llg.LLTokenizer(tokenizer_json, eos_token=eos or None)
        self.vocab_size: int = self.tokenizer.vocab_size
        self._cache: OrderedDict[StructuredSpec, str] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, spec: StructuredSpec) -> str:
        """The compiled grammar; InvalidRequestError naming the problem when it cannot be compiled."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
        try:
            grammar = grammar_text(spec)
        except ValueError as e:
            raise _compile_error(spec, str(e)) from None
        failed, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if failed:
            raise _compile_error(spec, "; ".join(messages))
        with self._lock:
            self._cache[spec] = grammar
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return grammar

    def matcher(self, spec: StructuredSpec) -> llg.LLMatcher:
        """A fresh matcher at the grammar's start; `check` must have accepted `spec`."""
        m = llg.LLMatcher(self.tokenizer, self.check(spec), log_level=0)
        assert not m.is_error(), f"a checked grammar failed to build: {m.get_error()}"
        return m


def _compile_error(spec: StructuredSpec, problem: str) -> InvalidRequestError:
    what = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regular expression",
            "choice": "choice list", "grammar": "grammar"}[spec.kind]
    return InvalidRequestError(f"{spec.param}: the {what} cannot be compiled: {problem}", param=spec.param,
                               code="invalid_grammar")
