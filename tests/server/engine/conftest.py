from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mcserve.server.model.init_model import init_model
from mcserve.server.model.loader import load_model
from mcserve.server.model.model import MCGatedDeltaNetForCausalLM
from mcserve.server.text.tokenizer import Tokenizer

MC = {"aggregation": "ssc", "segment_size": 16, "top_k": 2, "router": "learned"}


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("engine") / "tiny-ssc"
    init_model(path, preset="tiny", mc=MC, seed=0)
    return path


@pytest.fixture(scope="session")
def model(model_dir: Path) -> MCGatedDeltaNetForCausalLM:
    return load_model(model_dir, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)
