"""Named sessions saved and restored (issue 17, persistent sessions), on the real tiny SSC model with
fp32 checkpoints: a restored session gives the greedy tokens the uninterrupted engine gives (which
are a cold engine's), and a file that is corrupt, truncated, or from another model or other MC
settings is refused before anything of it is installed."""

from __future__ import annotations

import asyncio

import pytest
import torch

from mcserve.server.engine.async_engine import AsyncEngine
from mcserve.server.engine.client import GenerateRequest
from mcserve.server.engine.sessions.book import owner_of
from mcserve.server.engine.sessions.image import decode, encode
from mcserve.server.engine.sessions.store import SessionStore
from mcserve.server.errors import SessionFileError
from mcserve.server.model.init_model import init_model
from mcserve.server.model.loader import load_model
from tests.server.engine.helpers import GREEDY, make_engine, random_prompts

pytestmark = pytest.mark.usefixtures("one_thread")


def _turn(engine, prompt, session_id="chat-1", api_key="key-a") -> tuple[list[int], int]:
    """Greedy tokens and usage's cached_tokens of one request."""
    rid = f"r{engine.counters['requests']}"
    engine.add_request(GenerateRequest(rid, tuple(prompt), GREEDY, session_id=session_id, api_key=api_key))
    toks, usage = [], None
    while engine.has_unfinished():
        for d in engine.step():
            toks.extend(d.token_ids)
            usage = d.usage or usage
    return toks, usage.cached_tokens


def _conversation(engine) -> tuple[list[int], list[int]]:
    """Turn 1 (87 prompt tokens, 24 out) and the prompt of turn 2 (turn 1 + its output + 9 new)."""
    p1, extra = random_prompts(40, [87, 9])
    out1, _ = _turn(engine, p1)
    return p1, p1 + out1 + extra


def _owner_key(api_key="key-a", session_id="chat-1"):
    return owner_of(api_key), session_id


def test_restored_session_gives_the_tokens_of_the_uninterrupted_engine(model, tokenizer) -> None:
    a = make_engine(model, tokenizer)
    _, p2 = _conversation(a)
    image = a.sessions.export(_owner_key())
    assert image is not None and image.snapshot is not None
    assert image.num_checkpoints == len(image.tokens) // model.spec.segment_size
    data = encode(image)
    want = _turn(a, p2)  # the uninterrupted engine's second turn
    assert want[1] == len(image.tokens)  # resumed from the end-of-turn snapshot

    b = make_engine(model, tokenizer)
    restored = decode(data, "x", b.sessions.identity, b.sessions.shapes)
    assert b.sessions.install(restored) == (image.num_checkpoints, True)
    b.scheduler.check()
    assert _turn(b, p2) == want
    cold = make_engine(model, tokenizer, enable_prefix_caching=False)
    assert _turn(cold, p2)[0] == want[0]
    b.scheduler.check()


def test_restore_without_the_snapshot_resumes_from_the_checkpoints(model, tokenizer) -> None:
    a = make_engine(model, tokenizer)
    _, p2 = _conversation(a)
    image = a.sessions.export(_owner_key())
    image.snapshot = None
    want = _turn(make_engine(model, tokenizer, enable_prefix_caching=False), p2)[0]
    b = make_engine(model, tokenizer)
    b.sessions.install(decode(encode(image), "x", b.sessions.identity, b.sessions.shapes))
    toks, cached = _turn(b, p2)
    assert toks == want and cached == image.num_checkpoints * model.spec.segment_size


def test_a_tight_pool_restores_what_fits(model, tokenizer) -> None:
    a = make_engine(model, tokenizer)
    _, p2 = _conversation(a)
    image = a.sessions.export(_owner_key())
    b = make_engine(model, tokenizer, num_checkpoint_blocks=3)
    assert b.sessions.install(image) == (3, False)  # 3 of 6 checkpoints; no snapshot without its chain
    toks, cached = _turn(b, p2)  # (3 blocks: SSC reads around its own dropped checkpoints, so no token check)
    assert cached == 2 * model.spec.segment_size  # admission gives the deepest back: it needs a block to go on
    assert len(toks) == GREEDY.max_tokens
    b.scheduler.check()


def test_deleted_session_keeps_nothing_cached(model, tokenizer) -> None:
    engine = make_engine(model, tokenizer)
    _, p2 = _conversation(engine)
    assert engine.sessions.forget(_owner_key())
    assert not engine.sessions.forget(_owner_key())
    assert _turn(engine, p2)[1] == 0
    engine.scheduler.check()


