from __future__ import annotations

from mcserve.kernels.mc_spec import MCSpec
from mcserve.server.engine.prefix_index import engine_root, extend_chain, namespace_root, state_top_k

SSC = MCSpec("ssc", 16, top_k=4)
ROOT = engine_root(b"model-a", SSC, "torch.float32")


def test_namespaces_separate_sessions_keys_and_salts() -> None:
    shared = namespace_root(ROOT, 4)
    s1k1 = namespace_root(ROOT, 4, session_id="s1", api_key="k1")
    assert namespace_root(ROOT, 4, session_id="s1", api_key="k1") == s1k1
    roots = {shared, s1k1, namespace_root(ROOT, 4, session_id="s1", api_key="k2"),
             namespace_root(ROOT, 4, session_id="s2", api_key="k1"), namespace_root(ROOT, 4, api_key="k1"),
             namespace_root(ROOT, 4, api_key="k2"), namespace_root(ROOT, 4, cache_salt="x"),
             namespace_root(ROOT, 4, cache_salt=""), namespace_root(ROOT, 4, api_key="k1", cache_salt="x"),
             namespace_root(ROOT, 4, session_id="")}
    assert len(roots) == 10
    # length-prefixed fields: moving characters between fields changes the root
    moved = namespace_root(ROOT, 4, api_key="a", cache_salt="bc")
    assert namespace_root(ROOT, 4, api_key="ab", cache_salt="c") != moved


def test_everything_that_changes_the_state_changes_the_root() -> None:
    roots = {ROOT, engine_root(b"model-b", SSC, "torch.float32"), engine_root(b"model-a", SSC, "torch.bfloat16"),
             engine_root(b"model-a", MCSpec("grm", 16, top_k=4), "torch.float32"),
             engine_root(b"model-a", MCSpec("ssc", 32, top_k=4), "torch.float32"),
             engine_root(b"model-a", MCSpec("ssc", 16, top_k=4, state_init="reset"), "torch.float32")}
    assert len(roots) == 6
    assert namespace_root(ROOT, 1) != namespace_root(ROOT, 4)


def test_state_top_k_is_the_k_ssc_reads_with() -> None:
    assert [state_top_k(SSC, k) for k in (None, 1, 4, 9)] == [4, 1, 4, 4]  # a request only lowers it
    assert {state_top_k(MCSpec(agg, 16, top_k=4), k) for agg in ("none", "grm", "residual", "soup")
            for k in (None, 1)} == {0}


def test_chain_names_whole_segments() -> None:
    a = extend_chain([b"r"], [1, 2, 3, 4, 5, 6, 7], 3)
    b = extend_chain([b"r"], [1, 2, 3, 4, 5, 6, 9], 3)
    assert len(a) == 3 and a == b
    assert extend_chain([b"s"], [1, 2, 3], 3)[1] != a[1]
