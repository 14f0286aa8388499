"""`SessionBook`: the named sessions an engine knows, and moving their states between its caches and
`SessionImage`s. Engine thread only (it reads and writes the pools and the scheduler's caches).

A named session is (owner, session id), owner = `owner_of(api_key)`: keys own sessions, and the same
id under another key is another session (its namespace root differs too, prefix_index.py). When
choice 0 of a request that names a session finishes normally (stop or length), the book records
the turn: its namespace root and the tokens its states have absorbed. What is saved of a session is
what the caches still hold of that turn, all of it exact (docs/CACHING.md): the chain of indexed
checkpoints along its tokens and, if the chain is whole up to it, its parked end-of-turn snapshot.

Installing an image puts those states back as if this engine had computed them: the checkpoints
indexed as idle cache under the same prefix hashes (the namespace root is saved; it is valid here
because the image's engine identity matched, image.py), the snapshot parked. What does not fit
(no free or idle block or slot) is left out; a request then recomputes it, getting the same tokens.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mcserve.server.engine.prefix_index import extend_chain
from mcserve.server.engine.runner.pools import DevicePools
from mcserve.server.engine.scheduler import Scheduler
from mcserve.server.engine.sessions.image import EngineIdentity, SessionImage
from mcserve.server.model.model import MCGatedDeltaNetForCausalLM

SessionKey = tuple[str, str]  # (owner, session id)


def owner_of(api_key: str | None) -> str:
    """Who owns a session: a hash of the API key ("" without one). The key itself is never kept."""
    return "" if api_key is None else hashlib.sha256(b"mcserve/owner\0" + api_key.encode()).hexdigest()


def engine_identity(model: MCGatedDeltaNetForCausalLM, model_name: str, ckpt_dtype: torch.dtype,
                    engine_root: bytes) -> EngineIdentity:
    spec = model.spec
    mc = {"aggregation": spec.aggregation, "segment_size": spec.segment_size, "top_k": spec.top_k,
          "state_init": spec.state_init}
    config = hashlib.sha256(json.dumps(model.cfg.to_dict(), sort_keys=True).encode()).hexdigest()
    return EngineIdentity(model_name, model.fingerprint().hex(), config, mc, str(ckpt_dtype), str(model.state_dtype),
                          engine_root.hex())


@dataclass(slots=True)
class _Turn:
    root: bytes
    tokens: tuple[int, ...]
    dirty: bool  # finished since it was last exported


class SessionBook:
    def __init__(self, identity: EngineIdentity, segment_size: int, scheduler: Callable[[], Scheduler],
                 pools: Callable[[], DevicePools]) -> None:
        """`scheduler`: the engine's current one (a rebuilt scheduler replaces it); `pools`: the runner's."""
        self.identity = identity
        self.segment_size = segment_size
        self._scheduler = scheduler
        self._pools_of = pools
        self._turns: dict[SessionKey, _Turn] = {}

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Per tensor of an image, its shape here (without the block dimension for checkpoints)."""
        pools = self._pools_of()
        c, s = pools.ckpts, pools.states
        return {"ckpt.ssm": tuple(c.ssm.shape[1:]), "ckpt.key": tuple(c.key.shape[1:]),
                "ckpt.conv": tuple(c.conv.shape[1:]), "snap.ssm": tuple(s.ssm[:, 0].shape),
                "snap.key_sum": tuple(s.key_sum[:, 0].shape), "snap.conv": tuple(s.conv[:, 0].shape)}

    def __contains__(self, key: SessionKey) -> bool:
        return key in self._turns

    def session_ids(self, owner: str) -> list[str]:
        return [sid for o, sid in self._turns if o == owner]

    def record(self, key: SessionKey, root: bytes, tokens: tuple[int, ...]) -> None:
        self._turns[key] = _Turn(root, tokens, dirty=True)

    def dirty(self) -> list[SessionKey]:
        return [k for k, t in self._turns.items() if t.dirty]

    def export(self, key: SessionKey) -> SessionImage | None:
        """The session's cached states as CPU tensors (clears its dirty mark); None if it is unknown
        or nothing of it is cached any more (a save must not replace a file with nothing)."""
        turn = self._turns.get(key)
        if turn is None:
            return None
        turn.dirty = False
        C, sched, pools = self.segment_size, self._scheduler(), self._pools_of()
        hashes = extend_chain([turn.root], turn.tokens, C)
        chain = []
        for c in sched.cache.match(hashes, len(hashes) - 1):
            if c.gpu is None and c.host is None:
                break
            chain.append((pools.ckpts, c.gpu) if c.gpu is not None else (pools.host, c.host))
        checkpoints = {name: torch.stack([getattr(blocks, name)[i].cpu() for blocks, i in chain])
                       if chain else torch.empty((0, *getattr(pools.ckpts, name).shape[1:]),
                                                 dtype=getattr(pools.ckpts, name).dtype)
                       for name in ("ssm", "key", "conv")}
        q, snapshot = len(turn.tokens), None
        k = q // C
        if len(chain) >= k:
            snap = sched.pool.find(hashes[k], turn.tokens, k * C, q)
            if snap is not None and snap.num_tokens == q:
                s = pools.states
                snapshot = {name: getattr(s, name)[:, snap.slot].cpu().clone() for name in ("ssm", "key_sum", "conv")}
        if not chain and snapshot is None:
            return None
        return SessionImage(key[1], key[0], self.identity, turn.root, turn.tokens, checkpoints, snapshot)

    def install(self, image: SessionImage) -> tuple[int, bool]:
        """Put a checked image's states into the caches; returns (checkpoints now cached for it,
        snapshot parked). The session becomes known (not dirty: its file is current)."""
        hashes = extend_chain([image.root], image.tokens, self.segment_size)
        try:
            cached, parked = self._install(image, hashes)
        except BaseException:  # a copy failed: nothing half-written may stay indexed or parked
            self._scheduler().cache.forget_prefix(hashes)
            self._discard_snapshot(hashes, image.tokens)
            raise
        self._turns[(image.owner, image.session_id)] = _Turn(image.root, image.tokens, dirty=False)
        return cached, parked

    def _install(self, image: SessionImage, hashes: list[bytes]) -> tuple[int, bool]:
        C, sched, pools = self.segment_size, self._scheduler(), self._pools_of()
        cache, cached = sched.cache, 0
        for i in range(image.num_checkpoints):
            if cache.match(hashes[i:i + 2], 1):
                cached += 1  # already cached here (computed again since the restart)
                continue
            block = cache.adopt(i, hashes[i + 1], hashes[i])
            if block is None:
                break
            for name in ("ssm", "key", "conv"):
                dst = getattr(pools.ckpts, name)
                dst[block] = image.checkpoints[name][i].to(dst.device, dst.dtype)
            cached += 1
        parked = False
        q = len(image.tokens)
        k = q // C
        if image.snapshot is not None and len(cache.match(hashes, k)) == k:
            tail = image.tokens[k * C:]
            found = sched.pool.find(hashes[k], image.tokens, k * C, q)
            parked = found is not None and found.num_tokens == q
            if not parked and (slot := sched.pool.alloc()) is not None:
                for name in ("ssm", "key_sum", "conv"):
                    dst = getattr(pools.states, name)
                    dst[:, slot] = image.snapshot[name].to(dst.device, dst.dtype)
                sched.pool.park(slot, hashes[k], tail, q)
                parked = True
        return cached, parked

    def forget(self, key: SessionKey) -> bool:
        """Drop the session and every state cached under its namespace; False if it was unknown."""
        turn = self._turns.pop(key, None)
        if turn is None:
            return False
        hashes = extend_chain([turn.root], turn.tokens, self.segment_size)
        self._discard_snapshot(hashes, turn.tokens)
        self._scheduler().cache.forget_prefix(hashes)
        return True

    def _discard_snapshot(self, hashes: list[bytes], tokens: tuple[int, ...]) -> None:
        q, C, pool = len(tokens), self.segment_size, self._scheduler().pool
        snap = pool.find(hashes[q // C], tokens, q // C * C, q)
        if snap is not None:
            pool.discard(snap)
