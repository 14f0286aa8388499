"""`SessionStore`: the `--session-dir` directory, one file per (owner, session id).

A file is named by a hash of its owner and session id (session ids are arbitrary strings; a name
never reveals either). Writes go to a temporary file in the same directory, are flushed to disk,
then renamed over the old file, so a crash (even `kill -9`) leaves the old file or the new one,
never half of either; temporary files a crash left behind are removed at start-up. Reads check
everything (image.decode) and raise SessionFileError for a file that does not check out.

Thread safety: any thread may call it (the HTTP side through a worker thread, the periodic saver);
the file system's rename is the only synchronisation writes need.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
from pathlib import Path

from mcserve.server.engine.sessions.image import EngineIdentity, SessionImage, decode, encode, read_header
from mcserve.server.errors import ConfigError, SessionFileError

log = logging.getLogger(__name__)

SUFFIX = ".mcsession"
_TMP = ".tmp-"
HEADER_PEEK = 64 * 1024  # a session header (JSON metadata, tensor offsets) is well under this


class SessionStore:
    def __init__(self, directory: str | Path, identity: EngineIdentity,
                 shapes: dict[str, tuple[int, ...]]) -> None:
        self.directory = Path(directory)
        self.identity = identity
        self.shapes = shapes
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob(f"{_TMP}*"):
                stale.unlink()
        except OSError as e:
            raise ConfigError(f"--session-dir {str(directory)!r} is not a usable directory: {e}") from None
        self._tmp = itertools.count()

    def path(self, owner: str, session_id: str) -> Path:
        return self.directory / file_name(owner, session_id)

    def write(self, image: SessionImage) -> int:
        """Save atomically; returns the file's size in bytes."""
        data = encode(image)
        final = self.path(image.owner, image.session_id)
        tmp = self.directory / f"{_TMP}{os.getpid()}-{next(self._tmp)}{SUFFIX}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.directory)
        return len(data)

    def read(self, owner: str, session_id: str) -> SessionImage | None:
        """The saved session, None if there is no file; SessionFileError if it cannot be restored."""
        path = self.path(owner, session_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise SessionFileError(path.name, f"it cannot be read ({e.strerror})") from None
        image = decode(data, path.name, self.identity, self.shapes)
        if (image.owner, image.session_id) != (owner, session_id):
            raise SessionFileError(path.name, "it belongs to another session")
        return image

    def delete(self, owner: str, session_id: str) -> bool:
        try:
            self.path(owner, session_id).unlink()
        except FileNotFoundError:
            return False
        _fsync_dir(self.directory)
        return True

    def list(self, owner: str) -> list[dict[str, object]]:
        """Header facts of `owner`'s saved sessions; a file whose header cannot be read is skipped
        (logged): its owner is unknown."""
        out = []
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            if path.name.startswith(_TMP):
                continue
            try:
                with open(path, "rb") as f:
                    meta = read_header(f.read(HEADER_PEEK), path.name)
            except (OSError, SessionFileError) as e:
                log.warning("session file %s skipped: %s", path.name, e)
                continue
            if meta.get("owner") == owner:
                out.append({"id": meta.get("session_id"), "tokens": meta.get("tokens"),
                            "checkpoints": meta.get("checkpoints"), "snapshot": meta.get("snapshot"),
                            "saved_at": meta.get("saved_at")})
        return out


def file_name(owner: str, session_id: str) -> str:
    return hashlib.sha256(f"{owner}\0{session_id}".encode()).hexdigest()[:40] + SUFFIX


def _fsync_dir(directory: Path) -> None:
    """Make a rename or unlink durable (POSIX: the directory entry is the directory's data)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
