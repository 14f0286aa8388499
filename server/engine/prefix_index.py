"""Names of token prefixes in the caches: a hash chain over whole segments, rooted in everything
besides the tokens that changes the state.

h_0 = namespace root; h_{i+1} = H(h_i, token ids of segment i). h_i names the first i*C tokens, so
the checkpoint written after segment i is indexed under h_{i+1}, and two requests share the key of a
checkpoint exactly when they share every token before its boundary and the root.

The root covers (`engine_root`) the model (its fingerprint: config and weights), the MC settings
(aggregation, segment size, state_init), the checkpoint dtype (a resume reads it), and
(`namespace_root`) per request SSC's effective k (every layer after the first reads MC memories, so
k changes the state) and the tenant: the API key, an optional `cache_salt`, and an explicit session.
Requests share cached prefixes only when all of these agree; a tenant learns nothing about another's
prefixes (not even through `cached_tokens`), and a session is reachable only with the key (and salt)
that created it.

The hash is SHA-256 rather than Python's `hash`: a collision would hand one user another's state, and
the namespaces rely on being unguessable without the API key. Fields are length-prefixed so that no
two different field lists hash alike.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

from mcserve.kernels.mc_spec import MCSpec


def _digest(tag: bytes, *fields: bytes) -> bytes:
    h = hashlib.sha256(tag)
    for f in fields:
        h.update(len(f).to_bytes(8, "little") + f)
    return h.digest()


def _opt(s: str | None) -> bytes:
    """None and "" must differ (no salt vs an empty salt)."""
    return b"\0" if s is None else b"\1" + s.encode()


def engine_root(model_fingerprint: bytes, spec: MCSpec, ckpt_dtype: str) -> bytes:
    """What every state of one engine depends on besides the tokens and the request."""
    mc = f"{spec.aggregation}/{spec.segment_size}/{spec.state_init}".encode()
    return _digest(b"mcserve/engine", model_fingerprint, mc, ckpt_dtype.encode())


def state_top_k(spec: MCSpec, requested: int | None) -> int:
    """SSC's k as far as states are concerned: the k it reads with (a request can only lower the
    model's); 0 for the aggregations whose output does not depend on k."""
    if spec.aggregation != "ssc":
        return 0
    return spec.top_k if requested is None else min(requested, spec.top_k)


def namespace_root(engine: bytes, top_k: int = 0, *, api_key: str | None = None, cache_salt: str | None = None,
                   session_id: str | None = None) -> bytes:
    """h_0 of a request (`top_k` from `state_top_k`). The API key itself is not kept, only hashed."""
    return _digest(b"mcserve/namespace", engine, str(top_k).encode(), _opt(api_key), _opt(cache_salt),
                   _opt(session_id))


def chain_hash(parent: bytes, segment_tokens: Sequence[int]) -> bytes:
    """h_{i+1} from h_i and the C token ids of segment i."""
    return hashlib.sha256(parent + array("q", segment_tokens).tobytes()).digest()


def extend_chain(hashes: list[bytes], token_ids: Sequence[int], segment_size: int, end: int | None = None
                 ) -> list[bytes]:
    """Extend `hashes` ([h_0..h_n]) in place to cover every whole segment of `token_ids[:end]`."""
    C = segment_size
    for i in range(len(hashes) - 1, (len(token_ids) if end is None else end) // C):
        hashes.append(chain_hash(hashes[i], token_ids[i * C:(i + 1) * C]))
    return hashes
