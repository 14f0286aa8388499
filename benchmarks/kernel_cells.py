"""The cells of benchmarks/kernels.py and benchmarks/kernel_sweep.py: the shapes, random pools per shape,
one timed measurement per call (eager and CUDA-graph replay), the byte count each measurement is judged
by, and the correctness checks."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from mcserve.kernels.decode import DecodeBatch, LayerMemory, get_decode_path
from mcserve.kernels.decode.residual import rebuild_ckpt_sum
from mcserve.kernels.decode.triton import triton_decode_step
from mcserve.kernels.decode.tuning import KernelConfig, card_of, choose_config
from mcserve.kernels.mc_spec import MCSpec

BF16 = torch.bfloat16
SEG = 256  # segment size C
SHAPES = {"a": dict(H=16, HV=16, dk=128, dv=128), "b": dict(H=6, HV=6, dk=256, dv=512),
          "c": dict(H=16, HV=32, dk=128, dv=128)}
SMOKE_SHAPES = {"a": dict(H=2, HV=4, dk=24, dv=40)}  # odd sizes, grouped v-heads: CPU under the interpreter


def mc_bytes(s: dict, B: int, agg: str, k: int, N: int, out_bytes: int = 2) -> int:
    """Bytes one step must move: fp32 state read + write, the checkpoints the aggregation reads (bf16;
    residual: its fp32 running sum), the segment keys scored (fp32), key sums, inputs, table, output."""
    H, HV, dk, dv = s["H"], s["HV"], s["dk"], s["dv"]
    state = HV * dv * dk
    per_row = 2 * 4 * state + 2 * 4 * H * dk + 2 * (3 * H * dk + HV * dv + 2 * HV) + out_bytes * HV * dv
    if agg == "ssc":
        per_row += 2 * min(k, N) * state + 4 * N * H * dk + 8 * N
    elif agg == "grm":
        per_row += 2 * N * state + 4 * N * H * dk + 8 * N
    elif agg == "residual":
        per_row += 4 * state
    return B * per_row


class Cells:
    def __init__(self, device: torch.device, cfg: dict, seg: int, deadline: float, quiet: bool = False) -> None:
        self.dev, self.cfg, self.seg, self.deadline, self.quiet = device, cfg, seg, deadline, quiet
        self.t0 = time.monotonic()
        self.skipped: list[str] = []
        self.fla_fn, self.fla_status = _fla()
        self._pools: dict[str, dict] = {}
        self.slots = max(cfg["batches"] + [cfg.get("sdpa_batch", 1)])  # state slots per pool
        self._tables: dict[tuple, torch.Tensor] = {}
        self.graph_reps = 5  # timed replays per graph (the median is reported)
        self.graph_errors: list[str] = []
        self.gen = torch.Generator(device=device).manual_seed(0)

    # ---- timing ----
    def bench(self, fn) -> float:
        """Median milliseconds of one eager call of fn (CUDA: triton's do_bench, L2 flushed between runs):
        what a step costs launched from Python, the host's launch work included."""
        if self.dev.type == "cuda":
            import triton.testing  # noqa: PLC0415

            return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
        fn()  # off CUDA (the interpreter's smoke runs) one timed call after a warm-up is enough
        t = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t)

    def graph_bench(self, make, n: int) -> float | None:
        """Median milliseconds per call of the n calls make(0) .. make(n-1) captured back to back in one
        CUDA graph and replayed (CUDA events), as the engine replays its decode step: no host launch
        floor. None off CUDA. The calls touch different slots and blocks, so the graph does not run
        from L2."""
        if self.dev.type != "cuda":
            return None
        fns = [make(i) for i in range(n)]
        fns[0]()  # compile, autotune (fla), grow the kernels' scratch buffers: nothing of that in a capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                for fn in fns:
                    fn()
        except Exception as e:  # noqa: BLE001 (a step that cannot be captured keeps its eager column)
            self.graph_errors.append(f"{type(e).__name__}: {e}"[:300])
            print("graph capture failed:", self.graph_errors[-1], flush=True)
            return None
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(self.graph_reps):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        del graph
        return statistics.median(times) / len(fns)

    def launches(self, B: int) -> int:
        """Calls per captured graph: at least 20, and enough that a small batch cycles through every
        state slot of the pool (B=1 at shape a: 128 calls over 128 MiB of state, 2.5x the L2)."""
        return max(20, min(128, -(-self.slots // B)))

    def late(self, label: str, deadline: float | None = None) -> bool:
        if time.monotonic() > min(self.deadline, deadline or math.inf):
            self.skipped.append(label)
            return True
        return False

    def log(self, r: dict) -> dict:
        """One progress line per timed cell unless quiet (the first call of a config includes its Triton
        compile)."""
        if self.quiet:
            return r
        where = (f"{r['path']} B={r['B']} context={r['len']}" if "len" in r else
                 f"{r['path']} {r['shape']} B={r['B']} {r['agg']} k={r['k']} N={r['N']}")
        eager = f"eager {r['ms']:.4f} ms" if r["ms"] is not None else "eager -"
        graph = f"graph {r['graph_ms']:.4f} ms {r['graph_gbps']:.0f} GB/s" if r["graph_ms"] is not None else "graph -"
        print(f"[{time.monotonic() - self.t0:6.1f}s] {where} {r.get('config', '')}: {eager}, {graph}", flush=True)
        return r

    @staticmethod
    def row(path: str, ms: float | None, graph_ms: float | None, nbytes: int, **what) -> dict:
        """A timed cell: eager and graph-replay milliseconds, the bytes it must move, GB/s of each."""
        return dict(path=path, **what, ms=ms, graph_ms=graph_ms, bytes=nbytes,
                    gbps=nbytes / ms / 1e6 if ms else None, graph_gbps=nbytes / graph_ms / 1e6 if graph_ms else None)

    def copy_bandwidth(self) -> float:
        n = (1 << 30 if self.dev.type == "cuda" else 1 << 24) // 4
        src = torch.randn(n, device=self.dev, generator=self.gen)
        dst = torch.empty_like(src)
        ms = self.bench(lambda: dst.copy_(src))
        return 2 * 4 * n / ms / 1e6

    # ---- data ----
    def rand(self, *shape: int, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, device=self.dev, generator=self.gen) * scale).to(dtype)

    def pools(self, name: str, s: dict) -> dict:
        """A bf16 checkpoint pool of cfg pool_bytes (2 GiB: 34x the H200's L2), keys, and state slots for
        the largest batch, all random."""
        if name not in self._pools:
            H, HV, dk, dv = s["H"], s["HV"], s["dk"], s["dv"]
            per_block = HV * dv * dk * 2
            P = max(self.cfg["cached"] * 4, self.cfg["pool_bytes"] // per_block)
            self._pools[name] = dict(
                P=P, ckpt=self.rand(P, HV, dv, dk, dtype=BF16, scale=0.05),
                keys=F.normalize(self.rand(P, H, dk), dim=-1),
                state=self.rand(self.slots, HV, dv, dk, scale=0.05), key_sum=self.rand(self.slots, H, dk),
                utility=torch.zeros(P, device=self.dev))
        return self._pools[name]

    def memory(self, name: str, s: dict, residual: bool = False) -> LayerMemory:
        """The shape's pools as one layer's memory; with `residual` also a random checkpoint-sum pool."""
        p = self.pools(name, s)
        if residual and "ckpt_sum" not in p:
            p["ckpt_sum"] = self.rand(*p["state"].shape, scale=0.05)
        return LayerMemory(p["state"], p["key_sum"], p["ckpt"], p["keys"], p["ckpt_sum"] if residual else None,
                           p["utility"])

    def inputs(self, s: dict, B: int) -> tuple:
        H, HV, dk, dv = s["H"], s["HV"], s["dk"], s["dv"]
        return (self.rand(B, H, dk, dtype=BF16), self.rand(B, H, dk, dtype=BF16), self.rand(B, HV, dv, dtype=BF16),
                self.rand(B, HV, dtype=BF16), self.rand(B, HV, dtype=BF16), self.rand(B, H, dk, dtype=BF16),
                self.rand(HV, scale=0.5), self.rand(HV, scale=0.5))

    def window(self, B: int, i: int) -> slice:
        """The state slots of a graph's i-th call: consecutive windows of B slots, round the pool."""
        w = i % max(1, self.slots // B)
        return slice(w * B, (w + 1) * B)

    def batch(self, name: str, s: dict, B: int, N: int, i: int = 0, boundary_row: bool = False,
              top_k_max: int | None = None) -> DecodeBatch:
        """B rows at position N*C + 17 in the slots of `window(B, i)`, each with N random cached blocks."""
        P = self.pools(name, s)["P"]
        key = (name, B, N, i)
        if key not in self._tables:  # the same tables for every config timed at this (shape, B, N)
            self._tables[key] = torch.randint(0, P - B, (B, N), device=self.dev, generator=self.gen)
        table = self._tables[key]
        pos = torch.full((B,), N * self.seg + 17, device=self.dev)
        writes = torch.full((B,), -1, device=self.dev)
        if boundary_row:  # row 0 ends its segment and writes into a block no table holds
            pos[0], writes[0] = N * self.seg + self.seg - 1, P - 1
        slots = torch.arange(B, device=self.dev) + self.window(B, i).start
        return DecodeBatch(pos, slots, table, writes, top_k_max=top_k_max,
                           write_rows=torch.zeros(0, dtype=torch.long, device=self.dev) if not boundary_row else None)

    # ---- measurements ----
    def mc(self, name: str, s: dict, B: int, agg: str, k: int, N: int, config: KernelConfig | None,
           deadline: float | None = None, eager: bool = True) -> dict | None:
        """The Triton step, eager (unless eager=False) and under graph replay; config None: the one the
        wrapper chooses (the card's table, else the fallback), named in the row."""
        label = f"triton {name} B={B} {agg} k={k} N={N} {config}"
        if self.late(label, deadline):
            return None
        N = 0 if agg == "none" else N
        call = self.step_calls(name, s, B, agg, k, N, config)
        ms = self.bench(call(0)) if eager else None
        graph_ms = self.graph_bench(call, self.launches(B))
        chosen = config or choose_config(card_of(self.dev), s["H"], s["HV"], s["dk"], s["dv"], agg, max(k, 1), B)
        return self.log(self.row("triton", ms, graph_ms, mc_bytes(s, B, agg, k, N), shape=name, B=B, agg=agg, k=k,
                                 N=N, config=str(chosen)))

    def step_calls(self, name: str, s: dict, B: int, agg: str, k: int, N: int, config: KernelConfig | None):
        """i -> a call of the Triton step on the i-th graph call's slots and tables."""
        memory, x = self.memory(name, s, residual=agg == "residual"), self.inputs(s, B)
        spec = MCSpec(agg, self.seg, top_k=max(k, 1))

        def call(i: int):
            batch = self.batch(name, s, B, N, i, top_k_max=max(k, 1))
            return lambda: triton_decode_step(*x, spec=spec, batch=batch, memory=memory, out_dtype=BF16,
                                              config=config)

        return call

    def torch_path(self, name: str, s: dict, B: int, k: int, N: int) -> dict | None:
        """The torch path, eager only (the engine serves it where there are no graphs)."""
        agg = "none" if k == 0 else "ssc"
        if self.late(f"torch {name} B={B} k={k}"):
            return None
        N = 0 if agg == "none" else N
        batch = replace(self.batch(name, s, B, N, top_k_max=max(k, 1)), live_rows=torch.arange(B, device=self.dev))
        memory, x = self.memory(name, s), self.inputs(s, B)
        fn = get_decode_path("torch")
        spec = MCSpec(agg, self.seg, top_k=max(k, 1))
        ms = self.bench(lambda: fn(*x, spec=spec, batch=batch, memory=memory, out_dtype=BF16))
        return self.log(self.row("torch", ms, None, mc_bytes(s, B, agg, k, N), shape=name, B=B, agg=agg, k=k, N=N))

    def fla(self, name: str, s: dict, B: int) -> dict | None:
        """fla 0.6's fused recurrent step with the same fused gates and norms, state [B, HV, dv, dk], eager and
        under graph replay (its calls cycle through the slots as the Triton cells do); None (and fla_status
        says why) when fla is missing or fails: its column is then n/a, the run goes on."""
        fr = self.fla_fn
        if fr is None or self.late(f"fla {name} B={B}"):
            return None
        q, k, v, a, b, _, A_log, dt_bias = self.inputs(s, B)
        state = self.pools(name, s)["state"]

        def call(i: int):
            h0 = state[self.window(B, i)]
            return lambda: fr(q[:, None], k[:, None], v[:, None], g=a[:, None], beta=b[:, None], initial_state=h0,
                              output_final_state=True, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                              A_log=A_log, dt_bias=dt_bias, use_beta_sigmoid_in_kernel=True, state_v_first=True)

        try:
            ms = self.bench(call(0))
        except Exception as e:  # noqa: BLE001 (a broken fla costs its column, not the run)
            self.fla_fn, self.fla_status = None, f"failed at {name} B={B}: {type(e).__name__}: {e}"[:300]
            print("fla", self.fla_status, flush=True)
            return None
        try:
            graph_ms = self.graph_bench(call, self.launches(B))
        except Exception as e:  # noqa: BLE001 (fla that cannot be captured keeps its eager column)
            graph_ms, self.fla_status = None, f"graph capture failed at {name} B={B}: {type(e).__name__}: {e}"[:300]
            print("fla", self.fla_status, flush=True)
        H, HV, dk, dv = s["H"], s["HV"], s["dk"], s["dv"]
        nbytes = B * (2 * 4 * HV * dv * dk + 2 * (2 * H * dk + 2 * HV * dv + 2 * HV))
        return self.log(self.row("fla", ms, graph_ms, nbytes, shape=name, B=B, agg="none", k=0, N=0))

    def sdpa(self, s: dict, B: int, length: int) -> dict | None:
        """Flash SDPA decode: one bf16 query token over a `length`-token KV cache, the same heads."""
        if self.late(f"sdpa B={B} L={length}"):
            return None
        H, dk = s["H"], s["dk"]
        q = self.rand(B, H, 1, dk, dtype=BF16)
        kv = [self.rand(B, H, length, dk, dtype=BF16) for _ in range(2)]
        backend = [torch.nn.attention.SDPBackend.FLASH_ATTENTION] if self.dev.type == "cuda" else \
            [torch.nn.attention.SDPBackend.MATH]
        with torch.nn.attention.sdpa_kernel(backend):
            ms = self.bench(lambda: F.scaled_dot_product_attention(q, kv[0], kv[1]))
            # one 32K cache is many times the L2, so the graph's calls may all read the same one
            graph_ms = self.graph_bench(lambda i: lambda: F.scaled_dot_product_attention(q, kv[0], kv[1]), 20)
        r = self.log(self.row("sdpa", ms, graph_ms, 2 * B * H * length * dk * 2, B=B, len=length))
        kv.clear()  # free the cache before the next cell
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()
        return r

    # ---- correctness ----
    def check(self, name: str, s: dict) -> dict:
        """Triton against the torch path at a real size (a boundary row included), and `none` against fla:
        max |difference| / max |reference| of y and of the updated states."""
        B, N = self.cfg["check_batch"], self.cfg["cached"]
        errors = {}
        for agg, k, n in [("none", 1, 0), ("ssc", 4, N), ("grm", 1, min(N, 16)), ("residual", 1, N)]:
            batch, memory = self.batch(name, s, B, n, boundary_row=True), self.memory(name, s)
            csum = None
            if agg == "residual":
                csum = torch.empty_like(memory.state[:B])
                for r in range(B):
                    rebuild_ckpt_sum(csum[r], memory.ckpt, batch.block_table[r])
            x = self.inputs(s, B)
            spec = MCSpec(agg, self.seg, top_k=k)
            ys, states = [], []
            for path in ("triton", "torch"):
                mem = LayerMemory(memory.state[:B].clone(), memory.key_sum[:B].clone(), memory.ckpt, memory.ckpt_key,
                                  None if csum is None else csum.clone(), None)
                ys.append(get_decode_path(path)(*x, spec=spec, batch=batch, memory=mem).float())
                states.append(torch.cat([mem.state.flatten(), mem.ckpt[-1].float().flatten()]))
            errors[agg] = dict(y=_rel(ys[0], ys[1]), state=_rel(states[0], states[1]))
        out = dict(what="triton vs torch path", shape=name, B=B, errors=errors)
        if self.fla_fn is not None:
            try:
                out["vs_fla_none"] = self._check_fla(name, s, B)
            except Exception as e:  # noqa: BLE001 (as in fla(): the run goes on without fla)
                self.fla_fn, self.fla_status = None, f"failed in the check: {type(e).__name__}: {e}"[:300]
                print("fla", self.fla_status, flush=True)
        return out

    def _check_fla(self, name: str, s: dict, B: int) -> dict:
        """Triton `none` against fla's fused recurrent step in fp32."""
        fr = self.fla_fn
        batch, memory = self.batch(name, s, B, 0), self.memory(name, s)
        q, k, v, a, b, _, A_log, dt_bias = self.inputs(s, B)
        h0 = memory.state[:B].clone()
        mem = LayerMemory(h0.clone(), memory.key_sum[:B].clone(), memory.ckpt, memory.ckpt_key)
        y = triton_decode_step(q, k, v, a, b, None, A_log, dt_bias, spec=MCSpec("none", self.seg), batch=batch,
                               memory=mem)
        o, ht = fr(q[:, None].float(), k[:, None].float(), v[:, None].float(), g=a[:, None].float(),
                   beta=b[:, None].float(), initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True,
                   use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias, use_beta_sigmoid_in_kernel=True,
                   state_v_first=True)
        return dict(y=_rel(y, o[:, 0]), state=_rel(mem.state, ht))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def _fla():
    """(fla 0.6's fused recurrent step, "ok") or (None, why not): fla needs its wheels and einops."""
    try:
        from fla.ops.gated_delta_rule.fused_recurrent import fused_recurrent_gated_delta_rule  # noqa: PLC0415
    except Exception as e:  # noqa: BLE001 (ImportError, or a version that fails at import)
        return None, f"not importable: {type(e).__name__}: {e}"[:300]
    return fused_recurrent_gated_delta_rule, "ok"
