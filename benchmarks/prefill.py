"""Prefill on the GPU: mcserve's batched prefill vs fla's own model, a 16K-token prompt, chat TTFT.

    bash tests/gpu/run_on_device.sh python3 benchmarks/prefill.py --out $OUT/p     (carry .whl; ~4-5 min)
    python benchmarks/prefill.py --tiny --out /tmp/p                              (CPU smoke run)

One run, one card, in this order (a section that would start after --budget-s is skipped and named
as skipped; prefill.json and prefill.md under --out are rewritten after every measurement, so a run
cut short keeps what it measured):
1. the card's bf16 matmul rate (TFLOP/s), measured here;
2. prefill tok/s with the random 1.3b preset (bf16 weights, bf16 checkpoints as the engine serves on
   CUDA, segment 256), random 1,100-token prompts, B = 1, 16, 64, 256: `model.prefill_batch` (every
   prompt one chunk, its 4 checkpoints written) with aggregation none and ssc k=4 (query router: the
   weights are fla's parameter set exactly), vs fla's `GatedDeltaNetForCausalLM` forward on the same
   prompts with `use_cache=True, logits_to_keep=1` (what HF generate's prefill runs); median of
   --repeats timed calls after a warm-up (one timed call where a batch has more than 100K tokens);
3. (CUDA) where the time goes at B = --profile-batch: every CUDA kernel of one call of mcserve none,
   mcserve ssc k=4 and fla (torch.profiler key_averages), profile_{none,ssc,fla}.txt;
4. one 16K-token prompt: tok/s and the fraction of the matmul rate it reaches (2 x parameters FLOP
   per token, the issue's 2.8 GFLOP);
5. TTFT of a 20-turn chat (benchmarks/chat_ttft.py's method; the engine and its runner, eager decode)
   with reuse and without;
6. prefill chunks alongside decode rows: one packed pass (decode rows as 1-token chunks) vs a
   prefill pass then a decode pass, and (CUDA) the two overlapping on two streams.
Targets (issue 12): none >= 80% of fla at every B, ssc k=4 >= 60%, 16K >= 100K tok/s, chat turn 20
within 1.2x of turn 2 with reuse.
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


def mcserve_prefill(model, prompts: torch.Tensor, kernels, ckpt_dtype: torch.dtype | None = None):
    """A call that runs prefill_batch of every prompt as one chunk from position 0 (slots cleared),
    checkpoints in `ckpt_dtype` (default: the engine's "auto", bf16 on CUDA)."""
    if ckpt_dtype is None:
        ckpt_dtype = torch.bfloat16 if model.device.type == "cuda" else model.state_dtype
    B, T = prompts.shape
    C = model.spec.segment_size
    n_ck = T // C
    states, ckpts = model.allocate_states(B), model.allocate_checkpoints(max(1, B * n_ck), ckpt_dtype)
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
    """Every CUDA kernel of one call of `fn` (after a warm-up) by total device time, and the total."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    total_ms = sum(e.self_device_time_total for e in events) / 1000
    return (f"== {label}: {total_ms:.1f} ms of kernels in one call\n"
            + events.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=90))


def chat_shape(turns: int) -> tuple[int, int, int, int]:
    """chat_ttft.chat's (turns, system, user, answer tokens): short answers keep the decode part small."""
    return (turns, 32, 48, 8)


def chat_engine(model, ckpt_dtype: torch.dtype, turns: int, reuse: bool):
    """The chat TTFT's engine on `model`: prefix caching and end-of-turn snapshots (reuse) or neither,
    eager decode (TTFT is a prefill step, and capturing the decode graphs would cost the run's time)."""
    from mcserve.server.engine.args import EngineArgs, engine_config, size_pools
    from mcserve.server.engine.llm_engine import LLMEngine
    from mcserve.server.model.default import default_model_dir
    from mcserve.server.text.tokenizer import Tokenizer

    _, system, user, answer = chat_shape(turns)
    flags = dict(enable_prefix_caching=True, enable_snapshots=True) if reuse else dict(enable_prefix_caching=False)
    args = EngineArgs(device=str(model.device), max_num_seqs=4, max_model_len=system + turns * (user + answer) + 64,
                      enforce_eager=True, checkpoint_memory=4 * 2**30 if model.device.type == "cuda" else 2**28,
                      **flags)
    pools = size_pools(args, model.cfg, model.device, model.dtype, ckpt_dtype, model.state_dtype)
    return LLMEngine(model, Tokenizer.from_dir(default_model_dir()), engine_config(args, model.cfg, pools),
                     ckpt_dtype=ckpt_dtype, runner=args.runner_options())


def chat_ttft(model, turns: int, repeats: int, ckpt_dtype: torch.dtype) -> dict[str, list[float]]:
    """TTFT ms per turn (median over `repeats` chats after a warm-up chat) with reuse and without."""
    shape = chat_shape(turns)
    out = {}
    for mode in ("reuse", "no-reuse"):
        engine = chat_engine(model, ckpt_dtype, turns, mode == "reuse")
        chat(engine, *shape, seed=99)  # warm-up
        runs = [chat(engine, *shape, seed=r) for r in range(repeats)]
        out[mode] = [statistics.median(run[t][0] for run in runs) * 1000 for t in range(turns)]
        del engine
        gc.collect()
    return out


class Report:
    """What the run measured so far, rewritten to --out after every measurement."""

    def __init__(self, out: str | None, head: dict) -> None:
        self.dir = Path(out) if out else None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.data = {**head, "rows": [], "long": [], "skipped": []}

    def write(self) -> None:
        if self.dir is None:
            return
        (self.dir / "prefill.json").write_text(json.dumps(self.data, indent=1))
        (self.dir / "prefill.md").write_text(self.table() + "\n")

    def table(self) -> str:
        d = self.data
        lines = [f"machine: {d['machine']}",
                 f"model: random {d['preset']} preset, {d['params'] / 1e9:.2f}B parameters, {d['dtype']}, checkpoints "
                 f"{d['ckpt_dtype']}, segment {d['segment']}, prefill path {d['path']}; matmul "
                 f"{d['matmul_tflops']:.3g} TFLOP/s; {d.get('seconds', 0):.0f} s so far", "",
                 f"prefill tok/s, {d['prompt_len']}-token prompts:", "",
                 "| B | fla | none | none / fla | ssc k=4 | ssc / fla | timed calls |",
                 "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in d["rows"]:
            cells = [_cell(r, "fla tok/s"), _cell(r, "none tok/s"), _cell(r, "none / fla", "{:.0%}"),
                     _cell(r, "ssc k=4 tok/s"), _cell(r, "ssc k=4 / fla", "{:.0%}"), _cell(r, "repeats", "{}")]
            lines.append(f"| {r['B']} | " + " | ".join(cells) + " |")
        if d["long"]:
            lines += ["", "one long prompt:", "", "| path | tokens | tok/s | fraction of the matmul rate |",
                      "|---|---:|---:|---:|"]
            lines += [f"| {r['path']} | {r['tokens']} | {r['tok/s']:,.0f} | {r['fraction of matmul rate']:.1%} |"
                      for r in d["long"]]
        if "chat_ttft_ms" in d:
            t = d["chat_ttft_ms"]
            lines += ["", "chat TTFT ms, turn 2 / turn N (ratio): " + ", ".join(
                f"{m} {v[1]:.1f} / {v[-1]:.1f} ({v[-1] / v[1]:.2f}x)" for m, v in t.items())]
            lines += ["", "| turn | " + " | ".join(t) + " |", "|---:|" + "---:|" * len(t)]
            lines += [f"| {i + 1} | " + " | ".join(f"{v[i]:.1f}" for v in t.values()) + " |"
                      for i in range(len(next(iter(t.values()))))]
        if "alongside_decode" in d:
            m = d["alongside_decode"]
            overlap = f", overlapped on two streams {m['overlapped_s'] * 1000:.1f} ms" if "overlapped_s" in m else ""
            lines += ["", f"prefill chunks + decode rows: one pass {m['one_pass_s'] * 1000:.1f} ms, "
                      f"prefill then decode {m['two_passes_s'] * 1000:.1f} ms{overlap}"]
        if d["skipped"]:
            lines += ["", "skipped (time budget): " + ", ".join(d["skipped"])]
        return "\n".join(lines)


def _cell(row: dict, key: str, fmt: str = "{:,.0f}") -> str:
    return fmt.format(row[key]) if key in row else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="directory for prefill.json, prefill.md and the profiles")
    ap.add_argument("--tiny", action="store_true", help="a small model on the CPU: checks the script, not speed")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chat-repeats", type=int, default=1)
    ap.add_argument("--batch-sizes", default=None)
    ap.add_argument("--profile-batch", type=int, default=16)
    ap.add_argument("--budget-s", type=float, default=270.0, help="start no section after this many seconds")
    ap.add_argument("--batches-only", action="store_true", help="only section 2 (and 3 at --profile-batch)")
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
    ck = torch.bfloat16 if dev.type == "cuda" else model.state_dtype  # the engine's "auto" checkpoint dtype
    n_params = sum(p.numel() for p in model.parameters())
    kernels = select_kernels(dev, model.spec, dtype)
    specs = {"none": MCSpec("none", C), "ssc k=4": MCSpec("ssc", C, top_k=4)}
    fla_model = make_fla(preset, dev, dtype) if dev.type == "cuda" else None
    rep = Report(args.out, dict(machine=machine(), preset=preset, params=n_params, dtype=str(dtype),
                                ckpt_dtype=str(ck), segment=C, prompt_len=T, path=kernels.name,
                                matmul_tflops=tflops))

    def in_budget(section: str) -> bool:
        rep.data["seconds"] = time.perf_counter() - t_start
        if rep.data["seconds"] < args.budget_s:
            return True
        rep.data["skipped"].append(section)
        rep.write()
        print(f"skipped (time budget): {section}", flush=True)
        return False

    def free() -> None:
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    g = torch.Generator().manual_seed(0)
    for B in sizes:
        prompts = torch.randint(3, model.cfg.vocab_size, (B, T), generator=g)
        repeats = args.repeats if B * T <= 100_000 else 1
        row = {"B": B, "tokens": B * T, "repeats": repeats}
        rep.data["rows"].append(row)
        if fla_model is not None and in_budget(f"fla B={B}"):
            row["fla tok/s"] = B * T / timed(fla_prefill(fla_model, prompts), dev, repeats)
            rep.write()
        for name, spec in specs.items():
            if not in_budget(f"{name} B={B}"):
                continue
            use_spec(model, spec)
            row[f"{name} tok/s"] = B * T / timed(mcserve_prefill(model, prompts, kernels, ck), dev, repeats)
            if "fla tok/s" in row:
                row[f"{name} / fla"] = row[f"{name} tok/s"] / row["fla tok/s"]
            free()
            rep.write()
        print(row, flush=True)

        if dev.type == "cuda" and B == args.profile_batch and in_budget(f"profiles B={B}"):
            for name, spec in (("none", specs["none"]), ("ssc", specs["ssc k=4"])):
                use_spec(model, spec)
                text = profile(mcserve_prefill(model, prompts, kernels, ck),
                               f"mcserve {name}, B={B} x {T} tokens, {kernels.name}")
                if args.out:
                    (Path(args.out) / f"profile_{name}.txt").write_text(text + "\n")
                free()
            if fla_model is not None and args.out:
                text = profile(fla_prefill(fla_model, prompts), f"fla GatedDeltaNetForCausalLM, B={B} x {T} tokens")
                (Path(args.out) / "profile_fla.txt").write_text(text + "\n")
        free()

    if args.batches_only:
        rep.data["skipped"] += ["long prompt", "chat TTFT", "prefill + decode rows (--batches-only)"]
        rep.write()
        print("\n" + rep.table())
        return
    prompt = torch.randint(3, model.cfg.vocab_size, (1, long_T), generator=g)
    paths = [(name, spec) for name, spec in specs.items()] + ([("fla", None)] if fla_model is not None else [])
    for name, spec in paths:
        if not in_budget(f"{long_T}-token prompt {name}"):
            continue
        if spec is None:
            fn = fla_prefill(fla_model, prompt)
        else:
            use_spec(model, spec)
            fn = mcserve_prefill(model, prompt, kernels, ck)
        tps = long_T / timed(fn, dev, args.repeats)
        rep.data["long"].append({"path": name, "tokens": long_T, "tok/s": tps,
                                 "fraction of matmul rate": tps * 2 * n_params / (tflops * 1e12)})
        print(rep.data["long"][-1], flush=True)
        del fn
        free()
        rep.write()
    del fla_model
    free()

    if in_budget("chat TTFT"):
        use_spec(model, specs["ssc k=4"])
        rep.data["chat_ttft_ms"] = chat_ttft(model, turns, args.chat_repeats, ck)
        print(f"chat TTFT ms: {rep.data['chat_ttft_ms']}", flush=True)
        free()
        rep.write()
    if in_budget("prefill + decode rows"):
        use_spec(model, specs["ssc k=4"])
        B, T_mixed = (16, 256) if not args.tiny else (2, 32)
        rep.data["alongside_decode"] = alongside_decode(model, kernels, B, T_mixed, args.repeats)
        print(f"prefill + decode rows: {rep.data['alongside_decode']}", flush=True)
    rep.data["seconds"] = time.perf_counter() - t_start
    rep.write()
    print("\n" + rep.table())


if __name__ == "__main__":
    main()
