"""The model `mcserve serve` runs when no MODEL_DIR is given.

A trained small MC model shipped inside the package (`server/data/default_model/`) when present.
Until one ships, a small random SSC model is built locally on first use (offline, seconds) and
cached; its output is noise, and `default_model_notice()` says so for start-up and /v1/models.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).parent / "data" / "default_model"
RANDOM_NAME = "random-small-ssc-v1"
RANDOM_SPEC = dict(preset="small", mc={"aggregation": "ssc", "segment_size": 64, "top_k": 2, "router": "learned"},
                   seed=0)


def is_shipped() -> bool:
    return (SHIPPED_DIR / "config.json").is_file()


def default_model_dir(cache_dir: str | Path | None = None) -> Path:
    """Path of the default model, building the random stand-in under `cache_dir` if needed."""
    if is_shipped():
        return SHIPPED_DIR
    root = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "mcserve"
    target = root / RANDOM_NAME
    if (target / "config.json").is_file():
        return target
    from mcserve.server.model.init_model import init_model

    log.warning("no trained default model ships with this build; writing a random one to %s", target)
    tmp = root / (RANDOM_NAME + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted earlier build
    init_model(tmp, **RANDOM_SPEC)
    tmp.rename(target)  # config.json appears only once everything is written
    return target


def default_model_notice() -> str | None:
    """What to tell users about the default model, or None for a real trained model."""
    if is_shipped():
        return None
    return ("default model has RANDOM weights (no trained model ships with this build yet): "
            "its output is noise; pass MODEL_DIR to serve a real checkpoint")
