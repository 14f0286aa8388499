from __future__ import annotations

from mcserve.server.engine.cache.checkpoint import Checkpoint
from mcserve.server.engine.cache.transfers import TransferQueue
from mcserve.server.engine.plan import BlockCopy


def test_queue_keeps_order_and_remembers_this_steps_offloads() -> None:
    q = TransferQueue()
    c = Checkpoint(0, 0)
    q.offload(c, gpu=3, host=0)
    q.onload(host=1, gpu=3)  # the freed GPU block is refilled after the copy out
    assert q.offloaded_now(c)
    assert q.take() == ((BlockCopy(3, 0),), (BlockCopy(1, 3),)) and q.take() == ((), ())
    q.begin_step()
    assert not q.offloaded_now(c)
