"""Text <-> token ids, chat templates, and the special-token ids the engine stops on.

Loads a Hugging Face `tokenizers` file (`tokenizer.json`) plus the optional `tokenizer_config.json`
(chat_template, bos/eos/pad tokens, add_bos_token).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers.decoders import DecodeStream

from mcserve.server.errors import ModelLoadError
from mcserve.server.text.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer
from mcserve.server.text.templates import DEFAULT_CHAT_TEMPLATE
from mcserve.server.text.token_bytes import TokenBytes

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"  # newer HF checkpoints keep the template in its own file
DEFAULT_EOS_TOKEN = "<|endoftext|>"
CHATML_END_TOKEN = "<|im_end|>"

class TokenizerLoadError(ModelLoadError):
    """tokenizer.json / tokenizer_config.json cannot be used. The message names the file and field."""


class ChatTemplateError(ValueError):
    """Rendering the chat template failed (a template bug, or `raise_exception` called by it)."""


class Tokenizer:
    """A loaded tokenizer. Build with `Tokenizer.from_dir`, or directly from a `tokenizers.Tokenizer`.

    `chat_template` is a Jinja2 source string, or a {name: source} dict whose "default" entry is used
    (and "tool_use", if present, when tools are given); None means DEFAULT_CHAT_TEMPLATE.
    `tool_call_parser`: tokenizer_config.json's `tool_call_parser` (the model's tool-call syntax, e.g. "hermes").
    `source` names the config file in error messages.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        add_bos_token: bool = False,
        chat_template: str | Mapping[str, str] | None = None,
        tool_call_parser: str | None = None,
        source: str = CONFIG_FILE,
    ) -> None:
        self._backend = backend
        self.tool_call_parser = tool_call_parser
        self._token_bytes = TokenBytes(backend)
        vocab = backend.get_vocab(with_added_tokens=True)
        # One more than the largest id, so it sizes an embedding table even if ids have gaps.
        self._vocab_size = max(vocab.values(), default=-1) + 1
        if eos_token is None and DEFAULT_EOS_TOKEN in vocab:
            eos_token = DEFAULT_EOS_TOKEN
        self._bos_token, self._eos_token, self._pad_token = bos_token, eos_token, pad_token
        self._bos_id = _lookup(vocab, bos_token, "bos_token", source)
        self._eos_id = _lookup(vocab, eos_token, "eos_token", source)
        self._pad_id = _lookup(vocab, pad_token, "pad_token", source)
        if add_bos_token and self._bos_id is None:
            raise TokenizerLoadError(source, "add_bos_token", "is true but 'bos_token' is not set")
        self._add_bos = add_bos_token

        sources = _named_templates(chat_template, source)
        env = _jinja_env()
        self._templates: dict[str, jinja2.Template] = {}
        for name, text in sources.items():
            try:
                self._templates[name] = env.from_string(text)
            except jinja2.TemplateSyntaxError as e:
                raise TokenizerLoadError(
                    source, "chat_template", f"template {name!r} is not valid Jinja2: {e} (line {e.lineno})"
                ) from e

        eos_ids = {self._eos_id} if self._eos_id is not None else set()
        if CHATML_END_TOKEN in vocab and any(CHATML_END_TOKEN in t for t in sources.values()):
            eos_ids.add(vocab[CHATML_END_TOKEN])
        self._eos_ids = frozenset(eos_ids)
        special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        special |= {i for i in (self._bos_id, self._eos_id, self._pad_id) if i is not None} | self._eos_ids
        self._special_ids = frozenset(special)
        self._max_token_bytes = _max_token_bytes(backend)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        root = Path(path)
        tok_path = root / TOKENIZER_FILE
        text = _read_text(tok_path, required=True)
        assert text is not None
        _parse_json(text, tok_path)
        try:
            backend = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # the Rust side raises a bare Exception for schema errors
            raise TokenizerLoadError(str(tok_path), None, f"not a valid tokenizers file: {e}") from e

        cfg_path = root / CONFIG_FILE
        cfg_text = _read_text(cfg_path, required=False)
        cfg = {} if cfg_text is None else _parse_json(cfg_text, cfg_path)
        if not isinstance(cfg, dict):
            raise TokenizerLoadError(str(cfg_path), None, f"must be a JSON object, got {type(cfg).__name__}")
        src = str(cfg_path)
        add_bos = cfg.get("add_bos_token", False)
        if not isinstance(add_bos, bool):
            raise TokenizerLoadError(src, "add_bos_token", f"must be true or false, got {add_bos!r}")
        parser = cfg.get("tool_call_parser")
        if parser is not None and not isinstance(parser, str):
            raise TokenizerLoadError(src, "tool_call_parser", f"must be a string, got {parser!r}")
        template = cfg.get("chat_template")
        if template is None:
            template = _read_text(root / TEMPLATE_FILE, required=False)
        return cls(
            backend,
            bos_token=_token_field(cfg, "bos_token", src),
            eos_token=_token_field(cfg, "eos_token", src),
            pad_token=_token_field(cfg, "pad_token", src),
            add_bos_token=add_bos,
            chat_template=_template_field(template, src),
            tool_call_parser=parser,
            source=src,
        )

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._backend

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_id

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Ids that end a generation: eos, plus <|im_end|> when the chat template emits it."""
        return self._eos_ids

    @property
    def pad_token_id(self) -> int | None:
        return self._pad_id

    @property
    def all_special_ids(self) -> frozenset[int]:
        return self._special_ids

    @property
    def max_token_bytes(self) -> int | None:
        """L such that every token of an encoding covers between 1 and L bytes of the UTF-8 input, so
        a text of b bytes has at least ceil(b / L) tokens; None when that cannot be shown for this
        tokenizer (see `_max_token_bytes`)."""
        return self._max_token_bytes

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Special-token strings in `text` (e.g. "<|im_start|>") encode to their ids. The batch call
        releases the GIL while Rust encodes (the single-text `encode` does not), so a long prompt
        encoded in a worker thread does not stall the event loop."""
        ids = self._backend.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids
        # The tokenizers post-processor may already have added bos; never add it twice.
        if add_special_tokens and self._add_bos and (not ids or ids[0] != self._bos_id):
            ids.insert(0, self._bos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        bad = next((i for i in ids if not (isinstance(i, int) and 0 <= i < self._vocab_size)), None)
        if bad is not None:
            raise ValueError(f"token id {bad!r} is out of range for vocab size {self._vocab_size}")
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes of one token (part of a UTF-8 character for some; special tokens as text)."""
        return self._token_bytes(token_id)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def detokenizer(
        self,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
        *,
        stop: Iterable[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> IncrementalDetokenizer:
        decode = partial(self._backend.decode, skip_special_tokens=skip_special_tokens)
        backend = self._backend

        def stream(context: list[int]) -> Callable[[int], str | None]:
            return partial(DecodeStream(ids=context, skip_special_tokens=skip_special_tokens).step, backend)

        return IncrementalDetokenizer(
            decode, prompt_ids=prompt_ids, stop=stop, include_stop_str_in_output=include_stop_str_in_output,
            stream=stream, texts=self._whole_texts,
        )

    def prepare_detokenizers(self) -> None:
        """Build what `detokenizer` shares between choices now (the per-token text table: one decode of
        the whole vocabulary), so that the first request does not wait for it."""
        self._whole_texts  # noqa: B018 -- the cached property's side effect

    @cached_property
    def _whole_texts(self) -> list[str | None] | None:
        """Each token's own text where its bytes are whole UTF-8 characters (None for the others and
        for added tokens), when the decoder maps each token to its bytes and concatenates them (a lone
        `ByteLevel`): then such a token's text never depends on its neighbours. None for any other
        decoder (Metaspace's first-space rule, Fuse, Strip ... do)."""
        decoder = json.loads(self._backend.to_str()).get("decoder")
        if not isinstance(decoder, dict) or decoder.get("type") != "ByteLevel":
            return None
        added = self._backend.get_added_tokens_decoder()
        texts = self._backend.decode_batch([[i] for i in range(self._vocab_size)], skip_special_tokens=False)
        return [t if t and REPLACEMENT_CHAR not in t and i not in added else None for i, t in enumerate(texts)]

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        """Renders `messages` (role and string content, as `server/text/chat.py`'s `template_messages`
        makes them from OpenAI messages with content parts) to the prompt string.

        `extra` becomes extra template variables. Content that is not a string or None raises ValueError.
        """
        template = self._templates["default"]
        if tools and "tool_use" in self._templates:
            template = self._templates["tool_use"]
        variables = {
            **extra,
            "messages": check_messages(messages),
            "tools": tools,
            "bos_token": self._bos_token or "",
            "eos_token": self._eos_token or "",
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return template.render(**variables)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template error: {e}") from e
        except (TypeError, KeyError, IndexError, AttributeError, ValueError) as e:
            raise ChatTemplateError(f"chat template error: {type(e).__name__}: {e}") from e


def _max_token_bytes(backend: tokenizers.Tokenizer) -> int | None:
    """The longest token in input bytes, when every token provably covers >= 1 and <= that many bytes.

    Shown for byte-level BPE without a normalizer: the ByteLevel pre-tokenizer maps each input byte to
    one character of its 256-character alphabet, and if the vocabulary holds all 256, BPE never drops
    input (no unknowns), so every token is a run of >= 1 whole bytes and its length in characters is
    its length in bytes; added tokens match their literal content in the raw text. A normalizer could
    shrink the text (NFC composition, stripping), and other models may map a whole word to one unknown
    token, so no bound is claimed for them. The post-processor only adds tokens.
    """
    from tokenizers.models import BPE
    from tokenizers.pre_tokenizers import ByteLevel

    if backend.normalizer is not None or not isinstance(backend.pre_tokenizer, ByteLevel):
        return None
    if not isinstance(backend.model, BPE):
        return None
    vocab = backend.get_vocab(with_added_tokens=False)
    alphabet = set(ByteLevel.alphabet())
    if not alphabet <= vocab.keys():
        return None
    # One character of the alphabet is one input byte. An entry with other characters can never be
    # produced; its UTF-8 length is an upper bound anyway.
    longest = max(len(t) if alphabet.issuperset(t) else len(t.encode()) for t in vocab)
    added = [len(t.content.encode()) for t in backend.get_added_tokens_decoder().values()]
    return max([longest, *added])


def check_messages(messages: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """`messages` as a list, each an object with a string role and string (or None) content."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of objects, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be an object, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str):
            raise ValueError(f"messages[{i}].role must be a string, got {role!r}")
        if content is not None and not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string or None, got {type(content).__name__} "
                             "(server/text/chat.py's template_messages flattens OpenAI content parts)")
    return list(messages)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's built-in tojson HTML-escapes <, >, & and '; prompts need the JSON verbatim.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _jinja_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _lookup(vocab: dict[str, int], token: str | None, field: str, source: str) -> int | None:
    if token is None:
        return None
    if token not in vocab:
        raise TokenizerLoadError(source, field, f"{token!r} is not in the vocabulary ({len(vocab)} tokens)")
    return vocab[token]


def _read_text(path: Path, required: bool) -> str | None:
    if not path.is_file():
        if required:
            raise TokenizerLoadError(str(path), None, "file not found")
        return None
    return path.read_text(encoding="utf-8")


def _parse_json(text: str, path: Path) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TokenizerLoadError(str(path), None, f"invalid JSON: {e}") from e


def _token_field(cfg: dict[str, Any], field: str, source: str) -> str | None:
    """A token is a string or an HF AddedToken-like object {"content": ...}."""
    value = cfg.get(field)
    if isinstance(value, Mapping):
        value = value.get("content")
    if value is None or isinstance(value, str):
        return value
    raise TokenizerLoadError(source, field, f"must be a string or an object with 'content', got {cfg[field]!r}")


def _template_field(value: Any, source: str) -> str | dict[str, str] | None:
    """HF allows a string or a list of {"name": ..., "template": ...}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(t, Mapping) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in value
    ):
        return {t["name"]: t["template"] for t in value}
    raise TokenizerLoadError(
        source,
        "chat_template",
        f"must be a string or a list of {{name, template}} objects, got {value!r:.200}",
    )


def _named_templates(value: str | Mapping[str, str] | None, source: str) -> dict[str, str]:
    if value is None:
        return {"default": DEFAULT_CHAT_TEMPLATE}
    if isinstance(value, str):
        return {"default": value}
    if "default" not in value:
        raise TokenizerLoadError(source, "chat_template", f"has no 'default' template, only {sorted(value)}")
    return dict(value)
