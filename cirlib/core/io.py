"""Atomic writes and content fingerprints.

Every artifact (benchmark files, checkpoints, feature caches, result tables) is written to a
temporary file in the same folder and renamed into place, so an interrupted run never leaves a
half-written file that a later run would trust. Fingerprints key caches on their inputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import torch

_UMASK = os.umask(0)
os.umask(_UMASK)

# Temporary files of atomic writes are named ``.<name>.<host>-<pid>.<random>.tmp``. One left by a
# killed process (a checkpoint's is 16 MB) is removed by the next atomic write to its folder: at
# once when its owner is a dead process of this host, after STALE_TMP_AGE_S otherwise (other hosts
# sharing the folder, and names without an owner, written before owners were recorded).
STALE_TMP_AGE_S = 3600.0
_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"
_TMP_NAME = re.compile(r"^\..+?\.(?:(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.)?[A-Za-z0-9_]{8}\.tmp$")
_swept: set[str] = set()  # folders already cleaned by this process: one scan each, however many writes
_swept_lock = threading.Lock()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def sweep_stale_temporaries(folder: str | os.PathLike, max_age_s: float = STALE_TMP_AGE_S) -> list[Path]:
    """Delete temporary files that interrupted atomic writes left in ``folder``; return them."""
    removed: list[Path] = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TMP_NAME.match(entry.name)
        if match is None or not entry.is_file(follow_symlinks=False):
            continue
        pid = int(match["pid"]) if match["pid"] else None
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        dead_owner = match["host"] == _HOST and pid is not None and pid != os.getpid() and not _pid_alive(pid)
        if dead_owner or age > max_age_s:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` only if the block succeeds.

    The file lands with the permissions a plain ``open`` would give it (``0o666`` less the umask),
    whatever the writer did to the temporary file (``mkstemp`` makes it 0600, and writers such as
    safetensors' ``save_file`` replace it). The first write to a folder in a process also removes
    what killed writers left there (:func:`sweep_stale_temporaries`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = os.path.abspath(path.parent)
    with _swept_lock:
        sweep = folder not in _swept
        _swept.add(folder)
    if sweep:
        sweep_stale_temporaries(folder)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}-{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write JSON atomically (UTF-8, keys in the order given)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def fingerprint(obj: Any) -> str:
    """Stable short hash of a JSON-serialisable description (config dicts, file lists)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def tensor_digest(*tensors: torch.Tensor) -> str:
    """Stable short hash of tensors' shapes and fp32 values: keys artifacts computed from in-memory data."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in chunks (checkpoint integrity)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
