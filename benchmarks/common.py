"""Shared bits of the benchmark scripts: a model directory to run on, and a description of the machine."""

from __future__ import annotations

import os
import platform
import tempfile
from pathlib import Path

import torch

DEFAULT_MC = {"aggregation": "ssc", "segment_size": 16, "top_k": 2, "router": "learned"}


def model_dir(path: str | None, preset: str) -> Path:
    """`path` if given, else a random `preset` model with SSC written once to the temp directory."""
    if path:
        return Path(path)
    out = Path(tempfile.gettempdir()) / f"mcserve-bench-{preset}-ssc"
    if not (out / "model.safetensors").is_file():
        from mcserve.server.model.init_model import init_model

        init_model(out, preset=preset, mc=DEFAULT_MC, seed=0)
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"{dev}, Python {platform.python_version()}")
