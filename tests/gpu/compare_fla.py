"""Compatibility with the real thing: mcserve vs fla 0.6 `GatedDeltaNetForCausalLM` on a GPU.

Builds random fla models (several layer options), saves each with `save_pretrained`, loads the
directory with mcserve (aggregation `none`) and compares logits on random prompts.

Truth is fla in fp32 with its exact recurrence (`attn_mode="fused_recurrent"`; its chunk kernels
run fp32 dots as tf32 and are reported for information). bf16 rows also give the bf16 noise floor:
how far fla's own bf16 model is from the fp32 truth, so that mcserve's bf16 error can be judged
against what bf16 itself costs.

    python tests/gpu/compare_fla.py --out results.json
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile

import torch

CASES = {
    "base": dict(hidden_size=256, num_hidden_layers=3, num_heads=4, head_dim=48, expand_v=2.0),
    "gva+neg-eig": dict(hidden_size=256, num_hidden_layers=2, num_heads=2, head_dim=64, num_v_heads=4,
                        expand_v=1.0, allow_neg_eigval=True),
    "no-gate+tied": dict(hidden_size=192, num_hidden_layers=2, num_heads=3, head_dim=32, expand_v=2.0,
                         use_gate=False, tie_word_embeddings=True),
}
FP32_LIMIT, BF16_LIMIT = 1e-4, 2e-3


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def fla_logits(model, ids: torch.Tensor, mode: str) -> torch.Tensor:
    for layer in model.model.layers:
        layer.attn.mode = mode
    with torch.no_grad():
        return model(input_ids=ids[None]).logits[0].float()


def mc_logits(model, ids: torch.Tensor) -> torch.Tensor:
    n_seg = ids.shape[0] // model.spec.segment_size
    states, ckpts = model.allocate_states(1), model.allocate_checkpoints(n_seg)
    out, _ = model.prefill(ids, 0, 0, [], list(range(n_seg)), states, ckpts, all_logits=True)
    return out


def main() -> None:
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    from mcserve.server.model.loader import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--lengths", default="37,300")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    torch.manual_seed(0)
    for name, fields in CASES.items():
        cfg = GatedDeltaNetConfig(vocab_size=1000, fuse_cross_entropy=False, initializer_range=0.05, **fields)
        ref = GatedDeltaNetForCausalLM(cfg).cuda().eval()
        with torch.no_grad():  # perturb norm weights so that nothing sits at its trivial init
            for n, p in ref.named_parameters():
                if n.endswith("norm.weight"):
                    p.add_(torch.randn_like(p) * 0.1)
        with tempfile.TemporaryDirectory() as d:
            ref.save_pretrained(d)
            ours = {dt: load_model(d, dtype=dt, device="cuda") for dt in (torch.float32, torch.bfloat16)}
        ref16 = copy.deepcopy(ref).to(torch.bfloat16)
        for T in [int(x) for x in args.lengths.split(",")]:
            ids = torch.randint(0, 1000, (T,), device="cuda")
            truth = fla_logits(ref, ids, "fused_recurrent")
            fla_chunk32 = fla_logits(ref, ids, "chunk")
            fla16 = fla_logits(ref16, ids, "fused_recurrent")
            ours32, ours16 = mc_logits(ours[torch.float32], ids), mc_logits(ours[torch.bfloat16], ids)
            r = dict(case=name, T=T,
                     fp32_vs_fla=rel(ours32, truth),
                     fp32_vs_fla_chunk_tf32=rel(ours32, fla_chunk32),
                     bf16_vs_fla_bf16=rel(ours16, fla16),
                     bf16_vs_truth=rel(ours16, truth),
                     fla_bf16_vs_truth=rel(fla16, truth),
                     argmax_agree_bf16=float((ours16.argmax(-1) == fla16.argmax(-1)).float().mean()))
            r["ok_fp32"] = r["fp32_vs_fla"] < FP32_LIMIT
            r["ok_bf16"] = r["bf16_vs_fla_bf16"] < BF16_LIMIT
            # as accurate as fla's own bf16 model (within 25%)
            r["bf16_within_noise_floor"] = r["bf16_vs_truth"] <= 1.25 * r["fla_bf16_vs_truth"]
            rows.append(r)
            print(" ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    print(info)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**info, "rows": rows}, f, indent=1)
    if not all(r["ok_fp32"] and r["bf16_within_noise_floor"] for r in rows):
        raise SystemExit("mismatch against fla")


if __name__ == "__main__":
    main()
