"""Interactive chat with mcserve (or any OpenAI-compatible server) through the official `openai` client.

    mcserve-chat --url http://127.0.0.1:8000 --api-key secret --session-id me --system "Be brief."

Answers stream as they are generated; after each one a line gives TTFT (send to first text) and the
decode rate ((tokens - 1) / (last text - first text)), plus the prompt and cached tokens the server
reports. The whole conversation is resent every turn, as OpenAI clients do; with `--session-id` mcserve
keeps the conversation's checkpoints under that id, so the next turn prefills only the new message.

Commands: `/reset` starts a new conversation (the system prompt stays), `/exit` (or Ctrl-D) quits.
Ctrl-C during an answer stops it (the server aborts the request) and keeps what arrived so far in the
conversation; a server error is printed and the failed turn is dropped from the conversation.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

HELP = "commands: /reset (new conversation), /exit (quit); Ctrl-C stops an answer"


@dataclass(frozen=True, slots=True)
class TurnStats:
    """Timing of one answer (seconds from sending the request)."""

    elapsed_s: float
    ttft_s: float | None = None
    last_s: float | None = None  # the last text chunk
    completion_tokens: int = 0
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    interrupted: bool = False

    @property
    def tokens_per_s(self) -> float | None:
        """Decode rate after the first token (None with fewer than two tokens)."""
        if self.ttft_s is None or self.last_s is None or self.completion_tokens < 2 or self.last_s <= self.ttft_s:
            return None
        return (self.completion_tokens - 1) / (self.last_s - self.ttft_s)

    def describe(self) -> str:
        parts = ["TTFT " + ("-" if self.ttft_s is None else f"{self.ttft_s:.3f} s")]
        rate = self.tokens_per_s
        parts.append("-" if rate is None else f"{rate:.1f} tokens/s")
        parts.append(f"{self.completion_tokens} tokens in {self.elapsed_s:.2f} s")
        if self.prompt_tokens is not None:
            cached = "" if self.cached_tokens is None else f", {self.cached_tokens} cached"
            parts.append(f"prompt {self.prompt_tokens}{cached}")
        return "[" + " | ".join(parts) + ("] interrupted" if self.interrupted else "]")


def error_text(e: Exception) -> str:
    """The server's own message for an openai error (its body's `message`), else the exception's."""
    import openai

    body = getattr(e, "body", None)
    message = body.get("message") if isinstance(body, dict) else None
    if isinstance(e, openai.APIStatusError):
        return f"{e.status_code}: {message or e.message}"
    if isinstance(e, openai.APIConnectionError):
        request = getattr(e, "request", None)
        return f"cannot reach {request.url if request is not None else 'the server'}: {e.message}"
    return str(message or e)


class ChatSession:
    """One conversation: the message history and the request options."""

    def __init__(
        self,
        client: Any,  # openai.OpenAI
        model: str,
        *,
        system: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        session_id: str | None = None,
    ) -> None:
        self.client, self.model = client, model
        self.system = system
        self.options: dict[str, Any] = {}
        if temperature is not None:
            self.options["temperature"] = temperature
        if max_tokens is not None:
            self.options["max_tokens"] = max_tokens
        if session_id:
            # The header is what a session-affine router hashes on (deploy/nginx); the body field is
            # mcserve's API. mcserve requires the two to agree.
            self.options["extra_headers"] = {"X-Session-Id": session_id}
            self.options["extra_body"] = {"session_id": session_id}
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def ask(self, text: str, write: Callable[[str], None]) -> TurnStats:
        """Send `text`, passing the answer's pieces to `write` as they arrive. Ctrl-C stops the
        answer (returned with `interrupted`); an openai error leaves the history as it was."""
        self.messages.append({"role": "user", "content": text})
        pieces: list[str] = []
        start = time.perf_counter()
        first = last = None
        usage = None
        interrupted = False
        stream = None
        try:
            stream = self.client.chat.completions.create(
                model=self.model,
                messages=self.messages,
                stream=True,
                stream_options={"include_usage": True},
                **self.options,
            )
            for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    if choice.delta.content:
                        last = time.perf_counter() - start
                        first = last if first is None else first
                        pieces.append(choice.delta.content)
                        write(choice.delta.content)
        except KeyboardInterrupt:
            interrupted = True
            if stream is not None:
                stream.close()  # closes the connection: the server aborts the request
        except Exception:
            self.messages.pop()  # the failed turn is not part of the conversation
            raise
        answer = "".join(pieces)
        if answer:
            self.messages.append({"role": "assistant", "content": answer})
        else:
            self.messages.pop()  # nothing came back: forget the question too
        details = getattr(usage, "prompt_tokens_details", None)
        return TurnStats(
            elapsed_s=time.perf_counter() - start,
            ttft_s=first,
            last_s=last,
            completion_tokens=usage.completion_tokens if usage is not None else len(pieces),
            prompt_tokens=usage.prompt_tokens if usage is not None else None,
            cached_tokens=getattr(details, "cached_tokens", None),
            interrupted=interrupted,
        )


def repl(session: ChatSession, read_line: Callable[[str], str], out: TextIO) -> int:
    """Read lines until /exit or end of input; returns the exit status."""
    import openai

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    while True:
        try:
            line = read_line("you> ").strip()
        except EOFError:
            write("\n")
            return 0
        except KeyboardInterrupt:
            write("\n(/exit or Ctrl-D to quit)\n")
            continue
        if not line:
            continue
        if line.startswith("/"):
            command = line.split()[0].lower()
            if command in ("/exit", "/quit"):
                return 0
            if command == "/reset":
                session.reset()
                write("(new conversation)\n")
            else:
                write(HELP + "\n")
            continue
        write("assistant> ")
        try:
            stats = session.ask(line, write)
        except openai.APIError as e:
            write(f"\nerror {error_text(e)}\n")
            continue
        write("\n" + stats.describe() + "\n")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mcserve-chat", description="Chat with an OpenAI-compatible server.")
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="server URL, with or without /v1")
    ap.add_argument("--api-key", default=None, help="bearer key (default: $OPENAI_API_KEY, else none)")
    ap.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    ap.add_argument("--system", default=None, help="system prompt")
    ap.add_argument("--temperature", type=float, default=None)
    ap.add_argument("--max-tokens", type=int, default=None, help="cap on each answer (default: the server's)")
    ap.add_argument("--session-id", default=None, help="mcserve keeps this conversation's cache under this id")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    return ap


def main(argv: list[str] | None = None, *, read_line: Callable[[str], str] = input, out: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = sys.stdout if out is None else out
    try:
        import openai
    except ImportError:
        print("mcserve-chat needs the openai package: pip install openai", file=sys.stderr)
        return 2
    url = args.url.rstrip("/")
    base_url = url if url.endswith("/v1") else url + "/v1"
    # The client insists on a key; servers without keys ignore the header.
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY") or "none"
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=args.timeout)
    try:
        model = args.model or client.models.list().data[0].id
    except (openai.APIError, IndexError) as e:
        what = error_text(e) if isinstance(e, openai.APIError) else "the server lists no model"
        print(f"mcserve-chat: cannot list models at {base_url}: {what}", file=sys.stderr)
        return 1
    session = ChatSession(
        client,
        model,
        system=args.system,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        session_id=args.session_id,
    )
    out.write(f"{model} at {base_url}; {HELP}\n")
    try:
        return repl(session, read_line, out)
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
