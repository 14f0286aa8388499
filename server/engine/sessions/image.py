"""A saved session: one conversation's cached states as CPU tensors, and its file format.

One safetensors file per session. Tensors (C = segment size, k whole segments cached):
- `tokens` [n] int64: the conversation's computed tokens (the last finished turn's prompt and output,
  less the last sampled token, which no state has absorbed yet);
- `ckpt.ssm` [k, L, HV, dv, dk] (checkpoint dtype), `ckpt.key` [k, L, H, dk], `ckpt.conv`
  [k, L, conv_dim, W-1]: the checkpoint blocks of segments 0..k-1;
- with the end-of-turn snapshot (the exact state after all n tokens; only when the chain reaches
  n // C): `snap.ssm` [L, HV, dv, dk], `snap.key_sum` [L, H, dk], `snap.conv` [L, conv_dim, W-1].

The header's metadata holds one key, `mcserve.session`: JSON with the format version, the session
id, its owner (a hash of the API key, never the key), the engine identity (model name and
fingerprint, config hash, MC settings, checkpoint dtype), the namespace root the states were keyed
under, and a SHA-256 over every tensor (name, dtype, shape, bytes). `decode` refuses a file whose
header, digest, identity or shapes do not check out; nothing of such a file is ever installed.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from mcserve.server.errors import SessionFileError

FORMAT = "mcserve.session/1"
META_KEY = "mcserve.session"


@dataclass(frozen=True, slots=True)
class EngineIdentity:
    """What a saved state depends on besides its tokens: the states of one engine are valid in
    another exactly when these agree (the namespace root is derived from the same fields)."""

    model_name: str
    model_fingerprint: str  # hex SHA-256 of config and weights (model.fingerprint())
    config_sha256: str  # hex SHA-256 of config.json's fields, sorted
    mc: dict[str, object]  # aggregation, segment_size, top_k, state_init
    ckpt_dtype: str
    state_dtype: str
    engine_root: str  # hex prefix_index.engine_root

    def mismatch(self, saved: EngineIdentity) -> str | None:
        """Why states saved under `saved` cannot be used here, or None."""
        if saved.mc != self.mc:  # first: an MC override may change the config hash too
            return f"it was saved with MC settings {saved.mc}; this server runs {self.mc}"
        if saved.model_fingerprint != self.model_fingerprint or saved.config_sha256 != self.config_sha256:
            return (f"it was saved by another model ({saved.model_name!r}, fingerprint "
                    f"{saved.model_fingerprint[:12]}, config {saved.config_sha256[:12]}); this server runs "
                    f"{self.model_name!r} (fingerprint {self.model_fingerprint[:12]}, config "
                    f"{self.config_sha256[:12]})")
        if (saved.ckpt_dtype, saved.state_dtype) != (self.ckpt_dtype, self.state_dtype):
            return (f"it holds {saved.ckpt_dtype} checkpoints and {saved.state_dtype} states; this server "
                    f"uses {self.ckpt_dtype} and {self.state_dtype}")
        if saved.engine_root != self.engine_root:
            return "its cache namespace differs from this server's"
        return None


@dataclass(slots=True)
class SessionImage:
    """One session's state, off the device. `snapshot` is None when none was parked."""

    session_id: str
    owner: str
    identity: EngineIdentity
    root: bytes  # the namespace root h_0 its prefix hashes chain from
    tokens: tuple[int, ...]
    checkpoints: dict[str, torch.Tensor]  # ssm, key, conv, each [k, ...]
    snapshot: dict[str, torch.Tensor] | None  # ssm, key_sum, conv, each [L, ...]
    saved_at: float = field(default_factory=time.time)

    @property
    def num_checkpoints(self) -> int:
        return self.checkpoints["ssm"].shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"tokens": torch.tensor(self.tokens, dtype=torch.int64)}
        out.update({f"ckpt.{k}": v.contiguous() for k, v in self.checkpoints.items()})
        if self.snapshot is not None:
            out.update({f"snap.{k}": v.contiguous() for k, v in self.snapshot.items()})
        return out

    def info(self) -> dict[str, object]:
        return {"id": self.session_id, "tokens": len(self.tokens), "checkpoints": self.num_checkpoints,
                "snapshot": self.snapshot is not None, "saved_at": self.saved_at}


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def encode(image: SessionImage) -> bytes:
    tensors = image.tensors()
    meta = {"format": FORMAT, "session_id": image.session_id, "owner": image.owner,
            "identity": asdict(image.identity), "root": image.root.hex(), "tokens": len(image.tokens),
            "checkpoints": image.num_checkpoints, "snapshot": image.snapshot is not None,
            "saved_at": image.saved_at, "sha256": _digest(tensors)}
    return st_save(tensors, metadata={META_KEY: json.dumps(meta, sort_keys=True)})


