"""The dtype names a user may give (`--dtype`, `--ckpt-dtype`, `EngineArgs`), without importing torch
so that the CLI can offer them and `mcserve --help` stays instant; `loader.resolve_dtype` resolves them."""

from __future__ import annotations

# name a user may give -> the torch attribute
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16", "float64": "float64"}
