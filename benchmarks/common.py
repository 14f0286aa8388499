"""Shared bits of the benchmark scripts: a model directory to run on, a description of the machine, the
device copy bandwidth, table cell formats."""

from __future__ import annotations

import os
import platform
import tempfile
from pathlib import Path

import torch

DEFAULT_MC = {"aggregation": "ssc", "segment_size": 16, "top_k": 2, "router": "learned"}


def model_dir(path: str | None, preset: str) -> Path:
    """`path` if given, else a random `preset` model with SSC written once to the temp directory."""
    if path:
        return Path(path)
    out = Path(tempfile.gettempdir()) / f"mcserve-bench-{preset}-ssc"
    if not (out / "model.safetensors").is_file():
        from mcserve.server.model.init_model import init_model

        init_model(out, preset=preset, mc=DEFAULT_MC, seed=0)
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"{dev}, Python {platform.python_version()}")


def start_decoding(engine, prompts: list[list[int]], params, rng_seed: int = 0) -> list[str]:
    """Queue one request per prompt and put its sequence straight into decoding, as if its prefill had
    run: `len(prompt) - 1` tokens computed (the last token is the first decode input), a checkpoint
    block held per whole segment before that, a state slot, and (with prefix caching) the prompt's
    prefix hashes, as admission computes them. The blocks and slots keep whatever the
    pools hold (random after `fill_pools`): what a decode step costs does not depend on their values,
    and skipping the prefill keeps a large batch's set-up within a GPU run's minutes. Not for
    residual aggregation (its running sums are built only by a prefill). Returns the request ids."""
    import bisect

    from mcserve.server.engine.client import GenerateRequest
    from mcserve.server.engine.sequence import SequenceStatus

    sched, C = engine.scheduler, engine.config.segment_size
    ids = []
    for i, prompt in enumerate(prompts):
        rid = f"decode-{rng_seed}-{i}"
        engine.add_request(GenerateRequest(rid, tuple(prompt), params))
        ids.append(rid)
    for seq in list(sched.waiting):
        pos = seq.num_tokens - 1
        for _ in range(pos // C):
            assert sched.cache.allocate(seq.seq_id, evict_running=False), "checkpoint pool too small"
        slot = sched.pool.alloc()
        assert slot is not None, "state slots too few"
        sched.waiting.remove(seq)
        seq.status, seq.slot = SequenceStatus.RUNNING, slot
        seq.num_computed_tokens = seq.num_prefill_tokens = pos
        if engine.config.enable_prefix_caching:
            seq.prefix_hashes(C)
        bisect.insort(sched.running, seq, key=lambda s: s.sort_key)
    return ids


def fill_pools(runner, seed: int = 0) -> None:
    """Small random values in every state slot and checkpoint block (no NaN or zero-only inputs)."""
    g = torch.Generator(device=runner.pools.states.ssm.device).manual_seed(seed)
    for t in (runner.pools.states.ssm, runner.pools.states.conv, runner.pools.ckpts.ssm, runner.pools.ckpts.conv):
        if t.numel():
            t.normal_(0.0, 0.02, generator=g)
    for t in (runner.pools.states.key_sum, runner.pools.ckpts.key):
        if t.numel():
            t.uniform_(0.0, 1.0, generator=g)


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30) -> float:
    """GB/s of a device-to-device copy (bytes read + bytes written) / time; nan off CUDA."""
    if device.type != "cuda":
        return float("nan")
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    end.synchronize()
    del a, b
    return 2 * nbytes * 10 / (start.elapsed_time(end) * 1e-3) / 1e9


def fmt_ms(x: float | None) -> str:
    return f"{x:.4f}" if x is not None else "-"


def fmt_frac(x: float | None) -> str:
    return f"{x:.2f}" if x is not None else "-"