def read_header(data: bytes, name: str) -> dict:
    """The metadata JSON of a session file's first bytes (at least its whole header)."""
    if len(data) < 8:
        raise SessionFileError(name, "it is truncated (no safetensors header)")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise SessionFileError(name, f"it is truncated (a {n}-byte header, {len(data) - 8} bytes present)")
    try:
        header = json.loads(data[8:8 + n])
        meta = json.loads(header["__metadata__"][META_KEY])
    except (ValueError, KeyError, TypeError) as e:
        raise SessionFileError(name, f"its header is not a session header ({e!r})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SessionFileError(name, f"unknown format {meta.get('format') if isinstance(meta, dict) else meta!r}"
                                     f" (expected {FORMAT})")
    return meta


def decode(data: bytes, name: str, expected: EngineIdentity, shapes: dict[str, tuple[int, ...]]) -> SessionImage:
    """Parse and check a whole file. `shapes`: per checkpoint / snapshot tensor, its shape without the
    leading block dimension (ckpt.*) as this engine's pools have it. SessionFileError on any problem."""
    meta = read_header(data, name)
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors reports truncation and bad offsets as various errors
        raise SessionFileError(name, f"its tensors cannot be read ({e})") from None
    if _digest(tensors) != meta.get("sha256"):
        raise SessionFileError(name, "its contents do not match their checksum (corrupted)")
    try:
        identity = EngineIdentity(**meta["identity"])
        owner, session_id, root = str(meta["owner"]), str(meta["session_id"]), bytes.fromhex(meta["root"])
        saved_at = float(meta["saved_at"])
    except (KeyError, TypeError, ValueError) as e:
        raise SessionFileError(name, f"its metadata is incomplete ({e!r})") from None
    why = expected.mismatch(identity)
    if why is not None:
        raise SessionFileError(name, why)
    tokens = tensors.get("tokens")
    if tokens is None or tokens.dtype != torch.int64 or tokens.dim() != 1:
        raise SessionFileError(name, "it has no 1-d int64 'tokens' tensor")
    ckpts = {k: tensors.get(f"ckpt.{k}") for k in ("ssm", "key", "conv")}
    snap = {k: tensors.get(f"snap.{k}") for k in ("ssm", "key_sum", "conv")}
    has_snap = all(v is not None for v in snap.values())
    if any(v is None for v in ckpts.values()) or not (has_snap or all(v is None for v in snap.values())):
        raise SessionFileError(name, "it lacks some of its state tensors")
    k = ckpts["ssm"].shape[0]
    for prefix, group in (("ckpt", ckpts), ("snap", snap if has_snap else {})):
        for key, t in group.items():
            want = shapes[f"{prefix}.{key}"]
            got = tuple(t.shape[1:]) if prefix == "ckpt" else tuple(t.shape)
            if got != want or (prefix == "ckpt" and t.shape[0] != k):
                raise SessionFileError(name, f"its {prefix}.{key} has shape {tuple(t.shape)}, this server's is {want}")
    C = int(identity.mc["segment_size"])  # type: ignore[call-overload]
    if k * C > len(tokens) or (has_snap and len(tokens) // C > k):
        raise SessionFileError(name, f"its {k} checkpoints do not fit its {len(tokens)} tokens")
    return SessionImage(session_id, owner, identity, root, tuple(tokens.tolist()), ckpts,
                        snap if has_snap else None, saved_at)
