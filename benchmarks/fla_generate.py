"""fla's `GatedDeltaNetForCausalLM` under HF `generate`, greedy: ms per decode step by batch size, the
side of decode_engine.py's comparison. Run by decode_engine.py in a child process under a time
limit (fla's kernels compile and autotune on first use, which can take minutes), so a slow or failing
fla costs at most that limit and leaves no GPU memory behind; one JSON line per batch on stdout as
each finishes, so what finished before the limit is kept.

    python benchmarks/fla_generate.py --batches 1,16,64 --new-tokens 8

ms per step = (time of 1 + S new tokens - time of 1 new token) / S, random bf16 weights of the same
preset and random prompts of the same length as decode_engine.py's rows.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mcserve.server.model.init_model import PRESETS


def ms_per_step(model, vocab: int, batch: int, prompt_len: int, new_tokens: int, device) -> dict:
    ids = torch.randint(3, vocab, (batch, prompt_len), device=device)
    mask = torch.ones_like(ids)

    def gen(n: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           use_cache=True, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    warm = gen(2)  # compiles (and autotunes) fla's kernels for this shape
    one, more = gen(1), gen(1 + new_tokens)
    return {"batch": batch, "ms_per_step": (more - one) / new_tokens * 1e3, "prefill_s": one, "warmup_s": warm}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="1.3b")
    ap.add_argument("--prompt-len", type=int, default=1100)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--new-tokens", type=int, default=8)
    args = ap.parse_args()
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    device = torch.device("cuda")
    cfg = GatedDeltaNetConfig(fuse_cross_entropy=False, **PRESETS[args.preset])
    with torch.device(device):  # built on the device: no multi-GB fp32 copy on the host
        model = GatedDeltaNetForCausalLM(cfg)
    model = model.to(torch.bfloat16).eval()
    for b in (int(x) for x in args.batches.split(",") if x):
        try:
            row = ms_per_step(model, cfg.vocab_size, b, args.prompt_len, args.new_tokens, device)
        except Exception as e:  # one batch failing (memory) must not lose the others
            row = {"batch": b, "error": repr(e)}
            torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
