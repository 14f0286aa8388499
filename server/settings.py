"""Settings of the server process (HTTP front end, CPU threads, watchdog), and the one place that
reads `MCSERVE_*` environment variables.

Precedence: command-line flag > environment variable > default. `ApiSettings.from_env(env, **flags)`
applies it; nothing else in the package reads `os.environ`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

from mcserve.server.errors import ConfigError

ENV_PREFIX = "MCSERVE_"

# 8 MiB: a full 128K-token prompt sent as a JSON list of token ids is ~1 MB, a 128K-token text
# prompt ~0.5 MB, so 8 MiB leaves room for long multi-turn chats while bounding what one request
# can make the server buffer.
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
# All request headers together. Below h11's own 16 KiB cap (which answers a bare 400), so the client
# gets an OpenAI-style 431 instead; a bearer token and the usual headers take well under 1 KiB.
DEFAULT_MAX_HEADER_BYTES = 8 * 1024
# A step this long is reported (metrics, /health): CPU steps of the default model take milliseconds
# and a full 2,048-token prefill chunk well under a second.
DEFAULT_SLOW_STEP_S = 10.0

TOOL_CALL_PARSERS = ("hermes", "none")
# A request that names no max_tokens gets at most this many: OpenAI's chat API and vLLM default to the
# rest of the context (8K tokens on the default model: minutes of output for a forgotten field), the
# legacy completions API to 16 (too short for a chat answer). 1024 is a long chat answer and bounds a
# default request to seconds on a GPU.
DEFAULT_MAX_TOKENS = 1024
# Seconds a SIGTERM'd server lets in-flight requests finish; must fit in the orchestrator's grace period
# (deploy/k8s: terminationGracePeriodSeconds = preStop sleep + this + a margin).
DEFAULT_DRAIN_TIMEOUT_S = 30.0
# Sessions that finished a turn are saved this often (and at shutdown): a kill -9 loses at most this
# much of every conversation.
DEFAULT_SESSION_SAVE_INTERVAL_S = 60.0

_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """How the HTTP server listens and what it accepts.

    `api_keys`: empty = no authentication; otherwise every endpoint except /health, /metrics and
    /version needs `Authorization: Bearer <one of them>`. From `--api-key` (repeatable) and
    `--api-key-file`, else MCSERVE_API_KEY / MCSERVE_API_KEYS (comma-separated) / MCSERVE_API_KEY_FILE.
    `allowed_origins`: browser origins allowed by CORS (empty: no CORS headers at all).
    `log_requests`: log prompts and completions (off: no request or response text is ever logged).
    `max_header_bytes`: larger request headers (all together) get 431.
    `threads`: the engine's intra-op CPU threads (None: from the process's CPU allowance).
    `slow_step_s`: an engine step longer than this is counted and shown on /health.
    `served_model_name`: the name clients pass as `model` (None = the engine's `model_name`).
    `max_body_bytes`: larger request bodies get 413, counted on the bytes actually received.
    `sse_ping_s`: keep-alive comment interval on idle streams (0 = never).
    `model_notice`: an operator's note on the model (MCSERVE_MODEL_NOTICE), shown in /v1/models and at start-up.
    `tool_call_parser`: the model's tool-call syntax, "hermes" or "none" (None = tokenizer_config.json's
    `tool_call_parser`, else "hermes").
    `default_max_tokens`: the output cap of a request that gives no max_tokens (MCSERVE_DEFAULT_MAX_TOKENS).
    `drain_timeout`: seconds in-flight requests may run after SIGTERM before they are cut with an error
    event (MCSERVE_DRAIN_TIMEOUT); new requests get 503 as soon as the drain starts.
    `session_dir`: where named sessions are saved and restored from (MCSERVE_SESSION_DIR; None: sessions
    live in memory only); `session_save_interval_s`: how often changed sessions are saved (0: only on
    request and at shutdown).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    served_model_name: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    log_level: str = "info"
    sse_ping_s: float = 15.0
    model_notice: str | None = None
    allowed_origins: tuple[str, ...] = ()
    log_requests: bool = False
    threads: int | None = None
    slow_step_s: float = DEFAULT_SLOW_STEP_S
    tool_call_parser: str | None = None
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT_S
    session_dir: str | None = None
    session_save_interval_s: float = DEFAULT_SESSION_SAVE_INTERVAL_S

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError(f"host must be a non-empty string, got {self.host!r}")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in [0, 65535], got {self.port!r}")
        if not isinstance(self.api_keys, tuple) or not all(isinstance(k, str) and k for k in self.api_keys):
            raise ConfigError(f"api_keys must be a tuple of non-empty strings, got {self.api_keys!r}")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise ConfigError(f"served_model_name must not be blank, got {self.served_model_name!r}")
        if not isinstance(self.max_body_bytes, int) or self.max_body_bytes < 1024:
            raise ConfigError(f"max_body_bytes must be an integer >= 1024, got {self.max_body_bytes!r}")
        if not isinstance(self.max_header_bytes, int) or self.max_header_bytes < 1024:
            raise ConfigError(f"max_header_bytes must be an integer >= 1024, got {self.max_header_bytes!r}")
        if not isinstance(self.allowed_origins, tuple) or not all(
            isinstance(o, str) and o and o == o.strip() for o in self.allowed_origins
        ):
            raise ConfigError(
                f"allowed_origins must be a tuple of origins like https://app.example, got {self.allowed_origins!r}"
            )
        if self.threads is not None and (
            isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1
        ):
            raise ConfigError(f"threads must be a positive integer, got {self.threads!r}")
        if not isinstance(self.slow_step_s, (int, float)) or not self.slow_step_s > 0:
            raise ConfigError(f"slow_step_s must be > 0, got {self.slow_step_s!r}")
        if self.log_level not in _LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {_LOG_LEVELS}, got {self.log_level!r}")
        if not isinstance(self.sse_ping_s, (int, float)) or self.sse_ping_s < 0:
            raise ConfigError(f"sse_ping_s must be >= 0, got {self.sse_ping_s!r}")
        if self.tool_call_parser not in (None, *TOOL_CALL_PARSERS):
            raise ConfigError(f"tool_call_parser must be one of {TOOL_CALL_PARSERS}, got {self.tool_call_parser!r}")
        if not isinstance(self.default_max_tokens, int) or self.default_max_tokens < 1:
            raise ConfigError(f"default_max_tokens must be an integer >= 1, got {self.default_max_tokens!r}")
        if not isinstance(self.drain_timeout, (int, float)) or not 0 <= self.drain_timeout <= 86400:
            raise ConfigError(f"drain_timeout must be in [0, 86400] seconds, got {self.drain_timeout!r}")
        if self.session_dir is not None and (not isinstance(self.session_dir, str) or not self.session_dir.strip()):
            raise ConfigError(f"session_dir must be a directory path, got {self.session_dir!r}")
        if not isinstance(self.session_save_interval_s, (int, float)) or self.session_save_interval_s < 0:
            raise ConfigError(f"session_save_interval_s must be >= 0 seconds, got {self.session_save_interval_s!r}")

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, api_key_file: str | None = None, **flags: object
    ) -> ApiSettings:
        """Defaults, overridden by `MCSERVE_<FIELD>` variables, overridden by non-None `flags`.

        API keys: those of the flags (`api_keys` and the file `api_key_file`, one key a line) if any
        are given, else the environment's: MCSERVE_API_KEY and MCSERVE_API_KEYS (one key or several,
        comma-separated) and the file MCSERVE_API_KEY_FILE, all together.
        """
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for f in fields(cls):
            name = ENV_PREFIX + f.name.upper()
            if f.name != "api_keys" and name in env:
                values[f.name] = _parse(f.name, name, env[name])
        env_keys = [k for var in ("API_KEY", "API_KEYS") for k in _split(env.get(ENV_PREFIX + var, ""))]
        if ENV_PREFIX + "API_KEY_FILE" in env:
            env_keys += read_api_key_file(env[ENV_PREFIX + "API_KEY_FILE"])
        if env_keys:
            values["api_keys"] = env_keys
        unknown = set(flags) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown settings {sorted(unknown)}")
        values.update({k: v for k, v in flags.items() if v is not None})
        if api_key_file is not None or flags.get("api_keys") is not None:
            values["api_keys"] = [
                *(flags.get("api_keys") or ()),
                *(read_api_key_file(api_key_file) if api_key_file else ()),
            ]
        for name in ("api_keys", "allowed_origins"):
            if name in values:
                values[name] = tuple(dict.fromkeys(values[name]))  # type: ignore[call-overload]
        return cls(**values)  # type: ignore[arg-type]


