"""Property: whatever the cache does, a request gets the greedy tokens of a cold engine.

Random mixes on the real tiny model (random weights, CPU, fp32 checkpoints, segment 8): prompts that
share a system prefix, next turns of finished requests, sessions, API keys, cache salts, per-request
`mc_top_k`, `n` > 1, aborts, and pools small enough to force idle eviction, offload, drops and
preemption. For every choice, tokens and their logprobs equal those of a cold engine with prefix
caching off, up to the first token sampled from a state computed around a hole (SSC only: reading
around an offloaded or dropped checkpoint is the approximation SSC eviction makes; the recorded
plans say where it happened, independently of the scheduler's own bookkeeping). At the end no slot
or block is held. `ssc` and `grm` (which never evicts running checkpoints, so every token of every
request must match) both run.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter, defaultdict

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from mcserve.server.engine.client import GenerateRequest
from mcserve.server.engine.prefix_index import state_top_k
from mcserve.server.engine.sampling_params import SamplingParams
from mcserve.server.model.loader import load_model
from tests.server.engine.helpers import make_engine

C = 8
MAX_LEN = 96
MAX_TOKENS = 10
pytestmark = pytest.mark.usefixtures("one_thread")
NEAR_TIE = 2e-5  # logprob gap under which fp32 rounding of another chunking may pick the other token


@pytest.fixture(scope="module")
def models(model_dir):
    return {agg: load_model(model_dir, dtype=torch.float32, device="cpu", segment_size=C, aggregation=agg)
            for agg in ("ssc", "grm")}


@dataclasses.dataclass(frozen=True)
class Req:
    kind: str  # fresh | shared | follow | repeat
    tokens: tuple[int, ...]  # the whole prompt (fresh), or the tail after the system prompt / parent
    system: int
    parent: int  # follow / repeat: index of an earlier request
    api_key: str | None
    session_id: str | None
    cache_salt: str | None
    mc_top_k: int | None
    n: int
    max_tokens: int
    arrival: int  # engine steps after the previous request was added
    abort_after: int | None  # steps after its arrival
    same_tenant: bool  # follow / repeat: the parent's key, salt, session and k (the same conversation)


tokens = st.lists(st.integers(3, 499), min_size=1, max_size=40).map(tuple)
requests = st.builds(
    Req, kind=st.sampled_from(["follow", "repeat", "shared", "follow", "fresh"]), tokens=tokens,
    system=st.integers(0, 1), parent=st.integers(0, 7), api_key=st.sampled_from([None, None, "a", "b"]),
    session_id=st.sampled_from([None, None, "s"]), cache_salt=st.sampled_from([None, None, None, "x"]),
    mc_top_k=st.sampled_from([None, None, 1]), n=st.sampled_from([1, 1, 2]), max_tokens=st.integers(1, MAX_TOKENS),
    arrival=st.integers(0, 4), abort_after=st.one_of(st.none(), st.none(), st.none(), st.integers(0, 6)),
    same_tenant=st.sampled_from([True, True, True, False]))
# (Hypothesis starts from, and shrinks towards, the first element of each sampled_from: the
# interesting choices come first, so that the derandomized CI run exercises them too.)


@st.composite
def cases(draw):
    agg = draw(st.sampled_from(["ssc", "grm"]))
    seqs = draw(st.sampled_from([3, 1, 2, 4]))
    # grm reads every checkpoint: running ones are never evicted, so one sequence of MAX_LEN must fit
    blocks = draw(st.sampled_from([5, 8, 4, 12, 24] if agg == "ssc" else [MAX_LEN // C, 14, 24]))
    cfg = dict(max_num_seqs=seqs, max_num_batched_tokens=draw(st.sampled_from([2 * C, C, 4 * C])),
               max_model_len=MAX_LEN, num_state_slots=seqs + draw(st.integers(0, 3)), num_checkpoint_blocks=blocks,
               num_host_blocks=draw(st.sampled_from([3, 0, 16])) if agg == "ssc" else 0,
               enable_snapshots=draw(st.sampled_from([True, False])), evict_running_checkpoints=agg == "ssc",
               utility_decay=0.95)
    systems = draw(st.lists(st.lists(st.integers(3, 499), min_size=9, max_size=30).map(tuple), min_size=2,
                            max_size=2))
    return agg, cfg, systems, draw(st.lists(requests, min_size=2, max_size=10))


def _pressure(agg: str, seqs: int, blocks: int, host: int, seed: int) -> tuple:
    """A fixed case that forces one mechanism: many overlapping requests on a tiny pool."""
    rng = random.Random(seed)
    cfg = dict(max_num_seqs=seqs, max_num_batched_tokens=2 * C, max_model_len=MAX_LEN, num_state_slots=seqs + 1,
               num_checkpoint_blocks=blocks, num_host_blocks=host, enable_snapshots=True,
               evict_running_checkpoints=agg == "ssc", utility_decay=0.95)
    systems = [tuple(rng.randrange(3, 500) for _ in range(rng.randrange(9, 30))) for _ in range(2)]
    reqs = [Req(rng.choice(["follow", "repeat", "shared", "fresh"]),
                tuple(rng.randrange(3, 500) for _ in range(rng.randrange(1, 40))), rng.randrange(2), rng.randrange(8),
                rng.choice([None, "a"]), None, None, rng.choice([None, 1]), rng.choice([1, 1, 2]),
                rng.randrange(4, MAX_TOKENS + 1), rng.randrange(2), rng.choice([None, None, None, 3]), True)
            for _ in range(10)]
    return agg, cfg, systems, reqs


class PublishedStates:
    """Checks, after every step, that each indexed checkpoint and each parked snapshot holds what a
    cold single-chunk prefill of its prefix computes (each once per place it lives in)."""

    def __init__(self, engine, model) -> None:
        self.engine, self.model = engine, model
        self.seqs = []  # every sequence the engine was given
        self.cold: dict[bytes, torch.Tensor] = {}  # prefix hash -> cold checkpoint of its last segment
        self.verified: set[tuple] = set()

    def _cold_checkpoint(self, key: bytes) -> torch.Tensor:
        if key not in self.cold:
            seq = next(s for s in self.seqs if key in s.prefix_hashes(C))
            hashes = seq.prefix_hashes(C)
            tokens = tuple(seq.token_ids[:(len(hashes) - 1) * C])
            ckpts, _ = self._prefill(tokens, seq)
            self.cold.update(zip(hashes[1:], ckpts, strict=True))
        return self.cold[key]

    def _prefill(self, tokens: tuple[int, ...], seq) -> tuple[torch.Tensor, torch.Tensor]:
        n, model = len(tokens) // C, self.model
        states, ckpts = model.allocate_states(1), model.allocate_checkpoints(max(n, 1), torch.float32)
        states.clear(0)
        k = state_top_k(model.spec, seq.params.mc_top_k)
        model.prefill(tokens, 0, 0, (), tuple(range(n)), states, ckpts, top_k=k or None)
        return ckpts.ssm[:n].clone(), states.ssm[:, 0].clone()

    def check(self) -> int:
        sched, pools = self.engine.scheduler, self.engine.runner.pools
        checked = 0
        for c in sched.cache.tree:
            where = (c.key, c.gpu, c.host)
            if where not in self.verified:
                got = pools.ckpts.ssm[c.gpu] if c.gpu is not None else pools.host.ssm[c.host]
                assert _close(got, self._cold_checkpoint(c.key)), ("checkpoint computed around a hole", c)
                self.verified.add(where)
                checked += 1
        for snap in sched.pool.snapshots():
            where = (snap.slot, snap.anchor, snap.tail)
            if where not in self.verified:
                seq = next(s for s in self.seqs if snap.anchor in s.prefix_hashes(C))
                tokens = tuple(seq.token_ids[:snap.num_tokens - len(snap.tail)]) + snap.tail
                _, want = self._prefill(tokens, seq)
                assert _close(pools.states.ssm[:, snap.slot], want), ("snapshot computed around a hole", snap)
                self.verified.add(where)
                checked += 1
        return checked


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return float((got - want).norm()) <= 1e-4 * float(want.norm()) + 1e-6


class ColdReference:
    """Greedy tokens and top-2 logprobs from engines with prefix caching off, cached per prompt."""

    def __init__(self, models, tokenizer) -> None:
        self.engines = {agg: make_engine(m, tokenizer, max_num_seqs=8, max_model_len=MAX_LEN,
                                         enable_prefix_caching=False) for agg, m in models.items()}
        self.done: dict[tuple, tuple[list[int], list]] = {}

    def get(self, agg: str, prompt: tuple[int, ...], k: int) -> tuple[list[int], list]:
        key = (agg, prompt, k)
        if key not in self.done:
            engine = self.engines[agg]
            sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2,
                                mc_top_k=k or None)
            rid = f"cold-{len(self.done)}"
            engine.add_request(GenerateRequest(rid, prompt, sp))
            out: tuple[list[int], list] = ([], [])
            while engine.has_unfinished():
                for d in engine.step():
                    out[0].extend(d.token_ids)
                    out[1].extend(d.logprobs or ())
            self.done[key] = out
        return self.done[key]


def _run_case(agg, cfg, systems, reqs, model, tokenizer, cold: ColdReference, seen: Counter) -> None:
    engine = make_engine(model, tokenizer, **cfg)
    sched = engine.scheduler
    seq_ids: dict[str, list[int]] = defaultdict(list)  # request id -> its sequences, by choice index
    published = PublishedStates(engine, model)
    add = sched.add_request
    sched.add_request = lambda seq: (seq_ids[seq.request_id].append(seq.seq_id), published.seqs.append(seq),
                                     add(seq))[2]
    cutoff: dict[int, int] = {}  # seq id -> index of its first output token sampled from an inexact state
    inner = engine.runner.execute

    def execute(plan, sampling):
        rows = [(r.seq_id, r.block_table) for r in plan.decode] + [(c.seq_id, c.read_blocks) for c in plan.prefill]
        for seq_id, reads in rows:
            if -1 in reads and seq_id not in cutoff:
                cutoff[seq_id] = sched.get(seq_id).num_output_tokens
        return inner(plan, sampling)

    engine.runner.execute = execute
    out: dict[tuple[str, int], list] = defaultdict(lambda: [[], []])  # (request id, choice) -> tokens, logprobs
    prompts: dict[int, tuple[int, ...]] = {}
    finished: dict[int, tuple[int, ...]] = {}  # request index -> prompt + output of choice 0, once done

    def absorb(deltas) -> None:
        for d in deltas:
            o = out[(d.request_id, d.index)]
            o[0].extend(d.token_ids)
            o[1].extend(d.logprobs or ())
            if d.usage is not None:
                i = int(d.request_id[1:])
                finished[i] = prompts[i] + tuple(out[(d.request_id, 0)][0])

    reqs = list(reqs)  # a next turn of the same conversation takes its parent's tenant and k
    pending = list(enumerate(reqs))
    aborts: dict[int, int] = {}  # step -> request index
    step = last_added = 0
    while pending or engine.has_unfinished():
        while pending and step - last_added >= pending[0][1].arrival:
            i, r = pending[0]
            follow = r.kind in ("follow", "repeat") and r.parent < i
            if follow and r.parent not in finished:
                break  # the next turn waits for the last one to end
            pending.pop(0)
            if follow:  # the next turn, or the same prompt again with a short new tail
                base = finished[r.parent] if r.kind == "follow" else prompts[r.parent]
                tail = r.tokens if r.kind == "follow" else r.tokens[:2]
            else:
                base, tail = (systems[r.system] if r.kind != "fresh" else ()), r.tokens
            if follow and r.same_tenant:
                r = reqs[i] = dataclasses.replace(r, api_key=reqs[r.parent].api_key, mc_top_k=reqs[r.parent].mc_top_k,
                                                  session_id=reqs[r.parent].session_id,
                                                  cache_salt=reqs[r.parent].cache_salt)
            prompts[i] = (base + tail)[:MAX_LEN - r.max_tokens - 1]
            sp = SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True, n=r.n, logprobs=1,
                                mc_top_k=r.mc_top_k)
            engine.add_request(GenerateRequest(f"r{i}", prompts[i], sp, api_key=r.api_key, session_id=r.session_id,
                                               cache_salt=r.cache_salt))
            last_added = step
            if r.abort_after is not None:
                aborts[step + r.abort_after] = i
        if step in aborts:
            absorb(engine.abort(f"r{aborts.pop(step)}"))
        absorb(engine.step())
        seen["published_states"] += published.check()
        step += 1
        assert step < 2000, "no progress"
    for (rid, index), (toks, lps) in out.items():
        i = int(rid[1:])
        seq_id = seq_ids[rid][index]
        want_toks, want_lps = cold.get(agg, prompts[i], state_top_k(model.spec, reqs[i].mc_top_k))
        cut = cutoff.get(seq_id, len(toks))
        seen["approximate_choices" if seq_id in cutoff else "exact_choices"] += 1
        for j in range(cut):
            if toks[j] != want_toks[j]:
                alt = want_lps[j].top_logprobs  # cold's top 2: only a near tie may flip
                assert len(alt) == 2 and alt[1][0] == toks[j] and alt[0][2] - alt[1][2] < NEAR_TIE, (rid, index, j)
                seen["near_ties"] += 1
                break
            assert abs(lps[j].logprob - want_lps[j].logprob) < 1e-4, (rid, index, j, lps[j], want_lps[j])
    sched.check()
    assert not sched.running and not sched.waiting and sched.cache.num_tables == 0
    assert sched.pool.num_held == 0 and sched.pool.num_free + sched.pool.num_parked == sched.pool.num_slots
    assert sched.cache.num_cached_blocks == sched.cache.num_used_blocks  # left: idle cache, evictable
    seen.update({k: 1 for k, v in engine.counters.items() if v and not k.startswith("finish")})
    seen["examples"] += 1
    seen[agg] += 1


def test_cached_runs_give_the_tokens_of_a_cold_engine(models, tokenizer) -> None:
    cold = ColdReference(models, tokenizer)
    seen: Counter[str] = Counter()

    @given(cases())
    @example(_pressure("ssc", 4, 6, 3, seed=1))  # offload, onload, drops, reading around holes
    @example(_pressure("ssc", 3, 5, 0, seed=2))  # drops of running checkpoints
    @example(_pressure("grm", 4, MAX_LEN // C, 0, seed=3))  # preemption (grm never evicts running ones)
    def check(case) -> None:
        agg, cfg, systems, reqs = case
        _run_case(agg, cfg, systems, reqs, models[agg], tokenizer, cold, seen)

    check()
    # the mixes did exercise what the property is about
    for what in ("ssc", "grm", "prefix_hit_tokens", "snapshot_hit", "evict_idle", "offload", "onload",
                 "drop_running", "preempt", "inexact_sequences", "exact_choices", "published_states"):
        assert seen[what], (what, seen)
    print(dict(seen))
