from __future__ import annotations

import pytest

from mcserve.server.engine.sequence import Sequence, SequenceStatus
from mcserve.server.errors import InvalidRequestError


def test_prefix_hashes_name_whole_segments_and_extend_with_tokens() -> None:
    a = Sequence([1, 2, 3, 4, 5, 6, 7])
    b = Sequence([1, 2, 3, 4, 5, 6, 9])
    ha, hb = list(a.prefix_hashes(3)), list(b.prefix_hashes(3))
    assert len(ha) == 3 and ha == hb  # h_0..h_2: the first 6 tokens agree
    a.append_token(8)
    b.append_token(8)
    assert len(a.prefix_hashes(3)) == 3
    a.append_token(0)
    b.append_token(0)
    assert a.prefix_hashes(3)[:3] == ha and a.prefix_hashes(3)[3] != b.prefix_hashes(3)[3]


def test_cache_root_starts_the_chain() -> None:
    a, b = Sequence([1, 2, 3], cache_root=b"x"), Sequence([1, 2, 3], cache_root=b"y")
    assert a.prefix_hashes(3)[0] == b"x" and a.prefix_hashes(3)[1] != b.prefix_hashes(3)[1]


def test_state_and_tokens() -> None:
    s = Sequence([5, 6], priority=2, arrival_time=1.5)
    assert s.status is SequenceStatus.WAITING and not s.is_finished and s.finish_reason is None
    s.append_token(7)
    assert s.output_token_ids == [7] and s.num_tokens == 3 and s.num_output_tokens == 1
    s.status = SequenceStatus.FINISHED_LENGTH
    assert s.is_finished and s.finish_reason == "length"
    assert s.sort_key == (2, 1.5, s.seq_id)
    with pytest.raises(InvalidRequestError):
        Sequence([])
