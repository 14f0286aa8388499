"""`StructuredSpec`: what a request constrains its output to, as plain data on `SamplingParams`.

The HTTP layer maps OpenAI's `response_format`, vLLM's `guided_*` / `structured_outputs` extras and
forced tool calls to one spec; `compiler.py` turns it into an llguidance grammar.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from mcserve.server.errors import InvalidRequestError

Kind = Literal["json", "json_object", "regex", "choice", "grammar"]
KINDS: tuple[str, ...] = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True, slots=True)
class StructuredSpec:
    """`kind` and its `value`:

    - "json": a JSON Schema, as JSON text; the output is one JSON value matching it;
    - "json_object": any JSON object (`value` is ignored);
    - "regex": the whole output matches this regular expression (Rust `regex` syntax);
    - "choice": a JSON list of strings; the output is exactly one of them;
    - "grammar": a Lark grammar in llguidance's dialect (which also reads GBNF), `%json {...}` included.

    `param`: the request field it came from, named in error messages.
    """

    kind: Kind
    value: str = ""
    param: str = "response_format"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidRequestError(f"unknown structured output kind {self.kind!r}; one of {KINDS}", param=self.param)
        if not isinstance(self.value, str):
            raise InvalidRequestError(f"{self.param} must be given as text, got {type(self.value).__name__}",
                                      param=self.param)
        if self.kind == "choice":
            try:
                choices = json.loads(self.value)
            except json.JSONDecodeError as e:
                raise InvalidRequestError(f"{self.param}: not a JSON list: {e}", param=self.param) from None
            if not (isinstance(choices, list) and choices and all(isinstance(c, str) and c for c in choices)):
                raise InvalidRequestError(f"{self.param} must be a non-empty list of non-empty strings, got "
                                          f"{self.value[:200]}", param=self.param)
        elif self.kind != "json_object" and not self.value:
            raise InvalidRequestError(f"{self.param} must not be empty", param=self.param)

    @classmethod
    def json_schema(cls, schema: object, param: str) -> StructuredSpec:
        """A spec from a schema given as a JSON object (or as JSON text)."""
        if isinstance(schema, str):
            return cls("json", schema, param)
        if not isinstance(schema, dict):
            raise InvalidRequestError(f"{param} must be a JSON Schema object, got {type(schema).__name__}",
                                      param=param)
        return cls("json", json.dumps(schema), param)
