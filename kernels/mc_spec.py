"""The Memory Caching options that change the math (`kernels/reference.py` defines it)."""

from __future__ import annotations

from dataclasses import dataclass, fields

AGGREGATIONS = ("none", "residual", "grm", "soup", "ssc")
STATE_INITS = ("continue", "reset")


def mc_problem(name: str, value: object) -> str | None:
    """What is wrong with `value` for the `MCSpec` field `name`, None if nothing. The one check of
    these fields: config.json, engine flags and requests raise their own error kinds with it."""
    if name == "aggregation" or name == "state_init":
        allowed = AGGREGATIONS if name == "aggregation" else STATE_INITS
        return None if isinstance(value, str) and value in allowed else f"must be one of {list(allowed)}, got {value!r}"
    assert name in ("segment_size", "top_k"), name
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    return None if ok else f"must be an integer >= 1, got {value!r}"


@dataclass(frozen=True, slots=True)
class MCSpec:
    """How a layer reads its cached memories.

    aggregation: none | residual | grm | soup | ssc.
    segment_size: C; token t (0-based from the first prompt token) is in segment t // C and a
        checkpoint of the state is cached after the last token of every segment.
    top_k: cached memories SSC reads per token (ignored by the other aggregations).
    state_init: continue (the state carries across a boundary) | reset (zero at each segment start).
    """

    aggregation: str = "none"
    segment_size: int = 256
    top_k: int = 4
    state_init: str = "continue"

    def __post_init__(self) -> None:
        for f in fields(self):
            problem = mc_problem(f.name, getattr(self, f.name))
            if problem is not None:
                raise ValueError(f"{f.name} {problem}")

    @property
    def reads_cache(self) -> bool:
        """Whether outputs depend on cached checkpoints (all but `none`)."""
        return self.aggregation != "none"

    @property
    def reset(self) -> bool:
        return self.state_init == "reset"
