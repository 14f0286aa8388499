"""Loading checkpoint directories: round trip, sharding, dtypes, and one clear error per problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mcserve.server.errors import ModelLoadError
from mcserve.server.model.init_model import init_model
from mcserve.server.model.loader import load_config, load_model
from mcserve.server.text.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny")
    init_model(d, preset="tiny", mc={"aggregation": "ssc", "top_k": 2, "segment_size": 8, "router": "learned"},
               seed=3)
    return d


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_round_trip(ckpt: Path) -> None:
    model = load_model(ckpt, dtype="float32")
    assert model.spec.aggregation == "ssc" and model.spec.top_k == 2 and model.spec.segment_size == 8
    tensors = load_file(str(ckpt / "model.safetensors"))
    for name, t in model.state_dict().items():
        assert torch.equal(t, tensors[name]), name
    tok = Tokenizer.from_dir(ckpt)
    assert tok.vocab_size <= model.cfg.vocab_size
    assert model.cfg.eos_token_ids == (tok.eos_token_id,)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_dtypes(ckpt: Path, dtype: str) -> None:
    model = load_model(ckpt, dtype=dtype)
    assert model.dtype == getattr(torch, dtype)
    logits = model.forward_reference([1, 2, 3, 4])
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_sharded(ckpt: Path, tmp_path: Path) -> None:
    d = copy_dir(ckpt, tmp_path / "sharded")
    tensors = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    wmap = {}
    for i, part in enumerate([names[:half], names[half:]]):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(d / fname))
        wmap.update({n: fname for n in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    a, b = load_model(ckpt, dtype="float32"), load_model(d, dtype="float32")
    assert torch.equal(a.forward_reference([5, 6, 7]), b.forward_reference([5, 6, 7]))
    (d / wmap[names[0]]).unlink()
    with pytest.raises(ModelLoadError, match="model.safetensors.index.json.*not in"):
        load_model(d)


def test_overrides_switch_aggregation(ckpt: Path) -> None:
    model = load_model(ckpt, dtype="float32", aggregation="grm")
    assert model.spec.aggregation == "grm" and model.spec.segment_size == 8


def _expect(d: Path, *patterns: str, **overrides) -> None:
    with pytest.raises(ModelLoadError) as e:
        load_model(d, dtype="float32", **overrides)
    for p in patterns:
        assert p in str(e.value), (p, str(e.value))


def test_missing_dir_and_files(ckpt: Path, tmp_path: Path) -> None:
    _expect(tmp_path / "nope", "model directory not found")
    d = copy_dir(ckpt, tmp_path / "m")
    (d / "model.safetensors").unlink()
    _expect(d, "model.safetensors", "not found")
    (d / "config.json").unlink()
    _expect(d, "config.json", "not found")


def test_bad_json(ckpt: Path, tmp_path: Path) -> None:
    d = copy_dir(ckpt, tmp_path / "m")
    (d / "config.json").write_text("{not json")
    _expect(d, "config.json", "not valid JSON")


def test_corrupt_weights(ckpt: Path, tmp_path: Path) -> None:
    d = copy_dir(ckpt, tmp_path / "m")
    (d / "model.safetensors").write_bytes(b"\x00" * 64)
    _expect(d, "model.safetensors", "cannot be read")


@pytest.mark.parametrize("field,value,msg", [
    ("hidden_size", 65, "model.embeddings.weight"),  # shapes no longer match
    ("num_heads", 0, "num_heads"),
    ("num_v_heads", 3, "num_v_heads"),
    ("hidden_act", "gelu", "hidden_act"),
    ("model_type", "llama", "model_type"),
    ("frobnicate", True, "frobnicate"),
    ("attn", {"layers": [0]}, "attn"),
    ("memory_caching", {"aggregation": "magic"}, "memory_caching.aggregation"),
    ("memory_caching", {"aggregation": "ssc", "top_k": 0}, "memory_caching.top_k"),
    ("memory_caching", {"aggregation": "ssc", "segment_size": -4}, "memory_caching.segment_size"),
    ("memory_caching", {"aggregation": "ssc", "state_init": "keep"}, "memory_caching.state_init"),
    ("memory_caching", {"aggregation": "ssc", "windows": 3}, "memory_caching.windows"),
    ("memory_caching", "ssc", "memory_caching"),
])
def test_config_errors_name_the_field(ckpt: Path, tmp_path: Path, field: str, value, msg: str) -> None:
    d = copy_dir(ckpt, tmp_path / "m")
    edit_config(d, **{field: value})
    _expect(d, msg)


def test_missing_and_misshapen_tensors(ckpt: Path, tmp_path: Path) -> None:
    d = copy_dir(ckpt, tmp_path / "m")
    tensors = load_file(str(d / "model.safetensors"))
    t = dict(tensors)
    del t["model.layers.1.attn.o_proj.weight"]
    save_file(t, str(d / "model.safetensors"))
    _expect(d, "model.safetensors", "model.layers.1.attn.o_proj.weight", "missing")
    t = dict(tensors)
    t["model.layers.0.attn.A_log"] = torch.zeros(7)
    save_file(t, str(d / "model.safetensors"))
    _expect(d, "model.layers.0.attn.A_log", "shape [7]")
    t = dict(tensors)
    t["model.layers.0.attn.mystery.weight"] = torch.zeros(2)
    save_file(t, str(d / "model.safetensors"))
    _expect(d, "model.layers.0.attn.mystery.weight", "unexpected")
    t = dict(tensors)
    t["model.norm.weight"] = torch.full_like(t["model.norm.weight"], float("nan"))
    save_file(t, str(d / "model.safetensors"))
    _expect(d, "model.norm.weight", "NaN")


def test_learned_router_needs_u_proj(ckpt: Path, tmp_path: Path) -> None:
    d = copy_dir(ckpt, tmp_path / "m")
    tensors = {k: v for k, v in load_file(str(d / "model.safetensors")).items() if "u_proj" not in k}
    save_file(tensors, str(d / "model.safetensors"))
    _expect(d, "config.json", "memory_caching.router", "u_proj")
    model = load_model(d, dtype="float32", router="query")  # post-training MC on a plain checkpoint
    assert model.model.layers[0].attn.u_proj is None


def test_plain_gdn_checkpoint_without_block(ckpt: Path, tmp_path: Path) -> None:
    d = copy_dir(ckpt, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["memory_caching"]
    (d / "config.json").write_text(json.dumps(cfg))
    assert load_config(d).mc.aggregation == "none"
    model = load_model(d, dtype="float32")  # u_proj tensors present but unused: accepted, ignored
    assert model.spec.aggregation == "none"
    assert load_model(d, dtype="float32", aggregation="ssc", top_k=1).spec.top_k == 1
