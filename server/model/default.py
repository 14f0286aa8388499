"""The model `mcserve serve` runs when no MODEL_DIR is given: the small SSC model trained by
scripts/train.py and shipped in the package (`server/data/default_model/`, docs/MODEL.md)."""

from __future__ import annotations

from pathlib import Path

from mcserve.server.errors import ModelLoadError

SHIPPED_DIR = Path(__file__).parents[1] / "data" / "default_model"


def is_shipped() -> bool:
    return (SHIPPED_DIR / "config.json").is_file()


def default_model_dir() -> Path:
    """Path of the shipped default model; a clear error if this installation lacks it."""
    if not is_shipped():
        raise ModelLoadError(str(SHIPPED_DIR), None, "the default model is missing from this installation "
                             "(install the package with its data files, or pass MODEL_DIR)")
    return SHIPPED_DIR
