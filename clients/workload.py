"""What the load generator sends: the run's configuration, length distributions and seeded random text.

Lengths are in tokens of the chosen tokenizer (clients/tokens.py: the server's /tokenize, a local
tokenizer.json, or whitespace words as the fallback); the counts the server actually saw are reported
from `usage`. The random text is short common English words.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass

MAX_REQUESTS = 1_000_000
MAX_DURATION_S = 24 * 3600.0
ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
KINDS = ("fixed", "uniform", "normal", "exp")
SLO_METRICS = ("ttft", "tpot", "e2e")

# Short, common words: about one BPE token each in most tokenizers.
_WORDS = (
    "the of and to in is it you that he was for on are with as his they be at one have this from or had by "
    "word but what some we can out other were all there when up use your how said an each she which do their "
    "time if will way about many then them write would like so these her long make thing see him two has look "
    "more day could go come did number sound no most people my over know water than call first who may down "
    "side been now find any new work part take get place made live where after back little only round man year "
    "came show every good me give our under name very through just form sentence great think say help low line"
).split()


@dataclass(frozen=True, slots=True)
class LengthDist:
    """A distribution of positive integer lengths.

    `fixed`: always `a`; `uniform`: integers in [a, b]; `normal`: mean a, std b; `exp`: exponential
    with mean a. Samples are rounded and clamped to [1, `cap`].
    """

    kind: str
    a: float
    b: float = 0.0
    cap: int = 1_000_000

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"length distribution kind must be one of {KINDS}, got {self.kind!r}")
        if not self.a >= 1:
            raise ValueError(f"length distribution {self.kind}: first parameter must be >= 1, got {self.a!r}")
        if self.kind == "uniform" and not self.b >= self.a:
            raise ValueError(f"uniform lengths need lo <= hi, got {self.a!r}:{self.b!r}")
        if self.kind == "normal" and not self.b >= 0:
            raise ValueError(f"normal lengths need std >= 0, got {self.b!r}")
        if not (isinstance(self.cap, int) and self.cap >= 1):
            raise ValueError(f"length cap must be an integer >= 1, got {self.cap!r}")

    @classmethod
    def parse(cls, text: str, cap: int = 1_000_000) -> LengthDist:
        """`128` (fixed), `64:256` (uniform), `uniform:64:256`, `normal:128:32`, `exp:128`."""
        parts = text.strip().split(":")
        try:
            if len(parts) == 1:
                return cls("fixed", float(parts[0]), cap=cap)
            if len(parts) == 2 and parts[0] not in KINDS:
                return cls("uniform", float(parts[0]), float(parts[1]), cap=cap)
            kind, *nums = parts
            values = [float(x) for x in nums]
        except ValueError:
            raise ValueError(f"cannot read length distribution {text!r} (e.g. 128, 64:256, normal:128:32)") from None
        want = {"fixed": 1, "uniform": 2, "normal": 2, "exp": 1}.get(kind)
        if want is None or len(values) != want:
            raise ValueError(f"cannot read length distribution {text!r} (e.g. 128, 64:256, normal:128:32, exp:128)")
        return cls(kind, values[0], values[1] if want == 2 else 0.0, cap=cap)

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            x = self.a
        elif self.kind == "uniform":
            x = rng.randint(int(self.a), int(self.b))
        elif self.kind == "normal":
            x = rng.gauss(self.a, self.b)
        else:
            x = rng.expovariate(1.0 / self.a)
        return max(1, min(self.cap, round(x)))

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"{self.a:g}"
        if self.kind == "exp":
            return f"exp:{self.a:g}"
        return f"{self.kind}:{self.a:g}:{self.b:g}"


def random_words(rng: random.Random, n: int) -> str:
    """`n` random words separated by spaces."""
    assert n >= 0, n
    return " ".join(rng.choice(_WORDS) for _ in range(n))


@dataclass(frozen=True, slots=True)
class LoadConfig:
    """One benchmark run. Lengths are in tokens (see above); `rate` in requests/s (None: closed loop)."""

    url: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    model: str | None = None  # None: the first of /v1/models
    endpoint: str = "chat"
    concurrency: int = 8
    max_requests: int = 64
    duration_s: float = 3600.0
    rate: float | None = None
    prompt_len: LengthDist = LengthDist("fixed", 128)
    output_len: LengthDist = LengthDist("fixed", 64)
    turns: int = 1
    shared_prefix_len: int = 0  # random words common to every request (the system prompt in chat)
    prefix_text: str = ""  # literal text put before those words
    session_ids: bool = False  # send mcserve's `session_id`, one per conversation
    ignore_eos: bool = True  # vLLM/mcserve extra: output lengths are exactly as sampled
    temperature: float = 0.0
    request_timeout_s: float = 120.0
    seed: int = 0
    num_prefixes: int = 1  # different shared prefixes; conversation k gets prefix k mod num_prefixes
    tokenizer: str = "auto"  # "auto", "server", "words" or a tokenizer.json path
    dataset: str | None = None  # a JSONL of prompts or ShareGPT-style conversations (clients/dataset.py)
    dataset_format: str = "auto"
    output_len_given: bool = False  # with a dataset: --output-len overrides the recorded reply lengths
    percentiles: tuple[float, ...] = (50.0, 90.0, 99.0)
    goodput_slos_ms: tuple[tuple[str, float], ...] = ()  # (metric, limit): ttft, tpot, e2e

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {self.url!r}")
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {sorted(ENDPOINTS)}, got {self.endpoint!r}")
        if not (isinstance(self.concurrency, int) and 1 <= self.concurrency <= 4096):
            raise ValueError(f"concurrency must be in [1, 4096], got {self.concurrency!r}")
        if not (isinstance(self.max_requests, int) and 1 <= self.max_requests <= MAX_REQUESTS):
            raise ValueError(f"max_requests must be in [1, {MAX_REQUESTS}], got {self.max_requests!r}")
        if not 0 < self.duration_s <= MAX_DURATION_S:
            raise ValueError(f"duration_s must be in (0, {MAX_DURATION_S:g}], got {self.duration_s!r}")
        if self.rate is not None and not (math.isfinite(self.rate) and self.rate > 0):
            raise ValueError(f"rate must be > 0 requests/s, got {self.rate!r}")
        if not (isinstance(self.turns, int) and self.turns >= 1):
            raise ValueError(f"turns must be an integer >= 1, got {self.turns!r}")
        if self.turns > 1 and self.endpoint != "chat":
            raise ValueError(f"turns > 1 needs the chat endpoint, got endpoint {self.endpoint!r}")
        if self.shared_prefix_len < 0:
            raise ValueError(f"shared_prefix_len must be >= 0, got {self.shared_prefix_len!r}")
        if not (isinstance(self.num_prefixes, int) and self.num_prefixes >= 1):
            raise ValueError(f"num_prefixes must be an integer >= 1, got {self.num_prefixes!r}")
        if self.dataset_format not in ("auto", "jsonl", "sharegpt"):
            raise ValueError(f"dataset_format must be auto, jsonl or sharegpt, got {self.dataset_format!r}")
        if not self.percentiles or not all(0 <= q <= 100 for q in self.percentiles):
            raise ValueError(f"percentiles must be in [0, 100], got {self.percentiles!r}")
        for metric, limit in self.goodput_slos_ms:
            if metric not in SLO_METRICS or not limit > 0:
                raise ValueError(f"goodput SLO must be one of {SLO_METRICS} with a limit > 0 ms, got {metric}:{limit}")
        if not 0 < self.request_timeout_s <= MAX_DURATION_S:
            raise ValueError(f"request_timeout_s must be in (0, {MAX_DURATION_S:g}], got {self.request_timeout_s!r}")

    @property
    def base_url(self) -> str:
        url = self.url.rstrip("/")
        return url[: -len("/v1")] if url.endswith("/v1") else url

    def as_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["api_key"] = None if self.api_key is None else "***"
        out["prompt_len"], out["output_len"] = self.prompt_len.describe(), self.output_len.describe()
        out["goodput_slos_ms"] = dict(self.goodput_slos_ms)
        return out
