"""Prefill on the GPU: mcserve's batched prefill vs fla's own model, a 16K-token prompt, chat TTFT.

    bash tests/gpu/run_on_device.sh python3 benchmarks/prefill.py --out $OUT     (carry .whl)
    python benchmarks/prefill.py --tiny                                          (CPU smoke run)

One run, one card, in this order:
1. the card's bf16 matmul rate (TFLOP/s), measured here;
2. prefill tok/s with the random 1.3b preset (bf16 weights and checkpoints, segment 256), random
   1,100-token prompts, B = 1, 16, 64, 256: `model.prefill_batch` (every prompt one chunk, its 4
   checkpoints written) with aggregation none and ssc k=4 (query router: the weights are fla's
   parameter set exactly), vs fla's `GatedDeltaNetForCausalLM` forward on the same prompts with
   `use_cache=True, logits_to_keep=1` (what HF generate's prefill runs);
3. one 16K-token prompt: tok/s and the fraction of the matmul rate it reaches (2 x parameters FLOP
   per token, the issue's 2.8 GFLOP);
4. prefill chunks alongside decode rows: one packed pass (decode rows as 1-token chunks) vs a
   prefill pass then a decode pass, and (CUDA) the two overlapping on two streams;
5. TTFT of a 20-turn chat (benchmarks/chat_ttft.py's method) with reuse and without;
6. (CUDA) where the time goes: the top kernels of one B=64 pass of each, mcserve none and fla
   (torch.profiler), written to profile.txt.
Targets (issue 12): none >= 80% of fla at every B, ssc k=4 >= 60%, 16K >= 100K tok/s, chat turn 20
within 1.2x of turn 2 with reuse. Each number is the median of --repeats timed runs after a warm-up.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import time
from pathlib import Path

import torch
from chat_ttft import chat
from common import machine

from mcserve.kernels.mc_spec import MCSpec
from mcserve.kernels.prefill.batched import select_kernels
from mcserve.server.model.batched_prefill import PrefillInput
from mcserve.server.model.init_model import build_config
from mcserve.server.model.model import MCGatedDeltaNetForCausalLM

SIZES = {  # preset, segment, prompt length, batch sizes, long prompt, chat turns
    "full": ("1.3b", 256, 1100, [1, 16, 64, 256], 16384, 20),
    "tiny": ("tiny", 16, 100, [1, 4], 512, 4),
}


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev: torch.device, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up."""
    fn()
    out = []
    for _ in range(repeats):
        sync(dev)
        t = time.perf_counter()
        fn()
        sync(dev)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def matmul_tflops(dev: torch.device, dtype: torch.dtype) -> float:
    n = 8192 if dev.type == "cuda" else 512
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    s = timed(lambda: a @ b, dev, 10)
    return 2 * n**3 / s / 1e12


