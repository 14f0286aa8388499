"""One decode step of an MC-GDN layer core for a batch of sequences whose memory lives in pools.

The runner picks a path once, at start-up: `get_decode_path("torch" | "triton")` returns a function
with `contract.DecodeFn`'s signature (the same for every path).
"""

from __future__ import annotations

import functools

from mcserve.kernels.decode.contract import DecodeBatch, DecodeFn, LayerMemory

DECODE_PATHS = ("torch", "triton")

__all__ = ["DECODE_PATHS", "DecodeBatch", "DecodeFn", "LayerMemory", "get_decode_path"]


def get_decode_path(name: str, **options: object) -> DecodeFn:
    """The decode step of path `name`; `options` go to the Triton wrapper (`config=KernelConfig(...)`).
    Triton is imported only when asked for, so CPU installs without it can serve with torch."""
    if name == "torch":
        if options:
            raise ValueError(f"the torch decode path takes no options, got {sorted(options)}")
        from mcserve.kernels.decode.torch import torch_decode_step

        return torch_decode_step
    if name == "triton":
        from mcserve.kernels.decode.triton import triton_decode_step

        return functools.partial(triton_decode_step, **options) if options else triton_decode_step
    raise ValueError(f"decode path must be one of {DECODE_PATHS}, got {name!r}")