def test_sessions_belong_to_their_key(model, tokenizer) -> None:
    engine = make_engine(model, tokenizer)
    _conversation(engine)
    assert engine.sessions.session_ids(owner_of("key-a")) == ["chat-1"]
    assert engine.sessions.session_ids(owner_of("key-b")) == []
    assert engine.sessions.export(_owner_key("key-b")) is None


@pytest.fixture(scope="module")
def saved(model, tokenizer, tmp_path_factory):
    """A session file of the default engine, and the store it is in."""
    engine = make_engine(model, tokenizer)
    _conversation(engine)
    store = SessionStore(tmp_path_factory.mktemp("sessions"), engine.sessions.identity, engine.sessions.shapes)
    image = engine.sessions.export(_owner_key())
    store.write(image)
    return store, store.path(*_owner_key()).read_bytes()


def _refused(store, data: bytes) -> str:
    store.path(*_owner_key()).write_bytes(data)
    with pytest.raises(SessionFileError) as e:
        store.read(*_owner_key())
    assert e.value.http_status == 409 and e.value.param == "session_id"
    return e.value.message


def test_corrupt_and_truncated_files_are_refused(saved) -> None:
    store, data = saved
    assert store.read(*_owner_key()) is not None
    flipped = bytearray(data)
    flipped[-100] ^= 0x40
    assert "checksum" in _refused(store, bytes(flipped))
    assert "truncated" in _refused(store, data[:4])
    assert "tensors cannot be read" in _refused(store, data[:-10])
    header = bytearray(data)
    header[20] ^= 0xFF
    assert "header" in _refused(store, bytes(header))
    store.path(*_owner_key()).write_bytes(data)


def test_files_of_another_model_or_other_mc_settings_are_refused(saved, model_dir, tokenizer, tmp_path) -> None:
    store, data = saved
    other_dir = tmp_path / "other"
    init_model(other_dir, preset="tiny", mc={"aggregation": "ssc", "segment_size": 16, "top_k": 2}, seed=1)
    for m, why in ((load_model(other_dir, dtype=torch.float32, device="cpu"), "another model"),
                   (load_model(model_dir, dtype=torch.float32, device="cpu", top_k=1), "MC settings")):
        engine = make_engine(m, tokenizer)
        there = SessionStore(store.directory, engine.sessions.identity, engine.sessions.shapes)
        with pytest.raises(SessionFileError, match=why):
            there.read(*_owner_key())


def test_writes_replace_whole_files_and_leave_no_temporary(saved) -> None:
    store, data = saved
    (store.directory / ".tmp-1-0.mcsession").write_bytes(data[:50])  # what a kill -9 mid-write leaves
    again = SessionStore(store.directory, store.identity, store.shapes)
    assert not list(store.directory.glob(".tmp-*"))
    assert [s["id"] for s in again.list(owner_of("key-a"))] == ["chat-1"]
    assert again.list(owner_of("key-b")) == []


def test_async_engine_saves_at_shutdown_and_restores_lazily(model, tokenizer, tmp_path) -> None:
    p1, extra = random_prompts(41, [70, 5])

    async def turn(engine: AsyncEngine, prompt, rid, session_id="s"):
        toks, usage = [], None
        async for d in engine.generate(GenerateRequest(rid, tuple(prompt), GREEDY, session_id=session_id,
                                                       api_key="key-a")):
            toks.extend(d.token_ids)
            usage = d.usage or usage
        return toks, usage.cached_tokens

    first = AsyncEngine(make_engine(model, tokenizer), session_dir=tmp_path, session_save_interval_s=0)
    out1, _ = asyncio.run(turn(first, p1, "a"))
    p2 = p1 + out1 + extra
    first.shutdown()  # saves the session
    assert len(list(tmp_path.glob("*.mcsession"))) == 1

    second = AsyncEngine(make_engine(model, tokenizer), session_dir=tmp_path, session_save_interval_s=0)
    try:
        toks, cached = asyncio.run(turn(second, p2, "b"))
        assert cached == len(p1) + len(out1) - 1  # the end-of-turn snapshot came back
        cold = make_engine(model, tokenizer, enable_prefix_caching=False)
        assert toks == _turn(cold, p2, session_id="s")[0]

        path = next(tmp_path.glob("*.mcsession"))
        path.write_bytes(path.read_bytes()[:-7])
        third = AsyncEngine(make_engine(model, tokenizer), session_dir=tmp_path, session_save_interval_s=0)
        try:
            with pytest.raises(SessionFileError, match="cannot be restored"):
                asyncio.run(turn(third, p2, "c"))
            assert asyncio.run(turn(third, p2, "d", session_id="other"))[0] == toks  # the engine serves on
            third.engine.scheduler.check()
        finally:
            third.shutdown()
    finally:
        second.shutdown()
