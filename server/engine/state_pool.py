"""Ownership of the online-state slots (`[num_slots, ...]` tensors on the device).

A slot is free, held by a running sequence, or parked: the exact state of a finished sequence (an
end-of-turn snapshot), kept so that the next chat turn, whose prompt starts with the finished
sequence's tokens, resumes exactly there instead of at the last segment boundary.

Design choice: a snapshot is taken over, not copied. The new sequence receives the parked slot
itself (no copy order in the plan); a second request from the same snapshot resumes from the
boundary checkpoints instead. Parked slots are evicted oldest first whenever a slot is needed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(slots=True)
class Snapshot:
    """A parked slot holding the exact state after the first `num_tokens` tokens of some prefix.

    anchor: prefix hash h_k of its k = num_tokens // C whole segments (namespace included).
    tail: its token ids after position k*C.
    """

    slot: int
    anchor: bytes
    tail: tuple[int, ...]
    num_tokens: int


class StatePool:
    def __init__(self, num_slots: int, counters: Counter[str] | None = None) -> None:
        self.num_slots = num_slots
        self.counters = Counter() if counters is None else counters
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._parked: dict[int, Snapshot] = {}  # slot -> snapshot, oldest first
        self._by_anchor: dict[bytes, list[Snapshot]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_parked(self) -> int:
        return len(self._parked)

    def snapshots(self) -> list[Snapshot]:
        """The parked snapshots, oldest first."""
        return list(self._parked.values())

    @property
    def num_held(self) -> int:
        """Slots held by running sequences."""
        return self.num_slots - len(self._free) - len(self._parked)

    def alloc(self) -> int | None:
        """A free slot, evicting the oldest snapshot if none is free; None if every slot is held."""
        if not self._free and self._parked:
            oldest = next(iter(self._parked.values()))
            self._unpark(oldest)
            self._free.append(oldest.slot)
            self.counters["snapshot_evict"] += 1
        return self._free.pop() if self._free else None

    def free(self, slot: int) -> None:
        assert 0 <= slot < self.num_slots and slot not in self._parked and slot not in self._free, slot
        self._free.append(slot)

    def park(self, slot: int, anchor: bytes, tail: Sequence[int], num_tokens: int) -> None:
        """Keep a held slot as a snapshot (replacing an identical older one)."""
        assert slot not in self._parked and slot not in self._free, slot
        tail = tuple(tail)
        for old in self._by_anchor.get(anchor, ()):
            if old.tail == tail:
                self._unpark(old)
                self._free.append(old.slot)
                break
        snap = Snapshot(slot, anchor, tail, num_tokens)
        self._parked[slot] = snap
        self._by_anchor.setdefault(anchor, []).append(snap)
        self.counters["snapshot_park"] += 1

    def find(self, anchor: bytes, token_ids: Sequence[int], start: int, max_tokens: int) -> Snapshot | None:
        """The longest snapshot under `anchor` (the prompt's prefix hash at position `start`) whose
        tail matches token_ids[start:] and that covers at most `max_tokens` tokens."""
        best = None
        for snap in self._by_anchor.get(anchor, ()):
            n = snap.num_tokens
            if n <= max_tokens and tuple(token_ids[start:n]) == snap.tail:
                assert n - start == len(snap.tail), (n, start, snap.tail)
                if best is None or n > best.num_tokens:
                    best = snap
        return best

    def take(self, snap: Snapshot) -> int:
        """Hand a parked slot to a new sequence, which continues from its state."""
        assert self._parked.get(snap.slot) is snap
        self._unpark(snap)
        self.counters["snapshot_hit"] += 1
        return snap.slot

    def discard(self, snap: Snapshot) -> None:
        """Free a parked slot (its session was deleted)."""
        assert self._parked.get(snap.slot) is snap
        self._unpark(snap)
        self._free.append(snap.slot)

    def _unpark(self, snap: Snapshot) -> None:
        del self._parked[snap.slot]
        siblings = self._by_anchor[snap.anchor]
        siblings.remove(snap)
        if not siblings:
            del self._by_anchor[snap.anchor]

    def check(self, held: set[int]) -> None:
        """Invariants (tests): every slot is exactly one of free, parked, held (`held` = running)."""
        free, parked = set(self._free), set(self._parked)
        assert len(free) == len(self._free), "slot freed twice"
        assert not (free & parked) and not (free & held) and not (parked & held), (free, parked, held)
        assert free | parked | held == set(range(self.num_slots)), "slot leaked"
        assert sum(len(v) for v in self._by_anchor.values()) == len(self._parked)
