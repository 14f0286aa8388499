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


def test_namespaces_separate_sessions_and_keys() -> None:
    shared = Sequence([1], session_id=None).namespace
    s1k1 = Sequence([1], session_id="s1", api_key="k1").namespace
    assert Sequence([2], session_id="s1", api_key="k1").namespace == s1k1
    assert len({shared, s1k1, Sequence([1], session_id="s1", api_key="k2").namespace,
                Sequence([1], session_id="s2", api_key="k1").namespace}) == 4


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
