"""Settings of the HTTP front end, and the one place that reads `MCSERVE_*` environment variables.

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

_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """How the HTTP server listens and what it accepts.

    `api_keys`: empty = no authentication; otherwise every endpoint except /health, /metrics and
    /version needs `Authorization: Bearer <one of them>`.
    `served_model_name`: the name clients pass as `model` (None = the engine's `model_name`).
    `max_body_bytes`: larger request bodies get 413, counted on the bytes actually received.
    `sse_ping_s`: keep-alive comment interval on idle streams (0 = never).
    `model_notice`: an operator's note on the model (MCSERVE_MODEL_NOTICE), shown in /v1/models and at start-up.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    served_model_name: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    log_level: str = "info"
    sse_ping_s: float = 15.0
    model_notice: str | None = None

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
        if self.log_level not in _LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {_LOG_LEVELS}, got {self.log_level!r}")
        if not isinstance(self.sse_ping_s, (int, float)) or self.sse_ping_s < 0:
            raise ConfigError(f"sse_ping_s must be >= 0, got {self.sse_ping_s!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **flags: object) -> ApiSettings:
        """Defaults, overridden by `MCSERVE_<FIELD>` variables, overridden by non-None `flags`.

        `MCSERVE_API_KEY` holds one key or several separated by commas.
        """
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for f in fields(cls):
            name = ENV_PREFIX + ("API_KEY" if f.name == "api_keys" else f.name.upper())
            if name in env:
                values[f.name] = _parse(f.name, name, env[name])
        unknown = set(flags) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown settings {sorted(unknown)}")
        values.update({k: v for k, v in flags.items() if v is not None})
        if "api_keys" in values:
            values["api_keys"] = tuple(values["api_keys"])  # type: ignore[arg-type]
        return cls(**values)  # type: ignore[arg-type]


def _parse(field_name: str, var: str, raw: str) -> object:
    try:
        if field_name in ("port", "max_body_bytes"):
            return int(raw)
        if field_name == "sse_ping_s":
            return float(raw)
    except ValueError:
        raise ConfigError(f"{var} must be a number, got {raw!r}") from None
    if field_name == "api_keys":
        return tuple(k.strip() for k in raw.split(",") if k.strip())
    if field_name == "log_level":
        return raw.lower()
    return raw
