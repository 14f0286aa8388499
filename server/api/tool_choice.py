"""What `tools` and `tool_choice` mean for one chat request: the tools the template renders, whether
the output is parsed for calls, and the grammar that forces calls.

- "none": tools are not rendered and the output is not parsed;
- "auto" (the default with tools): rendered, parsed; the model decides;
- "required": the grammar forces one or more Hermes blocks (only one with `parallel_tool_calls:
  false`), each `{"name": <one of the tools>, "arguments": <that tool's parameters schema>}`;
- a named function: the same with that function only, one call.
The forced JSON is compact (no free whitespace), as in structured/compiler.py.
"""

from __future__ import annotations

import json
from typing import Any

from mcserve.server.api.protocol import ChatCompletionRequest, ChatTool, NamedToolChoice
from mcserve.server.api.tool_calls import END, START
from mcserve.server.engine.structured.spec import StructuredSpec
from mcserve.server.errors import InvalidRequestError

_ANY_OBJECT: dict[str, Any] = {"type": "object"}


def rendered_tools(body: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    """The tools as the chat template sees them (OpenAI's shape, as plain dicts)."""
    if not body.tools or body.tool_choice == "none":
        return None
    return [t.model_dump(exclude_none=True) for t in body.tools]


def parses_tool_calls(body: ChatCompletionRequest) -> bool:
    return bool(body.tools) and body.tool_choice != "none"


def _call_schema(tool: ChatTool) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, "arguments": tool.function.parameters or _ANY_OBJECT},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def forced_tool_spec(body: ChatCompletionRequest) -> StructuredSpec | None:
    """The grammar of a "required" or named tool_choice; None when the model may answer freely."""
    choice = body.tool_choice
    if choice is None or choice in ("none", "auto"):
        return None
    if not body.tools:
        raise InvalidRequestError(f"tool_choice {_describe(choice)} needs tools", param="tool_choice")
    tools = body.tools
    parallel = body.parallel_tool_calls is not False
    if isinstance(choice, NamedToolChoice):
        tools = [t for t in body.tools if t.function.name == choice.function.name]
        if not tools:
            names = [t.function.name for t in body.tools]
            raise InvalidRequestError(f"tool_choice names {choice.function.name!r}, which is not among the tools "
                                      f"{names}", param="tool_choice.function.name")
        parallel = False
    schemas = [_call_schema(t) for t in tools]
    schema: dict[str, Any] = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    schema = {**schema, "x-guidance": {"whitespace_flexible": False}}
    call = f"call: {json.dumps(START + chr(10))} %json {json.dumps(schema)} {json.dumps(chr(10) + END)}"
    start = 'start: call ("\\n" call)*' if parallel else "start: call"
    return StructuredSpec("grammar", f"{start}\n{call}\n", "tools")


def _describe(choice: object) -> str:
    return repr(choice) if isinstance(choice, str) else "naming a function"