def init_on_device(model: torch.nn.Module, seed: int) -> None:
    """fla's initialisation (server/model/init_model.py's distribution), drawn on the model's device."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty_like(p, dtype=torch.float32).uniform_(1e-4, 16).log())
            elif name.endswith("dt_bias"):
                dt = torch.exp(torch.rand_like(p, dtype=torch.float32) * math.log(100) + math.log(1e-3)).clamp(min=1e-4)
                p.copy_(dt + torch.log(-torch.expm1(-dt)))
            elif name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)


def build_model(preset: str, segment: int, dev: torch.device, dtype: torch.dtype) -> MCGatedDeltaNetForCausalLM:
    cfg = build_config(preset, 32000 if preset == "1.3b" else 512,
                       {"aggregation": "ssc", "segment_size": segment, "top_k": 4, "router": "query"})
    with torch.device(dev):
        model = MCGatedDeltaNetForCausalLM(cfg)
    init_on_device(model, 0)
    return model.to(dtype).eval()


def use_spec(model: MCGatedDeltaNetForCausalLM, spec: MCSpec) -> None:
    """Time the same weights under another aggregation. Only for bare model calls: an engine's runner
    keeps the spec it was built with (serving sets it at load, `--mc-aggregation`)."""
    model.spec = spec


def mcserve_prefill(model, prompts: torch.Tensor, kernels):
    """A call that runs prefill_batch of every prompt as one chunk from position 0 (slots cleared)."""
    B, T = prompts.shape
    C = model.spec.segment_size
    n_ck = T // C
    states, ckpts = model.allocate_states(B), model.allocate_checkpoints(max(1, B * n_ck))
    chunks = [PrefillInput(prompts[i].tolist(), i, 0, [], list(range(i * n_ck, (i + 1) * n_ck))) for i in range(B)]

    def run():
        states.ssm.zero_()
        states.key_sum.zero_()
        states.conv.zero_()
        model.prefill_batch(chunks, states, ckpts, kernels)

    return run


def fla_prefill(fla_model, prompts: torch.Tensor):
    """A call of fla's forward on the prompts as HF generate's prefill runs it."""
    ids = prompts.to(fla_model.device)

    def run():
        with torch.inference_mode():
            fla_model(input_ids=ids, use_cache=True, logits_to_keep=1)

    return run


def make_fla(preset: str, dev: torch.device, dtype: torch.dtype):
    try:
        from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM
    except ImportError as e:
        print(f"fla: not importable ({e}); its columns are left out")
        return None
    from mcserve.server.model.init_model import PRESETS

    fields = {k: v for k, v in PRESETS[preset].items() if k != "vocab_size"}
    cfg = GatedDeltaNetConfig(vocab_size=32000 if preset == "1.3b" else 512, fuse_cross_entropy=False, **fields)
    with torch.device(dev):
        model = GatedDeltaNetForCausalLM(cfg)
    return model.to(dtype).eval()


def alongside_decode(model, kernels, B: int, T: int, repeats: int) -> dict[str, float]:
    """B prefill chunks of T tokens with B decode rows: one packed pass vs prefill pass + decode pass."""
    C, dev = model.spec.segment_size, model.device
    n_ck = 4  # the decode rows sit 3 tokens past their 4th cached checkpoint, as after a 1,100-token prompt
    pos = n_ck * C + 3
    states, ckpts = model.allocate_states(2 * B), model.allocate_checkpoints(B * n_ck + B * (T // C) + 1)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 500, (B, T), generator=g)
    tables = [list(range(i * n_ck, (i + 1) * n_ck)) for i in range(B)]
    base = B * n_ck
    prefill = [PrefillInput(ids[i].tolist(), B + i, 0, [], list(range(base + i * (T // C), base + (i + 1) * (T // C))),
                            logits="last") for i in range(B)]
    as_chunks = [PrefillInput([7], i, pos, tables[i], [], logits="last") for i in range(B)]
    tok = torch.full((B,), 7, dtype=torch.long, device=dev)
    slots = torch.arange(B, device=dev)
    positions = torch.full((B,), pos, dtype=torch.long, device=dev)
    table = torch.tensor(tables, dtype=torch.long, device=dev)
    writes = torch.full((B,), -1, dtype=torch.long, device=dev)
    none_written = torch.zeros(0, dtype=torch.long, device=dev)
    k_max = model.spec.top_k
    for t in (states.ssm, states.key_sum, ckpts.key):
        t.normal_(0, 0.1)

    def one_pass():
        model.prefill_batch(prefill + as_chunks, states, ckpts, kernels)

    def two_passes():
        model.prefill_batch(prefill, states, ckpts, kernels)
        model.decode(tok, slots, positions, table, writes, states, ckpts, write_rows=none_written, top_k_max=k_max)

    out = {"one_pass_s": timed(one_pass, dev, repeats), "two_passes_s": timed(two_passes, dev, repeats)}
    if dev.type == "cuda":  # the decode pass on a side stream, overlapping the prefill pass
        side = torch.cuda.Stream()

        def overlapped():
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                model.decode(tok, slots, positions, table, writes, states, ckpts, write_rows=none_written,
                             top_k_max=k_max)
            model.prefill_batch(prefill, states, ckpts, kernels)
            torch.cuda.current_stream().wait_stream(side)

        out["overlapped_s"] = timed(overlapped, dev, repeats)
    return out


def profile(fn, label: str) -> str:
    """The top CUDA kernels of one call of `fn` (after a warm-up) by total device time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return f"== {label}\n" + prof.key_averages().table(sort_by="cuda_time_total", row_limit=20)


