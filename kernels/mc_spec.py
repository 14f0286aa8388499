"""The Memory Caching options that change the math (DESIGN.md section 1)."""

from __future__ import annotations

from dataclasses import dataclass

AGGREGATIONS = ("none", "residual", "grm", "soup", "ssc")
STATE_INITS = ("continue", "reset")


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
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if not isinstance(self.segment_size, int) or self.segment_size < 1:
            raise ValueError(f"segment_size must be an integer >= 1, got {self.segment_size!r}")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if self.state_init not in STATE_INITS:
            raise ValueError(f"state_init must be one of {STATE_INITS}, got {self.state_init!r}")

    @property
    def reads_cache(self) -> bool:
        """Whether outputs depend on cached checkpoints (all but `none`)."""
        return self.aggregation != "none"

    @property
    def reset(self) -> bool:
        return self.state_init == "reset"