def read_api_key_file(path: str) -> list[str]:
    """One key a line; blank lines and lines starting with '#' are skipped. ConfigError if the file
    cannot be read or holds no key (an empty file must not silently turn authentication off)."""
    try:
        text = open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the API key file {path!r}: {e}") from None
    keys = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise ConfigError(f"the API key file {path!r} holds no key")
    return keys


def _split(raw: str) -> list[str]:
    return [k.strip() for k in raw.split(",") if k.strip()]


def _parse(field_name: str, var: str, raw: str) -> object:
    try:
        if field_name in ("port", "max_body_bytes", "max_header_bytes", "threads", "default_max_tokens"):
            return int(raw)
        if field_name in ("sse_ping_s", "slow_step_s", "drain_timeout", "session_save_interval_s"):
            return float(raw)
    except ValueError:
        raise ConfigError(f"{var} must be a number, got {raw!r}") from None
    if field_name == "allowed_origins":
        return tuple(_split(raw))
    if field_name == "log_requests":
        if raw.strip().lower() not in ("1", "true", "yes", "0", "false", "no", ""):
            raise ConfigError(f"{var} must be true or false, got {raw!r}")
        return raw.strip().lower() in ("1", "true", "yes")
    if field_name == "log_level":
        return raw.lower()
    return raw