def chat_ttft(model, turns: int, repeats: int) -> dict[str, list[float]]:
    from mcserve.server.engine.args import EngineArgs, engine_config, size_pools
    from mcserve.server.engine.llm_engine import LLMEngine
    from mcserve.server.model.default import default_model_dir
    from mcserve.server.text.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(default_model_dir())
    ck = torch.bfloat16 if model.device.type == "cuda" else model.state_dtype
    shape = (turns, 32, 48, 8)  # system, user, answer tokens: short answers keep the decode-bound part small
    total = 32 + turns * (48 + 8)
    out = {}
    for mode, flags in (("reuse", dict(enable_prefix_caching=True, enable_snapshots=True)),
                        ("no-reuse", dict(enable_prefix_caching=False))):
        args = EngineArgs(device=str(model.device), max_num_seqs=4, max_model_len=total + 64,
                          checkpoint_memory=4 * 2**30 if model.device.type == "cuda" else 2**28, **flags)
        pools = size_pools(args, model.cfg, model.device, model.dtype, ck, model.state_dtype)
        engine = LLMEngine(model, tokenizer, engine_config(args, model.cfg, pools), ckpt_dtype=ck)
        chat(engine, *shape, seed=99)  # warm-up
        runs = [chat(engine, *shape, seed=r) for r in range(repeats)]
        out[mode] = [statistics.median(run[t][0] for run in runs) * 1000 for t in range(turns)]
        del engine
        gc.collect()
    return out


