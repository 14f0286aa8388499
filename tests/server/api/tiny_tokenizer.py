"""A stand-in for server/text/tokenizer.py's `Tokenizer` in the API tests: one token per UTF-8 byte.

Ids: 0 pad, 1 bos, 2 eos, 3 + byte. The chat template is fixed and, like real templates, refuses
some conversations (a system message after the first turn).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jinja2

PAD, BOS, EOS, OFFSET = 0, 1, 2, 3


class TinyTokenizer:
    vocab_size = 256 + OFFSET
    max_token_bytes = 1  # every token of an encoding is one byte of the text
    eos_token_ids = (EOS,)
    bos_token_id = BOS

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [b + OFFSET for b in text.encode("utf-8")]
        return [BOS, *ids] if add_special_tokens else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return bytes(i - OFFSET for i in ids if i >= OFFSET).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return bytes([token_id - OFFSET]) if token_id >= OFFSET else ("<pad>", "<s>", "</s>")[token_id].encode()

    def token_text(self, token_id: int) -> str:
        return "</s>" if token_id == EOS else self.decode([token_id])

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        out = ["<s>"] + ([f"<|tools|>{len(tools)}\n"] if tools else [])
        for i, m in enumerate(messages):
            if m["role"] == "system" and i > 0:
                raise jinja2.TemplateError("the system message must come first")
            out.append(f"<|{m['role']}|>{m['content']}\n")
        if add_generation_prompt:
            out.append("<|assistant|>")
        return "".join(out)
