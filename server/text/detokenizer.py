"""Streaming token ids -> text: never half a character, stop strings matched across token boundaries.

Decoding the whole sequence on every step is O(n^2) over a generation. Instead only a short window
is decoded: a few already-emitted "context" tokens (so decoders that drop a leading space, e.g.
Metaspace, see what came before) followed by the tokens not yet emitted. The new text is the decode
of the window minus the decode of the context.

Byte-level BPE tokens can end in the middle of a multi-byte UTF-8 character; the decoder then
yields U+FFFD for the incomplete tail. Such a tail is held back until later tokens complete it.

Fast path: `tokenizers`' `DecodeStream` (0.21+), given as `stream(context_ids) -> step(id)`, does the
same per token in one Rust call (2 to 6 times faster on the default model's tokenizer). It alone is
not enough: it holds bytes that never form a character (an untrained model repeating a lead byte)
forever, and has no flush, so text would be lost. So the tokens it holds are tracked here; past
MAX_PENDING of them, and at `flush`, they are decoded by the window rule above (emitting their
U+FFFD) and a fresh stream starts from the last CONTEXT_TOKENS. Both paths give the text of
decoding everything at once (tests/server/text/test_detokenizer.py checks them against each other).

Fastest path, for a decoder that maps each token to its bytes and concatenates them (byte-level BPE):
`texts[id]`, the text of a token whose bytes are whole characters on their own (None for the others
and for added tokens). Pushed while nothing is pending and the stream's text ends on a whole
character, such a token adds exactly its own text, so it is emitted without the Rust call (about a
microsecond per token and step). The stream does not see it, which changes nothing it emits later:
with such a decoder the text after a whole character does not depend on the tokens before it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

Step = Callable[[int], "str | None"]  # DecodeStream.step bound to a tokenizer: text, or None while holding

REPLACEMENT_CHAR = "\ufffd"
# Emitted tokens kept as decoding context before the first unemitted token.
CONTEXT_TOKENS = 4
# A UTF-8 character is at most 4 bytes and every byte-level token is at least one byte, so if the text
# is valid, one of the last 4 token boundaries is a character boundary.
CUT_SEARCH = 4
# Past this many unemitted tokens with no clean boundary, the U+FFFD are real (invalid bytes, e.g. an
# untrained model repeating a lead byte): emit them so the window, and the cost per step, stay bounded.
MAX_PENDING = 16


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text.

    `decode(ids) -> str` decodes a list of ids (special-token skipping is decided by the caller).
    `prompt_ids`: the prompt, used only as decoding context for the first generated tokens.
    `stop`: strings that end the text. Text that could be the start of a stop string is held back
    until it is known not to be one. When a stop string completes, `push` returns the text before it
    (and the stop string itself with `include_stop_str_in_output`), then `stopped` is True and
    `stop_reason` is the stop string; later pushes return "".
    The stop string that completes first (earliest end, then longest) wins.

    Invariant: the concatenation of all `push` results and `flush()` equals decoding all pushed ids
    at once (when no stop string hit and no prompt context was given).
    """

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        *,
        prompt_ids: Sequence[int] | None = None,
        stop: Iterable[str] = (),
        include_stop_str_in_output: bool = False,
        stream: Callable[[list[int]], Step] | None = None,
        texts: Sequence[str | None] | None = None,
    ) -> None:
        """`stream(context_ids)`: a fresh DecodeStream step function seeded with context (fast path);
        `texts`: each token's own text where it is whole characters, else None (only for a decoder that
        concatenates per-token bytes; needs `stream`)."""
        self._stops = tuple(stop)
        for s in self._stops:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        self._decode = decode
        # _tokens = context tokens (already emitted) + pending tokens; _read is where pending starts.
        self._tokens: list[int] = [int(i) for i in prompt_ids[-CONTEXT_TOKENS:]] if prompt_ids is not None else []
        self._read = len(self._tokens)
        self._stream = stream
        self._step: Step | None = None
        self._texts = texts if stream is not None else None
        self._context_text = decode(self._tokens) if self._tokens else ""  # window path: decode of _tokens[:_read]
        self._start_stream()
        self._max_stop_len = max((len(s) for s in self._stops), default=0)
        self._stop_first_chars = frozenset(s[0] for s in self._stops)
        self._include_stop = include_stop_str_in_output
        # Text examined for stop strings but not yet matched: held back (not emitted) normally;
        # already emitted with include_stop_str_in_output, kept only to match across pushes.
        self._tail = ""
        self.stopped = False
        self.stop_reason: str | None = None

    def push(self, ids: int | Iterable[int], check_stop: bool = True) -> str:
        """Adds token ids; returns the text they complete (possibly "").

        `check_stop=False` (before a request's `min_tokens` are reached, as vLLM does): stop strings
        do not count yet; text held back for a possible stop is released. A stop string that starts
        in such text and ends after it is not matched."""
        if self.stopped:
            return ""
        if self._texts is not None and type(ids) is int and self._step is not None \
                and self._read == len(self._tokens) and (delta := self._texts[ids]) is not None:
            tokens = self._tokens  # nothing pending and a whole character before: the token's own text
            tokens.append(ids)
            if len(tokens) > CONTEXT_TOKENS:
                del tokens[0]
            self._read = len(tokens)
        else:
            delta = self._push_ids([ids] if isinstance(ids, int) else list(ids))
        if not check_stop:
            out = delta if self._include_stop else self._tail + delta  # with include_stop the tail was sent
            self._tail = ""
            return out
        if not self._stops or (not self._tail and self._stop_first_chars.isdisjoint(delta)):
            return delta  # _match_stops' first two cases, without the call
        return self._match_stops(delta, final=False)

    def _push_ids(self, ids: list[int]) -> str:
        if self._step is not None:
            delta = self._read_stream(ids)
        else:
            self._tokens.extend(ids)
            delta = self._read_text(final=False)
            self._start_stream()
        return delta

    def flush(self) -> str:
        """Returns all held-back text; call once when the sequence ended for a reason other than a stop."""
        if self.stopped:
            return ""
        if self._step is not None:
            return self._match_stops(self._release_held(), final=True)
        return self._match_stops(self._read_text(final=True), final=True)  # window path (also after a fallback)

    def _start_stream(self) -> None:
        """Switch to the stream path when nothing is pending and the context ends on a whole character
        (a DecodeStream seeded with a context that ends inside one re-emits part of the context)."""
        if self._stream is None or self._step is not None or self._read != len(self._tokens):
            return
        if not self._context_text.endswith(REPLACEMENT_CHAR):
            self._step = self._stream(list(self._tokens))

    def _read_stream(self, ids: list[int]) -> str:
        assert self._step is not None
        out = []
        for t in ids:
            self._tokens.append(t)
            piece = self._step(t)
            if piece is not None:
                out.append(piece)
                del self._tokens[: max(0, len(self._tokens) - CONTEXT_TOKENS)]  # all emitted: keep context
                self._read = len(self._tokens)
            elif len(self._tokens) - self._read > MAX_PENDING:
                out.append(self._release_held())
        return "".join(out)

    def _release_held(self) -> str:
        """The text of the tokens the stream holds (U+FFFD for bytes that form no character), by the
        window rule; then a fresh stream from the last CONTEXT_TOKENS."""
        if len(self._tokens) == self._read:
            return ""
        context = self._decode(self._tokens[: self._read])
        text = self._decode(self._tokens)
        delta = text[len(context) :] if text.startswith(context) else text[_common_prefix_len(context, text) :]
        del self._tokens[: max(0, len(self._tokens) - CONTEXT_TOKENS)]
        self._read = len(self._tokens)
        self._context_text = self._decode(self._tokens)
        self._step = None
        self._start_stream()
        return delta

    def _read_text(self, final: bool) -> str:
        end = len(self._tokens)
        if end == self._read:
            return ""
        cut, text = end, None
        if final:
            text = self._decode(self._tokens)
        else:
            for cut in range(end, max(self._read, end - CUT_SEARCH), -1):
                candidate = self._decode(self._tokens[:cut])
                if not candidate.endswith(REPLACEMENT_CHAR):
                    text = candidate
                    break
            if text is None:
                if end - self._read <= MAX_PENDING:
                    return ""
                cut, text = end, self._decode(self._tokens)
        context = self._context_text
        if text.startswith(context):
            delta = text[len(context) :]
        else:
            # The context itself ended inside a character (only possible for caller-given prompt ids or
            # forced output): emit what follows the part both decodes share.
            delta = text[_common_prefix_len(context, text) :]
        start = max(0, cut - CONTEXT_TOKENS)
        del self._tokens[:start]
        self._read = cut - start
        self._context_text = self._decode(self._tokens[: self._read])
        return delta

    def _match_stops(self, delta: str, final: bool) -> str:
        if not self._stops:
            return delta
        buf = self._tail + delta if self._tail else delta
        if self._stop_first_chars.isdisjoint(buf):  # the usual case: no stop string starts in buf
            self._tail = ""
            return delta if self._include_stop else buf
        hit = self._find_stop(buf)
        if hit is not None:
            start, stop = hit
            self.stopped = True
            self.stop_reason = stop
            if self._include_stop:
                # _tail was already emitted; everything up to the end of the stop string is new.
                return buf[len(self._tail) : start + len(stop)]
            self._tail = ""
            return buf[:start]
        if self._include_stop:
            self._tail = buf[max(0, len(buf) - (self._max_stop_len - 1)) :] if self._max_stop_len > 1 else ""
            return delta
        if final:
            self._tail = ""
            return buf
        keep = self._partial_stop_len(buf)
        self._tail = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def _find_stop(self, buf: str) -> tuple[int, str] | None:
        best: tuple[int, int, str] | None = None  # (end, -len, stop)
        for s in self._stops:
            i = buf.find(s)
            if i >= 0 and (best is None or (i + len(s), -len(s)) < best[:2]):
                best = (i + len(s), -len(s), s)
        return None if best is None else (best[0] + best[1], best[2])

    def _partial_stop_len(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of some stop string."""
        first = max(0, len(buf) - (self._max_stop_len - 1))
        for i in range(first, len(buf)):
            if buf[i] in self._stop_first_chars:
                tail = buf[i:]
                if any(s.startswith(tail) for s in self._stops):
                    return len(buf) - i
        return 0


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
