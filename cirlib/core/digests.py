"""Content digests of files, remembered across processes so that a real dataset is not read again at every start.

Caches and checkpoints are keyed by what their input files hold, not by where they lie
(:mod:`cirlib.core.cache`), which means hashing every byte of every input: for a real dataset,
gigabytes each time a notebook starts. A digest is remembered under the file's *stat identity*
(absolute path, size, mtime, ctime, inode, device). Any rewrite changes it, even one that restores
the mtime (``cp -p``, ``rsync -t``, an extracted archive), since no tool can set the ctime back.
Digests are remembered in memory and in an SQLite index that processes share: ``data/digests.sqlite``
in a checkout, or the file that ``$CIRLIB_DIGEST_INDEX`` names (empty: none).

A file changed less than :data:`SETTLE_SECONDS` before it was looked at is hashed but not remembered.
File timestamps advance in coarse ticks (a few milliseconds on Linux), so a second write within the
tick of the first could leave the identity unchanged. Git's index treats such "racy" entries the same way.

The index only saves time. One that cannot be opened, read or written is reported once, and from then
on digests are remembered in this process only; a row that is not a well-formed digest is ignored.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import stat
import threading
import time
import warnings
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path

from cirlib.core.paths import project_root

INDEX_ENV = "CIRLIB_DIGEST_INDEX"
SETTLE_SECONDS = 2.0
"""A file whose mtime or ctime is this recent when it is looked at is not remembered (see the module docstring)."""

_DIGEST = re.compile(r"[0-9a-f]{32}")
_QUERY_CHUNK = 500  # paths per SELECT: well under SQLite's limit on bound parameters


def _regular_stat(abspath: str, shown: str | os.PathLike) -> os.stat_result:
    try:
        st = os.stat(abspath)
    except FileNotFoundError:
        raise FileNotFoundError(f"file not found: {shown}") from None
    if not stat.S_ISREG(st.st_mode):  # reading a FIFO would block forever
        raise OSError(f"{shown}: not a regular file, so it cannot be read or cached")
    return st


def _identity(st: os.stat_result) -> str:
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}:{st.st_dev}"


def hash_file(path: str, chunk: int = 1 << 20) -> str:
    """blake2b-128 of a file's bytes, as hex."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class DigestIndex:
    """Digests remembered by stat identity: in memory, and in the SQLite ``file`` when it is not None."""

    def __init__(self, file: Path | str | None, settle_seconds: float = SETTLE_SECONDS) -> None:
        self.file = None if file is None else Path(file)
        self.settle_ns = int(settle_seconds * 1e9)
        self._memory: dict[str, tuple[str, str]] = {}  # absolute path -> (identity, digest)
        self._lock = threading.Lock()

    def sized_digests(self, paths: Sequence[str | os.PathLike]) -> list[tuple[int, str]]:
        """(size, digest) per file, in order; only files not remembered under their current identity are read."""
        now = time.time_ns()
        abspaths = [os.path.abspath(p) for p in paths]
        stats = [_regular_stat(a, p) for a, p in zip(abspaths, paths)]
        known = self._lookup(abspaths)
        out, settled = [], {}
        for abspath, st in zip(abspaths, stats):
            identity = _identity(st)
            hit = known.get(abspath)
            if hit is not None and hit[0] == identity:
                out.append((st.st_size, hit[1]))
                continue
            digest = hash_file(abspath)
            if now - max(st.st_mtime_ns, st.st_ctime_ns) > self.settle_ns:
                settled[abspath] = (identity, digest)
            out.append((st.st_size, digest))
        if settled:
            self._remember(settled)
        return out

    def _lookup(self, abspaths: list[str]) -> dict[str, tuple[str, str]]:
        with self._lock:
            found = {p: self._memory[p] for p in abspaths if p in self._memory}
        missing = list(dict.fromkeys(p for p in abspaths if p not in found))
        if missing and self.file is not None:
            rows = self._read(missing)
            with self._lock:
                self._memory.update(rows)
            found.update(rows)
        return found

    def _remember(self, entries: dict[str, tuple[str, str]]) -> None:
        with self._lock:
            self._memory.update(entries)
        if self.file is None:
            return
        try:
            with closing(self._connect()) as db, db:
                db.executemany("INSERT OR REPLACE INTO digests VALUES (?, ?, ?)",
                               [(p, identity, digest) for p, (identity, digest) in entries.items()])
        except (sqlite3.Error, OSError) as err:
            self._give_up(err)

    def _read(self, abspaths: list[str]) -> dict[str, tuple[str, str]]:
        rows: list[tuple[str, str, str]] = []
        try:
            with closing(self._connect()) as db:
                for start in range(0, len(abspaths), _QUERY_CHUNK):
                    chunk = abspaths[start : start + _QUERY_CHUNK]
                    marks = ",".join("?" * len(chunk))
                    rows += db.execute(f"SELECT path, identity, digest FROM digests WHERE path IN ({marks})",
                                       chunk).fetchall()
        except (sqlite3.Error, OSError) as err:
            self._give_up(err)
            return {}
        return {p: (identity, digest) for p, identity, digest in rows
                if isinstance(identity, str) and isinstance(digest, str) and _DIGEST.fullmatch(digest)}

    def _connect(self) -> sqlite3.Connection:
        assert self.file is not None
        self.file.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.file, timeout=30)
        try:
            db.execute("CREATE TABLE IF NOT EXISTS digests "
                       "(path TEXT PRIMARY KEY, identity TEXT NOT NULL, digest TEXT NOT NULL)")
        except sqlite3.Error:
            db.close()
            raise
        return db

    def _give_up(self, err: Exception) -> None:
        if self.file is not None:
            warnings.warn(f"file digest index {self.file} is unusable ({err}); digests are remembered in this "
                          "process only", stacklevel=4)
            self.file = None


_default: DigestIndex | None = None
_default_lock = threading.Lock()


def default_index() -> DigestIndex:
    """The process's index: ``$CIRLIB_DIGEST_INDEX`` (empty: memory only), else ``data/digests.sqlite`` of the
    checkout, else (cirlib used outside a checkout) memory only."""
    global _default
    with _default_lock:
        if _default is None:
            env = os.environ.get(INDEX_ENV)
            if env is not None:
                file = Path(env) if env else None
            else:
                try:
                    file = project_root() / "data" / "digests.sqlite"
                except RuntimeError:
                    file = None
            _default = DigestIndex(file)
        return _default


def sized_digests(paths: Sequence[str | os.PathLike]) -> list[tuple[int, str]]:
    """(size, blake2b-128 of the bytes) per regular file, in order, through :func:`default_index`."""
    return default_index().sized_digests(paths)


def content_digest(path: str | os.PathLike) -> str:
    """blake2b-128 of a regular file's bytes, through :func:`default_index`."""
    return sized_digests([path])[0][1]


__all__ = ["INDEX_ENV", "SETTLE_SECONDS", "DigestIndex", "content_digest", "default_index", "hash_file",
           "sized_digests"]