def _cell(row: dict, key: str, fmt: str = "{:,.0f}") -> str:
    return fmt.format(row[key]) if key in row else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="directory for prefill.json and prefill.md")
    ap.add_argument("--tiny", action="store_true", help="a small model on the CPU: checks the script, not speed")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chat-repeats", type=int, default=2)
    ap.add_argument("--batch-sizes", default=None)
    args = ap.parse_args()
    preset, C, T, sizes, long_T, turns = SIZES["tiny" if args.tiny else "full"]
    if args.batch_sizes:
        sizes = [int(b) for b in args.batch_sizes.split(",")]
    dev = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    t_start = time.perf_counter()
    tflops = matmul_tflops(dev, dtype)
    print(f"machine: {machine()}\nmatmul {dtype}: {tflops:.3g} TFLOP/s", flush=True)

    model = build_model(preset, C, dev, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    kernels = select_kernels(dev, model.spec, dtype)
    specs = {"none": MCSpec("none", C), "ssc k=4": MCSpec("ssc", C, top_k=4)}
    fla_model = make_fla(preset, dev, dtype) if dev.type == "cuda" else None
    g = torch.Generator().manual_seed(0)
    rows = []
    for B in sizes:
        prompts = torch.randint(3, model.cfg.vocab_size, (B, T), generator=g)
        row = {"B": B, "tokens": B * T}
        if fla_model is not None:
            row["fla tok/s"] = B * T / timed(fla_prefill(fla_model, prompts), dev, args.repeats)
        for name, spec in specs.items():
            use_spec(model, spec)
            row[f"{name} tok/s"] = B * T / timed(mcserve_prefill(model, prompts, kernels), dev, args.repeats)
            if "fla tok/s" in row:
                row[f"{name} / fla"] = row[f"{name} tok/s"] / row["fla tok/s"]
        rows.append(row)
        print(row, flush=True)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    profiles = []
    if dev.type == "cuda":
        prompts = torch.randint(3, model.cfg.vocab_size, (64, T), generator=g)
        use_spec(model, specs["none"])
        profiles.append(profile(mcserve_prefill(model, prompts, kernels), "mcserve none, B=64"))
        if fla_model is not None:
            profiles.append(profile(fla_prefill(fla_model, prompts), "fla, B=64"))

    long_rows = []
    prompt = torch.randint(3, model.cfg.vocab_size, (1, long_T), generator=g)
    for name, spec in specs.items():
        use_spec(model, spec)
        tps = long_T / timed(mcserve_prefill(model, prompt, kernels), dev, args.repeats)
        long_rows.append({"aggregation": name, "tokens": long_T, "tok/s": tps,
                          "fraction of matmul rate": tps * 2 * n_params / (tflops * 1e12)})
        print(long_rows[-1], flush=True)
    if fla_model is not None:
        tps = long_T / timed(fla_prefill(fla_model, prompt), dev, args.repeats)
        long_rows.append({"aggregation": "fla", "tokens": long_T, "tok/s": tps,
                          "fraction of matmul rate": tps * 2 * n_params / (tflops * 1e12)})
        del fla_model
        gc.collect()

    use_spec(model, specs["ssc k=4"])
    mixed = alongside_decode(model, kernels, 16 if not args.tiny else 2, 256 if not args.tiny else 32, args.repeats)
    print(f"prefill + decode rows: {mixed}", flush=True)
    ttft = chat_ttft(model, turns, args.chat_repeats)
    elapsed = time.perf_counter() - t_start

    lines = [f"machine: {machine()}",
             f"model: random {preset} preset, {n_params / 1e9:.2f}B parameters, {dtype}, segment {C}, "
             f"prefill path {kernels.name}; matmul {tflops:.3g} TFLOP/s; {elapsed:.0f} s in all", "",
             f"prefill tok/s, {T}-token prompts (median of {args.repeats}):", "",
             "| B | fla | none | none / fla | ssc k=4 | ssc / fla |", "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = [_cell(r, "fla tok/s"), _cell(r, "none tok/s"), _cell(r, "none / fla", "{:.0%}"),
                 _cell(r, "ssc k=4 tok/s"), _cell(r, "ssc k=4 / fla", "{:.0%}")]
        lines.append(f"| {r['B']} | " + " | ".join(cells) + " |")
    lines += ["", f"one {long_T}-token prompt:", "", "| path | tok/s | fraction of the matmul rate |",
              "|---|---:|---:|"]
    lines += [f"| {r['aggregation']} | {r['tok/s']:,.0f} | {r['fraction of matmul rate']:.0%} |" for r in long_rows]
    overlap = f", overlapped on two streams {mixed['overlapped_s'] * 1000:.1f} ms" if "overlapped_s" in mixed else ""
    lines += ["", f"prefill chunks + decode rows: one pass {mixed['one_pass_s'] * 1000:.1f} ms, "
              f"prefill then decode {mixed['two_passes_s'] * 1000:.1f} ms{overlap}", "",
              f"chat TTFT ms (turn 2 / turn {turns}): reuse {ttft['reuse'][1]:.1f} / {ttft['reuse'][-1]:.1f} "
              f"({ttft['reuse'][-1] / ttft['reuse'][1]:.2f}x), no-reuse {ttft['no-reuse'][1]:.1f} / "
              f"{ttft['no-reuse'][-1]:.1f} ({ttft['no-reuse'][-1] / ttft['no-reuse'][1]:.2f}x)"]
    table = "\n".join(lines)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "prefill.md").write_text(table + "\n")
        (out / "profile.txt").write_text("\n\n".join(profiles) + "\n")
        (out / "prefill.json").write_text(json.dumps(
            {"machine": machine(), "matmul_tflops": tflops, "params": n_params, "path": kernels.name, "rows": rows,
             "long": long_rows, "alongside_decode": mixed, "chat_ttft_ms": ttft, "seconds": elapsed}, indent=1))
    print("\n" + table)


if __name__ == "__main__":
    main()
