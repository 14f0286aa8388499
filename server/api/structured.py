"""A request's output constraint, from whichever field the client used, as one `StructuredSpec`.

Sources: OpenAI's `response_format` (chat), vLLM's `guided_json` / `guided_regex` / `guided_choice` /
`guided_grammar` and `structured_outputs` (both endpoints), and tool_choice "required" or a named
function (tool_calls.py). At most one may be given; a grammar the engine cannot compile is its 400.
"""

from __future__ import annotations

import json
from typing import Any

from mcserve.server.api.protocol import ChatCompletionRequest, CompletionRequest, ResponseFormat
from mcserve.server.engine.structured.spec import StructuredSpec
from mcserve.server.errors import InvalidRequestError


def _from_response_format(rf: ResponseFormat) -> StructuredSpec | None:
    if rf.type == "text":
        return None
    if rf.type == "json_object":
        return StructuredSpec("json_object", param="response_format")
    if rf.json_schema is None or rf.json_schema.schema_ is None:
        raise InvalidRequestError("response_format of type 'json_schema' needs json_schema.schema",
                                  param="response_format.json_schema")
    return StructuredSpec.json_schema(rf.json_schema.schema_, "response_format.json_schema.schema")


def _from_extras(body: ChatCompletionRequest | CompletionRequest) -> list[StructuredSpec]:
    found: list[StructuredSpec] = []
    if body.guided_json is not None:
        found.append(StructuredSpec.json_schema(body.guided_json, "guided_json"))
    if body.guided_regex is not None:
        found.append(StructuredSpec("regex", body.guided_regex, "guided_regex"))
    if body.guided_choice is not None:
        found.append(StructuredSpec("choice", json.dumps(body.guided_choice), "guided_choice"))
    if body.guided_grammar is not None:
        found.append(StructuredSpec("grammar", body.guided_grammar, "guided_grammar"))
    so = body.structured_outputs
    if so is not None:
        given: list[tuple[str, Any]] = [(k, v) for k, v in (("json", so.json_), ("regex", so.regex),
                                        ("choice", so.choice), ("grammar", so.grammar)) if v is not None]
        if so.json_object:
            given.append(("json_object", True))
        if len(given) != 1:
            raise InvalidRequestError(f"structured_outputs needs exactly one of json, regex, choice, grammar, "
                                      f"json_object; got {[k for k, _ in given] or 'none'}",
                                      param="structured_outputs")
        kind, value = given[0]
        param = f"structured_outputs.{kind}"
        if kind == "json":
            found.append(StructuredSpec.json_schema(value, param))
        elif kind == "choice":
            found.append(StructuredSpec("choice", json.dumps(value), param))
        elif kind == "json_object":
            found.append(StructuredSpec("json_object", param=param))
        else:
            found.append(StructuredSpec(kind, value, param))
    return found


def structured_spec(body: ChatCompletionRequest | CompletionRequest,
                    forced_tools: StructuredSpec | None = None) -> StructuredSpec | None:
    """The one constraint of `body` (None = free text); `forced_tools`: the grammar of a required or
    named tool_choice."""
    found = _from_extras(body)
    if isinstance(body, ChatCompletionRequest) and body.response_format is not None:
        spec = _from_response_format(body.response_format)
        if spec is not None:
            found.append(spec)
    if forced_tools is not None:
        found.append(forced_tools)
    if len(found) > 1:
        raise InvalidRequestError(f"give at most one output constraint, got {', '.join(s.param for s in found)}",
                                  param=found[1].param)
    return found[0] if found else None
