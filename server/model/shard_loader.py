"""Loading one tensor-parallel rank's part of a normal (unsharded) checkpoint directory.

Each rank opens the safetensors files itself and reads only its slices (`safe_open(...).get_slice`
reads the bytes of the requested range from the memory-mapped file), so no rank ever holds the
whole model. The checkpoint is checked against `config.json` exactly as `loader.load_model` checks
it, on the full shapes in the files' headers, before anything is read.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mcserve.server.errors import ModelLoadError
from mcserve.server.model.loader import check_finite, check_weights, load_config, resolve_dtype, weight_files
from mcserve.server.model.sharding import HEAD_ONLY, AllReduce, Shard, ShardedMCGatedDeltaNet, shard_range


def safe_open(path: str):
    """safetensors' reader (a seam for tests, which count what is read)."""
    from safetensors import safe_open as open_

    return open_(path, framework="pt", device="cpu")


def load_shard(model_dir: str | Path, shard: Shard, all_reduce: AllReduce | None,
               dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu",
               **mc_overrides) -> ShardedMCGatedDeltaNet:
    """Rank `shard.rank`'s model on `device` in `dtype`. ConfigError when the head counts do not
    split over `shard.world` ranks; ModelLoadError as `load_model` for a bad checkpoint."""
    from safetensors import SafetensorError

    cfg = load_config(model_dir, **mc_overrides)
    torch_dtype = resolve_dtype(dtype, device)
    with torch.device("meta"):
        model = ShardedMCGatedDeltaNet(cfg, shard, all_reduce)  # ConfigError if not divisible
    wanted = set(model.state_dict())
    files, where = weight_files(Path(model_dir))
    handles, shapes = {}, {}
    for f in files:
        try:
            h = safe_open(str(f))
            shapes.update({name: tuple(h.get_slice(name).get_shape()) for name in h.keys()})
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f.name, None, f"cannot be read as safetensors: {e}") from e
        handles.update(dict.fromkeys(h.keys(), h))
    check_weights(cfg, shapes, where)
    state = {}
    for name in sorted(wanted):
        try:
            part = _read(handles[name].get_slice(name), shard_range(name, shapes[name], shard), len(shapes[name]))
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(where(name), name, f"cannot be read: {e}") from e
        state[name] = part.to(torch_dtype)
    assert not wanted & set(HEAD_ONLY) or shard.has_head, wanted
    model.load_state_dict(state, strict=True, assign=True)
    model.to(device=device)
    model.eval()
    check_finite(model, where)
    return model


def _read(view, part: tuple[int, int, int] | None, ndim: int) -> torch.Tensor:
    """The whole tensor, or its [start, stop) range along one dim."""
    assert ndim >= 1, ndim
    dim, start, stop = part if part is not None else (0, None, None)
    return view[tuple(slice(start, stop) if d == dim else slice(None) for d in range(ndim))]
