"""Model sizes for training and checkpoints written in the serving format (server/model/loader.py).

A checkpoint directory holds config.json (with the memory_caching block), model.safetensors (fla
names, u_proj for a learned router), tokenizer.json, tokenizer_config.json (ChatML template) and
training.json (how it was trained); `mcserve.server.model.loader.load_model(dir)` loads it.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from mcserve.server.model.config import ModelConfig
from mcserve.server.model.model import MCGatedDeltaNetForCausalLM

# "default" is the shipped model: ~15.5M parameters, ~31 MB in bf16 with tied embeddings (the
# committed default model must stay under 40 MB with its tokenizer).
MODEL_SIZES: dict[str, dict] = {
    "default": dict(hidden_size=384, num_hidden_layers=6, num_heads=4, head_dim=64, expand_v=2.0,
                    tie_word_embeddings=True),
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_heads=2, head_dim=8, expand_v=1.5),
    # the recall experiment's model (scripts/recall_experiment.py): one state holds ~dk = 32 pairs per head
    "recall": dict(hidden_size=128, num_hidden_layers=2, num_heads=2, head_dim=32, expand_v=2.0,
                   intermediate_size=256, tie_word_embeddings=True),
    # the same at half the width, for a CPU run of the experiment (~4x cheaper per token)
    "recall-small": dict(hidden_size=64, num_hidden_layers=2, num_heads=2, head_dim=16, expand_v=2.0,
                         intermediate_size=128, tie_word_embeddings=True),
}
# How A_log and dt_bias start. `fla`: A ~ U(0, 16), dt log-uniform in [1e-3, 0.1] (fla's init): a
# median per-token log-decay of ~0.08, so the state forgets within ~9 tokens and a pair far from its
# query gives no gradient. `slow`: A = 1, dt log-uniform in [1e-3, 1e-2]: half-lives of 70-700 tokens.
DECAY_INITS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "fla": ((1e-4, 16.0), (1e-3, 0.1)),
    "slow": ((1.0, 1.0), (1e-3, 1e-2)),
}
SAVE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def train_config(size: str, vocab_size: int, eos_id: int, aggregation: str, segment_size: int, top_k: int,
                 state_init: str = "continue") -> ModelConfig:
    """A config with a learned router for every aggregation that reads the cache, none for `none`."""
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {list(MODEL_SIZES)}")
    router = "query" if aggregation == "none" else "learned"
    mc = dict(aggregation=aggregation, segment_size=segment_size, top_k=top_k, state_init=state_init, router=router)
    return ModelConfig.from_dict(dict(MODEL_SIZES[size], vocab_size=vocab_size, bos_token_id=eos_id,
                                      eos_token_id=eos_id, pad_token_id=eos_id, memory_caching=mc))


def init_model(cfg: ModelConfig, seed: int, decay_init: str = "fla") -> MCGatedDeltaNetForCausalLM:
    """fla's initialisation, then A_log and dt_bias as `decay_init` says; every weight but the router's
    is drawn exactly as for the same config without a learned router, so that an `ssc` and a `none`
    model of one seed start from the same GDN."""
    from mcserve.server.model.init_model import init_weights

    if decay_init not in DECAY_INITS:
        raise ValueError(f"decay_init must be one of {list(DECAY_INITS)}, got {decay_init!r}")
    model = MCGatedDeltaNetForCausalLM(cfg)
    init_weights(model, seed + 1)  # u_proj keeps these; the rest is overwritten below
    base = MCGatedDeltaNetForCausalLM(cfg.with_mc(router="query"))
    init_weights(base, seed)
    if decay_init != "fla":
        _init_decay(base, *DECAY_INITS[decay_init], seed)
    result = model.load_state_dict(base.state_dict(), strict=False)
    assert not result.unexpected_keys and all(k.endswith("u_proj.weight") for k in result.missing_keys), result
    return model


def _init_decay(model: MCGatedDeltaNetForCausalLM, a_range: tuple[float, float], dt_range: tuple[float, float],
                seed: int) -> None:
    """A ~ U(a_range); dt_bias = softplus^-1(dt), dt log-uniform in dt_range (per v-head)."""
    gen = torch.Generator().manual_seed(seed + 7919)
    lo, hi = math.log(dt_range[0]), math.log(dt_range[1])
    with torch.no_grad():
        for block in model.model.layers:
            attn = block.attn
            a = torch.empty(attn.A_log.shape).uniform_(*a_range, generator=gen)
            attn.A_log.copy_(a.log())
            dt = torch.exp(torch.rand(attn.dt_bias.shape, generator=gen) * (hi - lo) + lo)
            attn.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_checkpoint(model: MCGatedDeltaNetForCausalLM, out_dir: str | Path, tokenizer_dir: str | Path | None,
                    dtype: str = "bf16", training: dict | None = None) -> Path:
    """Write the serving checkpoint to `out_dir`, replacing it atomically (a reader never sees half).
    `tokenizer_dir` None writes no tokenizer (the synthetic recall models have none)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {n: t.detach().to("cpu", SAVE_DTYPES[dtype]).contiguous() for n, t in model.state_dict().items()}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = dict(model.cfg.to_dict(), architectures=["GatedDeltaNetForCausalLM"],
                  torch_dtype="bfloat16" if dtype == "bf16" else "float32")
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json") if tokenizer_dir is not None else ():
        shutil.copyfile(Path(tokenizer_dir) / name, tmp / name)
    if training is not None:
        (tmp / "training.json").write_text(json.dumps(training, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
