"""Names of token prefixes in the caches: a hash chain over whole segments.

h_0 = namespace root; h_{i+1} = H(h_i, token ids of segment i). h_i names the first i*C tokens, so
the checkpoint written after segment i is indexed under h_{i+1}, and two prompts share the key of a
checkpoint exactly when they share every token before its boundary (and the namespace).

The hash is SHA-256 rather than Python's `hash`: a collision would hand one user another's state, and
explicit sessions rely on the namespace being unguessable without the API key.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

_SHARED_ROOT = hashlib.sha256(b"mcserve/shared").digest()


def namespace_root(session_id: str | None, api_key: str | None) -> bytes:
    """h_0. Requests without a session share one namespace; an explicit session's prefixes are
    reachable only with the same session id and API key (the key itself is not kept)."""
    if session_id is None:
        return _SHARED_ROOT
    key_hash = hashlib.sha256((api_key or "").encode()).digest()
    return hashlib.sha256(b"mcserve/session\0" + session_id.encode() + b"\0" + key_hash).digest()


def chain_hash(parent: bytes, segment_tokens: Sequence[int]) -> bytes:
    """h_{i+1} from h_i and the C token ids of segment i."""
    return hashlib.sha256(parent + array("q", segment_tokens).tobytes()).digest()


def extend_chain(hashes: list[bytes], token_ids: Sequence[int], segment_size: int) -> list[bytes]:
    """Extend `hashes` ([h_0..h_n]) in place to cover every whole segment of `token_ids`."""
    C = segment_size
    for i in range(len(hashes) - 1, len(token_ids) // C):
        hashes.append(chain_hash(hashes[i], token_ids[i * C:(i + 1) * C]))
    return hashes
