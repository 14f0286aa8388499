"""Tool calls in the model's text -> OpenAI `tool_calls`, incrementally, for streamed and full responses.

The Hermes syntax (the default, `--tool-call-parser hermes`): each call is
`<tool_call>{"name": NAME, "arguments": {...}}</tool_call>`, whitespace allowed around the JSON;
text outside the blocks is the message content (whitespace next to a block is dropped).

Streaming follows OpenAI's shape: a call's first delta carries `index`, `id`, `type` and the name;
the next ones carry pieces of `arguments` whose concatenation is the arguments' JSON text exactly as
the model wrote it. A piece is sent only once it is known to belong to the arguments: text after the
last `}` seen so far might be the `}` that closes the outer object, so it waits. A full response is
the same parser fed the whole text at once, so both carry the same `arguments` strings.

A block whose JSON never shows a name stays content; a call cut off by max_tokens keeps the
arguments written so far (the finish reason is then "length").
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from mcserve.server.api.protocol import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall

PARSERS = ("hermes",)
START, END = "<tool_call>", "</tool_call>"
_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*(?=\S)')


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(slots=True)
class _Call:
    index: int
    id: str = field(default_factory=new_call_id)
    name: str | None = None  # set once the header is seen (and sent)
    args_start: int = 0  # where the arguments begin in the block's body
    sent: str = ""  # arguments text sent so far


class HermesToolParser:
    """`feed(text)` with each new piece of output, then `finish()` once; each returns the content
    to emit and the tool-call deltas. `calls` holds the completed calls."""

    def __init__(self) -> None:
        self._buf = ""  # text not yet attributed to content or a call
        self._call: _Call | None = None  # the block being read
        self._ws = ""  # whitespace held back: dropped if a block follows
        self._after_block = False  # drop whitespace that follows a block
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> tuple[str, list[DeltaToolCall]]:
        self._buf += text
        content: list[str] = []
        deltas: list[DeltaToolCall] = []
        while True:
            if self._call is None:
                i = self._buf.find(START)
                if i < 0:
                    keep = _partial_suffix(self._buf, START)
                    content.append(self._content(self._buf[: len(self._buf) - keep]))
                    self._buf = self._buf[len(self._buf) - keep :]
                    break
                content.append(self._content(self._buf[:i]))
                self._ws = ""
                self._buf = self._buf[i + len(START) :]
                self._call = _Call(len(self.calls))
            else:
                j = self._buf.find(END)
                if j < 0:
                    deltas += self._stream(self._call, self._buf)
                    break
                body, self._buf = self._buf[:j], self._buf[j + len(END) :]
                closed, text_back = self._close(self._call, body)
                deltas += closed
                content.append(self._content(text_back))
                self._call = None
        return "".join(content), deltas

    def finish(self) -> tuple[str, list[DeltaToolCall]]:
        """The end of the output: a cut-off call keeps what it has, held text is released."""
        content, deltas = "", []
        call, rest = self._call, self._buf
        self._call, self._buf = None, ""
        if call is not None:
            if call.name is not None:
                args = rest[call.args_start :].rstrip()
                deltas = _args_delta(call, args)
                self.calls.append(ToolCall(id=call.id, function=FunctionCall(name=call.name, arguments=args)))
            else:
                content = self._content(START + rest)
        else:
            content = self._content(rest)
        if not self.calls:
            content, self._ws = content + self._ws, ""
        return content, deltas

    def _content(self, text: str) -> str:
        """Content as it may go out now: whitespace next to a block is dropped, so whitespace at the
        end is held until something but a block follows."""
        if self._after_block:
            text = text.lstrip()
            if not text:
                return ""
            self._after_block = False
        body = text.rstrip()
        if not body:
            self._ws += text
            return ""
        out, self._ws = self._ws + body, text[len(body) :]
        return out

    def _stream(self, call: _Call, body: str) -> list[DeltaToolCall]:
        deltas = []
        if call.name is None:
            m = _HEADER.match(body)
            if m is None:
                return []
            call.name, call.args_start = json.loads(m.group(1)), m.end()
            deltas.append(DeltaToolCall(index=call.index, id=call.id, type="function",
                                        function=DeltaFunctionCall(name=call.name, arguments="")))
        args = body[call.args_start :]
        last = args.rfind("}")
        safe = args if last < 0 else args[:last]
        return deltas + _args_delta(call, safe)

    def _close(self, call: _Call, body: str) -> tuple[list[DeltaToolCall], str]:
        """A complete block: its deltas, or (when it is no call) the block's text back as content."""
        deltas = self._stream(call, body)
        if call.name is not None:
            args = body[call.args_start :].rstrip()
            args = args[:-1].rstrip() if args.endswith("}") else args  # the outer object's `}`
            deltas += _args_delta(call, args)
            self.calls.append(ToolCall(id=call.id, function=FunctionCall(name=call.name, arguments=call.sent)))
            self._after_block = True
            return deltas, ""
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            obj = None
        if not (isinstance(obj, dict) and isinstance(obj.get("name"), str)):
            return [], START + body + END
        arguments = obj.get("arguments", {})
        args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        call.name = obj["name"]
        self.calls.append(ToolCall(id=call.id, function=FunctionCall(name=call.name, arguments=args)))
        self._after_block = True
        return [DeltaToolCall(index=call.index, id=call.id, type="function",
                              function=DeltaFunctionCall(name=call.name, arguments=args))], ""


def _args_delta(call: _Call, args: str) -> list[DeltaToolCall]:
    """The part of `args` not sent yet (`args` always extends what was sent)."""
    assert args.startswith(call.sent), (args, call.sent)
    piece = args[len(call.sent) :]
    if not piece:
        return []
    call.sent = args
    return [DeltaToolCall(index=call.index, function=DeltaFunctionCall(arguments=piece))]


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
