"""Load a checkpoint directory into an MC-GDN model.

The directory (README.md, "A model directory holds"): `config.json` (config.py), `model.safetensors` or
shards named by `model.safetensors.index.json`, with fla's tensor names (plus `u_proj` per layer for a
learned router), and the tokenizer files that server/text/tokenizer.py reads. Every problem raises
`ModelLoadError` naming the file and the field or tensor.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from mcserve.server.errors import ModelLoadError
from mcserve.server.model.config import CONFIG_FILE, ModelConfig
from mcserve.server.model.dtypes import DTYPE_NAMES
from mcserve.server.model.model import MCGatedDeltaNetForCausalLM

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def resolve_dtype(name: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """'auto' is bf16 on CUDA and fp32 elsewhere."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; use one of {['auto', *DTYPE_NAMES]}")
    return getattr(torch, DTYPE_NAMES[name])


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelLoadError(path.name, None, f"not found in {path.parent}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(path.name, None, f"is not valid JSON: {e}") from e


def load_config(model_dir: str | Path, **mc_overrides) -> ModelConfig:
    """Read config.json; `mc_overrides` (aggregation, segment_size, top_k, state_init, router) win
    over its `memory_caching` block."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelLoadError(str(path), None, "model directory not found")
    cfg = ModelConfig.from_dict(_read_json(path / CONFIG_FILE))
    return cfg.with_mc(**mc_overrides) if mc_overrides else cfg


def weight_files(path: Path) -> tuple[list[Path], Callable[[str], str]]:
    """The safetensors files to read, and for an error message, which file holds a tensor."""
    single = path / WEIGHTS_FILE
    if single.is_file():
        return [single], lambda _name: WEIGHTS_FILE
    index_path = path / INDEX_FILE
    if not index_path.is_file():
        raise ModelLoadError(WEIGHTS_FILE, None, f"not found in {path} (nor a sharded {INDEX_FILE})")
    index = _read_json(index_path)
    wmap = index.get("weight_map")
    if not isinstance(wmap, dict) or not wmap:
        raise ModelLoadError(INDEX_FILE, "weight_map", "must map tensor names to shard files")
    shards = sorted(set(wmap.values()))
    for s in shards:
        if not (path / s).is_file():
            raise ModelLoadError(INDEX_FILE, "weight_map", f"names shard {s!r}, which is not in {path}")
    return [path / s for s in shards], lambda name: wmap.get(name, INDEX_FILE)


def read_tensors(model_dir: str | Path) -> tuple[dict[str, torch.Tensor], Callable[[str], str]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files, where = weight_files(Path(model_dir))
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            part = load_file(str(f), device="cpu")
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f.name, None, f"cannot be read as safetensors: {e}") from e
        tensors.update(part)
    return tensors, where


def check_weights(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], where: Callable[[str], str]
                  ) -> dict[str, torch.Size]:
    """ModelLoadError unless the checkpoint's tensors (`shapes`: name -> shape) hold every weight of
    `cfg`'s model with the shape `config.json` implies and nothing it does not describe (unused router
    or tied-head weights are ignored). Returns the weights to load: name -> shape."""
    learned = cfg.mc.router == "learned"
    if learned and "model.layers.0.attn.u_proj.weight" not in shapes:
        raise ModelLoadError(CONFIG_FILE, "memory_caching.router",
                             f"'learned' needs model.layers.{{i}}.attn.u_proj.weight in the weights, absent "
                             f"from {where('model.layers.0.attn.u_proj.weight')}; use router 'query' to serve "
                             "a plain GDN checkpoint with memory caching")
    with torch.device("meta"):
        model = MCGatedDeltaNetForCausalLM(cfg)
    expected = {n: p.shape for n, p in model.state_dict().items()}
    for name, shape in expected.items():
        if name not in shapes:
            raise ModelLoadError(where(name), name, f"tensor missing (expected shape {list(shape)})")
        if tuple(shapes[name]) != tuple(shape):
            raise ModelLoadError(where(name), name, f"shape {list(shapes[name])} does not match "
                                 f"config.json, which implies {list(shape)}")
    extra = sorted(set(shapes) - set(expected))
    ignorable = {n for n in extra
                 if n.endswith("attn.u_proj.weight") or (cfg.tie_word_embeddings and n == "lm_head.weight")}
    if set(extra) - ignorable:
        name = sorted(set(extra) - ignorable)[0]
        raise ModelLoadError(where(name), name, "unexpected tensor: config.json describes no such weight")
    if ignorable:
        log.info("ignoring %d tensors the config does not use (e.g. %s)", len(ignorable), sorted(ignorable)[0])
    return expected


def check_finite(model: torch.nn.Module, where: Callable[[str], str]) -> None:
    for name, t in model.state_dict().items():
        if not torch.isfinite(t).all():
            raise ModelLoadError(where(name), name, "holds NaN or infinite values")


def load_model(model_dir: str | Path, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu",
               **mc_overrides) -> MCGatedDeltaNetForCausalLM:
    """Build the model from `model_dir` on `device` in `dtype`."""
    cfg = load_config(model_dir, **mc_overrides)
    torch_dtype = resolve_dtype(dtype, device)
    tensors, where = read_tensors(model_dir)
    expected = check_weights(cfg, {n: tuple(t.shape) for n, t in tensors.items()}, where)
    with torch.device("meta"):
        model = MCGatedDeltaNetForCausalLM(cfg)
    state = {n: tensors[n].to(torch_dtype) for n in expected}
    model.load_state_dict(state, strict=True, assign=True)
    model.fingerprint()  # now, while the weights are on the host
    model.to(device=device)
    model.eval()
    check_finite(model, where)
    return model
