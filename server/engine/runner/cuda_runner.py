"""The CUDA runner: a persistent batch on the device, decode steps replayed from CUDA graphs,
sampling on the device. docs/RUNNER.md has the per-step data flow.

Per step, in plan.py's order:
1. the plan's diffs (rows released and added, table appends and updates, rows joining the decode
   set, new rows' sampling parameters, blocks handed to new owners) go into one pinned buffer and
   to the device in one non-blocking copy (`Staging`), where each piece is scattered into the
   persistent tensors; a steady decode step has no diffs and sends nothing;
2. block copies, slot resets and restores (`DevicePools.prepare`);
3. every prefill chunk in one `model.prefill_batch` (fla + Triton on CUDA), eager;
4. the decode rows: the graph of the step's (batch, table width) buckets gathers each row's inputs
   from the persistent batch, runs `DecodeStep` (the Triton decode path) and advances the positions;
5. one `DeviceSampler` call over the prefill rows that sample and the decode rows, its tokens
   written back as the rows' next inputs, and one device->host copy of the tokens (and logprobs).

`launch` does 1-5 and starts the copy (non-blocking, into one of two pinned buffer sets);
`collect` waits for it. `execute` is both; the engine's async scheduling launches step n+1 before
it collects step n (`overlaps`): every input of a decode step is already on the device.

Router weights accumulate in a device [blocks] tensor (`BlockUtility`) that the cache reads when it
must pick a victim. The same class runs on CPU tensors with the torch decode path and graphs off,
which is how its host logic is tested.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from mcserve.kernels.decode import get_decode_path
from mcserve.kernels.decode.residual import rebuild_ckpt_sum
from mcserve.kernels.prefill.batched import select_kernels
from mcserve.server.engine.config import EngineConfig
from mcserve.server.engine.plan import PrefillChunk, StepOutput, StepPlan
from mcserve.server.engine.runner.base import (
    Logprobs,
    ModelRunner,
    RunnerOutput,
    prefill_inputs,
    prefill_modes,
    request_top_k,
    split_prefill_logits,
)
from mcserve.server.engine.runner.block_utility import BlockUtility
from mcserve.server.engine.runner.cuda_graphs import DecodeGraphs, batch_buckets, width_buckets
from mcserve.server.engine.runner.device_batch import DeviceBatch
from mcserve.server.engine.runner.device_sampler import DeviceSampler, HostSample, OutputCopy, to_host
from mcserve.server.engine.runner.pools import DevicePools
from mcserve.server.engine.runner.prompt_logprobs import PromptLogprob
from mcserve.server.engine.runner.sampler_rows import SamplerRows
from mcserve.server.engine.runner.staging import Staging
from mcserve.server.engine.sampler import SamplingRow
from mcserve.server.model.decode_step import TORCH_GLUE, DecodeStep, triton_glue
from mcserve.server.model.model import MCGatedDeltaNetForCausalLM

if TYPE_CHECKING:  # masks.py imports llguidance, which may be missing (structured/grammars.py)
    from mcserve.server.engine.structured.masks import TokenMasks


@dataclass(frozen=True, slots=True)
class _Launched:
    """A step launched and not yet collected: whose rows its sampled tokens are, in order."""

    seq_ids: list[int]
    logprobs_asked: list[int]  # per row, top logprobs asked (-1: none); [] when no row asked
    sample: HostSample | None  # None: nothing sampled
    prompt_logprobs: dict[int, tuple[int, list[PromptLogprob]]]
    failed: dict[int, Exception]


class CudaModelRunner(ModelRunner):
    keeps_tables = True
    overlaps = True

    def __init__(self, model: MCGatedDeltaNetForCausalLM, config: EngineConfig, ckpt_dtype: torch.dtype | None = None,
                 seed: int | None = None, vocab_size: int | None = None, masks: TokenMasks | None = None,
                 enforce_eager: bool = False, cuda_graph_sizes: list[int] | None = None,
                 decode_path: str | None = None, pad_eager: bool = False, decode_matmul: str = "auto") -> None:
        """decode_path: "triton" (default on CUDA; its fused glue too) or "torch" (default on CPU). CUDA
        graphs need CUDA and are off with `enforce_eager`; `cuda_graph_sizes` replaces the default batch
        buckets. pad_eager: eager steps run padded to their bucket as a graph would (tests, on CPU).
        decode_matmul: "auto" = the card's measured matmul table on the Triton path on CUDA
        (`RunnerOptions.decode_matmul`), "cublas"."""
        self.model, self.masks, self.config = model, masks, config
        self.device = model.device
        self.spec = spec = model.spec
        cuda = self.device.type == "cuda"
        C = spec.segment_size
        self.scratch = config.num_checkpoint_blocks  # the scratch block: graph writes aimed at "no block"
        self.pools = DevicePools(model, config.num_state_slots, config.num_checkpoint_blocks, config.num_host_blocks,
                                 ckpt_dtype, scratch_blocks=1)
        st = self.pools.states
        self.ckpt_sum = None  # residual reads the running sum of a slot's checkpoints
        if spec.aggregation == "residual":
            self.ckpt_sum = torch.zeros(st.ssm.shape, dtype=torch.float32, device=self.device)
        self.selections = torch.zeros(model.cfg.num_hidden_layers, dtype=torch.long, device=self.device)
        width = -(-config.max_model_len // C)
        self.batch = DeviceBatch(config.max_num_seqs, width, C, spec.top_k, self.device)
        self.utility = BlockUtility(config.num_checkpoint_blocks, config.utility_decay, self.device)
        self.sampler_rows = SamplerRows(config.max_num_seqs, vocab_size or model.cfg.vocab_size, self.device, seed)
        self.sampler = DeviceSampler(self.sampler_rows)
        self.staging = Staging(self.device)
        self.output_copy = OutputCopy(self.device)
        path = decode_path or ("triton" if cuda else "torch")
        self.decode_path = path
        matmuls = None
        if path == "triton" and cuda and decode_matmul == "auto":
            from mcserve.kernels import triton_mm

            matmuls = triton_mm.table_for(torch.cuda.get_device_name(self.device))
        self.matmul_table = matmuls.source if matmuls is not None else None
        self.step_fn = DecodeStep(model, get_decode_path(path), triton_glue() if path == "triton" else TORCH_GLUE,
                                  matmuls=matmuls)
        self.prefill_kernels = select_kernels(self.device, spec, model.dtype)
        self.graphs = DecodeGraphs(self._forward, batch_buckets(config.max_num_seqs, cuda_graph_sizes),
                                   width_buckets(width), enabled=cuda and not enforce_eager, pad_eager=pad_eager)
        self.capture_seconds = self.graphs.capture()

    def _forward(self, rows: int, width: int) -> torch.Tensor:
        """The decode step of order[:rows] (static shapes, no sync: what the graphs capture); the rows'
        positions advance, and a boundary row's checkpoint (conv state included) is written, inside."""
        states, ckpts = self.pools.states, self.pools.ckpts
        tokens, batch = self.batch.step_inputs(rows, width, self.spec.top_k, self.utility.acc, self.scratch,
                                               fused=self.decode_path == "triton")
        return self.step_fn(tokens, batch, states, ckpts, self.ckpt_sum, self.utility.acc)

    def execute(self, plan: StepPlan, sampling: Mapping[int, SamplingRow]) -> RunnerOutput:
        return self.collect(self.launch(plan, sampling))

    @torch.inference_mode()
    def launch(self, plan: StepPlan, sampling: Mapping[int, SamplingRow]) -> _Launched:
        """Stages 1-5 of `plan` queued on the device, and the copy of its results started; no sync."""
        st = self.staging
        self.utility.begin(plan.step)
        # stages 1-3 first: they touch only the pools, which the diffs below do not
        self.pools.copy(plan)
        bad_slots = self.pools.prepare_slots(plan)
        failed = {c.seq_id: bad_slots[c.slot] for c in plan.prefill if c.slot in bad_slots}
        chunks = [c for c in plan.prefill if c.slot not in bad_slots]
        changes = self.batch.stage(plan, lambda seq_id: self.spec.top_k, st)
        self.sampler_rows.clear([r for r in changes.cleared if r in self.sampler_rows])
        sample_chunks = [c for c in chunks if c.sample]
        sample_rows = [self.batch.row_of[c.seq_id] for c in sample_chunks]
        self._set_sampling(sample_chunks, sample_rows, changes, sampling, st)
        fresh = [b for c in plan.prefill for b in c.write_blocks] + [c.dst for c in plan.onloads]
        fresh_piece = st.put(np.asarray(fresh, dtype=np.int64)) if fresh else None
        rows_piece = st.put(np.asarray(sample_rows, dtype=np.int64)) if sample_rows else None
        if fresh_piece is not None:
            st.then(lambda: self.utility.forget(fresh_piece.get()))
        st.send()
        added = {seq_id for _, seq_id in changes.added}
        logits: list[torch.Tensor] = []
        prompt_lps: dict[int, tuple[int, list[PromptLogprob]]] = {}
        if chunks:
            self._prefill(chunks, sampling, added, logits, prompt_lps)
        B = self.batch.num_decode
        if B:
            logits.append(self.graphs.run(B, self.batch.table_width)[:B])
        if not logits:
            return _Launched([], [], None, prompt_lps, failed)
        seq_ids, asked, sample = self._sample(logits, sample_chunks, sample_rows, rows_piece, B)
        return _Launched(seq_ids, asked, sample, prompt_lps, failed)

    def collect(self, launched: object) -> RunnerOutput:
        """The output of a launched step: waits for its copy (the step's one sync)."""
        assert isinstance(launched, _Launched), type(launched)
        if launched.sample is None:
            return RunnerOutput(StepOutput({}), {}, launched.prompt_logprobs, launched.failed)
        seq_ids, asked = launched.seq_ids, launched.logprobs_asked
        host = to_host(launched.sample, asked)
        token_ids = dict(zip(seq_ids, host.token_ids, strict=True))
        lps: Logprobs = {}
        if host.logprobs is not None:
            assert host.top_logprobs is not None
            for s, k, lp, top in zip(seq_ids, asked, host.logprobs, host.top_logprobs, strict=True):
                if k >= 0:
                    lps[s] = (lp, top)
        return RunnerOutput(StepOutput(token_ids), lps, launched.prompt_logprobs, launched.failed)

    def _set_sampling(self, chunks, chunk_rows: list[int], changes, sampling: Mapping[int, SamplingRow],
                      st: Staging) -> None:
        """Rows that sample for the first time get their sampling parameters and SSC k (a chunk that
        does not sample may have no SamplingRow, so rows get them when they first sample)."""
        todo = [(row, c.seq_id) for row, c in zip(chunk_rows, chunks, strict=True) if row not in self.sampler_rows]
        todo += [(row, s) for row, s in changes.joined if row not in self.sampler_rows and (row, s) not in todo]
        if not todo:
            return
        self.sampler_rows.set([r for r, _ in todo], [sampling[s] for _, s in todo], st)
        ks = [(r, request_top_k(self.spec, sampling, s) or self.spec.top_k) for r, s in todo]
        piece = st.put(np.asarray(ks, dtype=np.int64))

        def apply() -> None:
            k = piece.get()
            self.batch.top_k[k[:, 0]] = k[:, 1]

        st.then(apply)

    def _prefill(self, prefill: list[PrefillChunk], sampling: Mapping[int, SamplingRow], added: set[int],
                 logits: list[torch.Tensor], prompt_lps: dict[int, tuple[int, list[PromptLogprob]]]) -> None:
        states, ckpts = self.pools.states, self.pools.ckpts
        if self.ckpt_sum is not None:  # a sequence new to the runner: its slot's sum from its table
            for c in prefill:
                if c.seq_id in added:
                    rebuild_ckpt_sum(self.ckpt_sum[:, c.slot], ckpts.ssm, c.read_blocks)
        modes = prefill_modes(sampling, prefill)
        out = self.model.prefill_batch(prefill_inputs(self.spec, sampling, prefill, modes), states, ckpts,
                                       self.prefill_kernels, self.selections, self.utility.acc)
        if self.ckpt_sum is not None:
            for c in prefill:
                for b in c.write_blocks:
                    self.ckpt_sum[:, c.slot] += ckpts.ssm[b].to(self.ckpt_sum.dtype)
        logits += split_prefill_logits(prefill, out.logits, modes, sampling, self.sampler.vocab_size, prompt_lps)

    def _sample(self, logits: list[torch.Tensor], chunks, chunk_rows: list[int], rows_piece, B: int
                ) -> tuple[list[int], list[int], HostSample]:
        """Sample every row that samples, its token written back as the row's next input; the copy of
        the results started. Returns (seq ids, top logprobs asked per row, the copy)."""
        parts = ([rows_piece.get()] if rows_piece is not None else []) + ([self.batch.order[:B]] if B else [])
        rows = torch.cat(parts) if len(parts) > 1 else parts[0]
        seq_ids = [c.seq_id for c in chunks] + self.batch.decode_seqs
        allowed = self.masks.bitmask(seq_ids) if self.masks is not None else None
        sample = self.sampler(torch.cat(logits) if len(logits) > 1 else logits[0], rows, allowed)
        self.batch.tokens[rows] = sample.tokens  # the next decode input of every row that sampled
        asked = self.sampler_rows.logprobs_asked(chunk_rows + self.batch.decode_rows) if sample.packed is not None \
            else []
        return seq_ids, asked, self.output_copy.start(sample)  # the step's one device->host copy

    def take_selections(self) -> list[int]:
        """Checkpoint reads per layer by prefill chunks (the fused decode kernel does not count its own)."""
        counts = self.selections.tolist()
        self.selections.zero_()
        return counts

    def take_block_weights(self, now: int) -> np.ndarray:
        """[blocks] float64 router weight per GPU block since the last call, decayed to step `now` (one copy)."""
        return self.utility.take(now)
