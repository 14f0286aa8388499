"""The CUDA runner's host logic on CPU (torch decode path, no graphs) against the torch runner, on
plans from a small hand-rolled scheduler that carries both the full read lists and the diffs:
greedy tokens and logprobs equal step by step, the device tables equal the plans' tables, and
nothing is sent in a steady decode step."""

from __future__ import annotations

import os
import random

import pytest
import torch

from mcserve.server.engine.config import EngineConfig
from mcserve.server.engine.plan import DecodeRow, PrefillChunk, StepPlan, TableEntry
from mcserve.server.engine.runner.cuda_runner import CudaModelRunner
from mcserve.server.engine.runner.torch_runner import TorchModelRunner
from mcserve.server.engine.sampler import SamplingRow
from mcserve.server.engine.sampling_params import SamplingParams
from mcserve.server.model.init_model import build_config, init_weights
from mcserve.server.model.model import MCGatedDeltaNetForCausalLM

C = 8


class _Seq:
    def __init__(self, seq_id: int, prompt: list[int], slot: int, max_out: int) -> None:
        self.seq_id, self.tokens, self.slot, self.max_out = seq_id, list(prompt), slot, max_out
        self.n_prompt, self.computed, self.table = len(prompt), 0, []


class PlanMaker:
    """Admits sequences, prefills them in chunks that end on boundaries (at most `chunk` tokens), then
    decodes them; allocates a block per boundary; sometimes drops a held block (a hole, ssc only);
    finishes sequences after max_out tokens and admits new ones into their slots and rows."""

    def __init__(self, num_blocks: int, slots: int, seed: int, holes: bool) -> None:
        self.rng = random.Random(seed)
        self.free = list(range(num_blocks))
        self.rng.shuffle(self.free)
        self.free_slots = list(range(slots))
        self.seqs: dict[int, _Seq] = {}
        self.next_id, self.holes = 0, holes
        self.released: list[int] = []

    def admit(self, n_prompt: int, max_out: int) -> None:
        prompt = [self.rng.randrange(3, 90) for _ in range(n_prompt)]
        s = _Seq(self.next_id, prompt, self.free_slots.pop(), max_out)
        self.seqs[s.seq_id] = s
        self.next_id += 1

    def finish(self, seq_id: int) -> None:
        s = self.seqs.pop(seq_id)
        self.free.extend(b for b in s.table if b >= 0)
        self.free_slots.append(s.slot)
        self.released.append(seq_id)

    def plan(self, step: int) -> StepPlan:
        decode, prefill, appends, updates, resets = [], [], [], [], []
        for s in self.seqs.values():
            if s.computed == 0:
                resets.append(s.slot)
            if s.computed < s.n_prompt:
                start = s.computed
                end = min(s.n_prompt, (start // C + 1 + self.rng.randrange(2)) * C)
                writes = []
                for _ in range(start // C, end // C):
                    b = self.free.pop()
                    writes.append(b)
                    appends.append(TableEntry(s.seq_id, len(s.table), b))
                    s.table.append(b)
                prefill.append(PrefillChunk(s.seq_id, s.slot, start, tuple(s.tokens[start:end]),
                                            tuple(s.table[:start // C]), tuple(writes), end == s.n_prompt))
            else:
                p = s.computed
                wb = -1
                if p % C == C - 1:
                    wb = self.free.pop()
                    appends.append(TableEntry(s.seq_id, len(s.table), wb))
                    s.table.append(wb)
                decode.append(DecodeRow(s.seq_id, s.slot, p, s.tokens[p], tuple(s.table[:p // C]), wb))
        if self.holes and step % 5 == 0:
            held = [(s, i) for s in self.seqs.values() for i, b in enumerate(s.table[:-1]) if b >= 0]
            if held:
                s, i = self.rng.choice(held)
                self.free.append(s.table[i])
                s.table[i] = -1
                updates.append(TableEntry(s.seq_id, i, -1))
                # rebuild the read lists planned above with the hole
                decode = [r if r.seq_id != s.seq_id else DecodeRow(r.seq_id, r.slot, r.position, r.token_id,
                                                                   tuple(s.table[:r.position // C]), r.write_block)
                          for r in decode]
                prefill = [c if c.seq_id != s.seq_id else PrefillChunk(
                    c.seq_id, c.slot, c.start_pos, c.token_ids, tuple(s.table[:c.start_pos // C]), c.write_blocks,
                    c.sample) for c in prefill]
        released, self.released = tuple(self.released), []
        return StepPlan(step, tuple(decode), tuple(prefill), tuple(resets), released=released,
                        table_appends=tuple(appends), table_updates=tuple(updates))

    def update(self, plan: StepPlan, tokens: dict[int, int]) -> None:
        for r in plan.decode:
            s = self.seqs[r.seq_id]
            s.computed += 1
            s.tokens.append(tokens[r.seq_id])
        for c in plan.prefill:
            s = self.seqs[c.seq_id]
            s.computed = c.end_pos
            if c.sample:
                s.tokens.append(tokens[c.seq_id])
        for s in list(self.seqs.values()):
            if len(s.tokens) - s.n_prompt >= s.max_out:
                self.finish(s.seq_id)


def _model(aggregation: str) -> MCGatedDeltaNetForCausalLM:
    mc = dict(aggregation=aggregation, segment_size=C, top_k=2, router="learned" if aggregation == "ssc" else "query")
    model = MCGatedDeltaNetForCausalLM(build_config("tiny", 97, mc))
    init_weights(model, seed=5)
    return model.eval()


def _params(seq_id: int) -> SamplingParams:
    if seq_id % 3 == 1:
        return SamplingParams(temperature=0.0, logprobs=2, repetition_penalty=1.2, prompt_logprobs=1)
    return SamplingParams(temperature=0.0, mc_top_k=1 if seq_id % 4 == 2 else None)


CASES = [("ssc", "torch", False), ("grm", "torch", False), ("residual", "torch", False), ("none", "torch", True),
         ("ssc", "triton", True)]


@pytest.mark.parametrize(("aggregation", "path", "pad"), CASES)
def test_cuda_runner_equals_torch_runner(aggregation: str, path: str, pad: bool) -> None:
    """pad: decode steps run at their graph bucket's batch size with padding rows; triton: the GPU's
    decode path and fused glue (under the interpreter on CPU)."""
    if path == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    model = _model(aggregation)
    cfg = EngineConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=160, segment_size=C,
                       num_state_slots=6, num_checkpoint_blocks=48)
    ref = TorchModelRunner(model, 6, 48, ckpt_dtype=torch.float32)
    cuda = CudaModelRunner(model, cfg, torch.float32, decode_path=path, pad_eager=pad)
    for pools in (ref.pools, cuda.pools):
        for t in (pools.states.ssm, pools.states.key_sum, pools.states.conv, pools.ckpts.ssm, pools.ckpts.key,
                  pools.ckpts.conv):
            t.fill_(float("nan"))
    maker = PlanMaker(48, 6, seed=7, holes=aggregation == "ssc")
    for n, out in ((13, 20), (30, 12), (8, 9), (21, 16)):
        maker.admit(n, out)
    sends, steady = 0, 0
    steps = 70 if path == "torch" else 16  # the interpreter is slow
    for step in range(1, steps):
        if len(maker.seqs) < 4 and step % 7 == 0:
            maker.admit(5 + step % 17, 6 + step % 5)
        plan = maker.plan(step)
        if plan.is_empty:
            break
        ids = {r.seq_id for r in plan.decode} | {c.seq_id for c in plan.prefill}
        sampling = {s: SamplingRow(_params(s), tuple(maker.seqs[s].tokens[:maker.seqs[s].n_prompt]),
                                   tuple(maker.seqs[s].tokens[maker.seqs[s].n_prompt:])) for s in ids}
        before = cuda.staging.num_sends
        want, got = ref.execute(plan, sampling), cuda.execute(plan, sampling)
        assert got.step.token_ids == want.step.token_ids, step
        assert got.logprobs.keys() == want.logprobs.keys()
        assert got.prompt_logprobs.keys() == want.prompt_logprobs.keys()
        for s, (first, entries) in want.prompt_logprobs.items():
            assert got.prompt_logprobs[s][0] == first
            assert [(r, [t for t, _ in top]) for _, r, top in got.prompt_logprobs[s][1]] == \
                [(r, [t for t, _ in top]) for _, r, top in entries]
        for s, (lp, top) in want.logprobs.items():
            assert got.logprobs[s][0] == pytest.approx(lp, abs=1e-5)
            assert [t for t, _ in got.logprobs[s][1]] == [t for t, _ in top]
        quiet = not (plan.prefill or plan.table_appends or plan.table_updates or plan.released)
        if quiet and cuda.batch.decode_seqs == [r.seq_id for r in plan.decode] and step > 2:
            steady += 1
            sends += cuda.staging.num_sends - before
        maker.update(plan, want.step.token_ids)
        for s in maker.seqs.values():
            if s.seq_id in cuda.batch.row_of:
                assert cuda.batch.host_table(s.seq_id) == s.table, (step, s.seq_id)
    assert steady > (5 if path == "torch" else 0) and sends == 0  # a steady decode step sends nothing
    assert maker.next_id > 4  # rows were recycled
    assert cuda.graphs.eager > 0 and (not pad or cuda.batch.num_decode < 4)


def test_utility_matches_the_torch_runners_block_weights() -> None:
    model = _model("ssc")
    cfg = EngineConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=160, segment_size=C,
                       num_state_slots=6, num_checkpoint_blocks=48, utility_decay=0.9)
    ref = TorchModelRunner(model, 6, 48, ckpt_dtype=torch.float32)
    cuda = CudaModelRunner(model, cfg, torch.float32)
    maker = PlanMaker(48, 6, seed=3, holes=False)
    for n in (20, 33, 9):
        maker.admit(n, 15)
    want: dict[int, float] = {}
    for step in range(1, 25):
        plan = maker.plan(step)
        sampling = {s.seq_id: SamplingRow(SamplingParams(temperature=0.0)) for s in maker.seqs.values()}
        out = ref.execute(plan, sampling)
        cuda.execute(plan, sampling)
        want = {b: w * 0.9 for b, w in want.items()}
        for b in list(want):
            if b in {x for c in plan.prefill for x in c.write_blocks} | {r.write_block for r in plan.decode}:
                del want[b]  # a fresh block's old weight is forgotten
        for b, w in out.step.block_weights.items():
            want[b] = want.get(b, 0.0) + w
        maker.update(plan, out.step.token_ids)
        if step % 6 == 0:
            weights = cuda.take_block_weights(step + 1)
            got = {b: w for b, w in enumerate(weights.tolist()) if w > 0}
            expect = {b: w * 0.9 for b, w in want.items() if w > 0}
            assert got.keys() == expect.keys()
            for b in got:
                assert got[b] == pytest.approx(expect[b], rel=1e-4)
            want = {}
