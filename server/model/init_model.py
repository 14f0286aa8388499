"""`mcserve init-model`: write a randomly initialised checkpoint directory (for tests and benchmarks)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from mcserve.server.model.config import ModelConfig
from mcserve.server.model.model import MCGatedDeltaNetForCausalLM

# Sizes: tiny/small are for tests and demos; 370m and 1.3b follow fla's GDN sizing rule
# (q/k width = 0.75 x hidden with dk 256, dv = 2 dk; 1.3b is GatedDeltaNetConfig's defaults).
# Parameters with vocab 32000, untied head: 370m ~424M, 1.3b ~1.39B (embeddings included).
PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_heads=2, head_dim=16, expand_v=2.0),
    "small": dict(hidden_size=256, num_hidden_layers=6, num_heads=4, head_dim=48, expand_v=2.0),
    "370m": dict(hidden_size=1024, num_hidden_layers=24, num_heads=3, head_dim=256, expand_v=2.0,
                 vocab_size=32000),
    "1.3b": dict(hidden_size=2048, num_hidden_layers=21, num_heads=6, head_dim=256, expand_v=2.0,
                 vocab_size=32000),
}
SEGMENT_DEFAULTS = {"tiny": 16, "small": 64, "370m": 256, "1.3b": 256}
TOKENIZER_VOCAB = {"tiny": 512, "small": 4096, "370m": 8192, "1.3b": 8192}


def init_weights(model: MCGatedDeltaNetForCausalLM, seed: int, std: float = 0.02) -> None:
    """fla's initialisation: N(0, std) for linear, conv and embedding weights; A ~ U(0, 16);
    dt_bias = softplus^-1(dt), dt log-uniform in [1e-3, 0.1]; norms at one."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(1e-4, 16, generator=gen).log())
            elif name.endswith("dt_bias"):
                dt = torch.exp(torch.rand(p.shape, generator=gen) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
                dt = dt.clamp(min=1e-4)
                p.copy_(dt + torch.log(-torch.expm1(-dt)))
            elif name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def build_config(preset: str, vocab_size: int, mc: dict | None = None, **overrides) -> ModelConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {list(PRESETS)}")
    fields = dict(PRESETS[preset])
    fields["vocab_size"] = max(vocab_size, fields.get("vocab_size", 0))
    fields.update(overrides)
    mc = {k: v for k, v in (mc or {}).items() if v is not None}
    if mc.get("aggregation", "none") != "none":
        mc.setdefault("segment_size", SEGMENT_DEFAULTS[preset])
    block = {"memory_caching": mc} if mc else {}
    return ModelConfig.from_dict({**fields, **block})


def init_model(out_dir: str | Path, preset: str = "tiny", mc: dict | None = None, seed: int = 0,
               vocab_size: int | None = None, corpus: list[str] | None = None, **overrides) -> ModelConfig:
    """Write config.json, model.safetensors (fp32), tokenizer.json and tokenizer_config.json.

    The tokenizer is a byte-level BPE trained here (offline) on `corpus` or the text sample
    shipped with the package. Returns the config written.
    """
    from safetensors.torch import save_file

    from mcserve.server.text.tokenizer_train import builtin_corpus, train_byte_level_bpe, write_tokenizer_files

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_byte_level_bpe(corpus or builtin_corpus(), vocab_size or TOKENIZER_VOCAB.get(preset, 4096),
                               special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    eos = tok.token_to_id("<|endoftext|>")
    cfg = build_config(preset, tok.get_vocab_size(), mc, bos_token_id=eos, eos_token_id=eos,
                       pad_token_id=eos, **overrides)
    model = MCGatedDeltaNetForCausalLM(cfg)
    init_weights(model, seed)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    write_tokenizer_files(out, tok, bos="<|endoftext|>", eos="<|endoftext|>")
    return cfg


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
