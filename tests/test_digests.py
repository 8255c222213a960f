"""The digest index: digests shared by processes, forgotten on any rewrite, never trusted when unusable."""

from __future__ import annotations

import os
import sqlite3
import time
import warnings
from pathlib import Path

import pytest

from cirlib.core import digests


def _files(folder: Path, n: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        f = folder / f"f{i}.bin"
        f.write_bytes(bytes([i]) * 1000)
        out.append(f)
    return out


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the files :mod:`cirlib.core.digests` reads, in order."""
    calls: list[str] = []
    real = digests.hash_file

    def counted(path: str, *args, **kwargs) -> str:
        calls.append(os.path.basename(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(digests, "hash_file", counted)
    return calls


def _rewrite_keeping_size_and_mtime(path: Path, data: bytes) -> None:
    """``cp -p`` / ``rsync -t``: other bytes, same size, the old mtime restored; repeated until the ctime
    has moved, since two writes within one timestamp tick share it (the case settling guards against)."""
    st = os.stat(path)
    while True:
        path.write_bytes(data)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        if os.stat(path).st_ctime_ns != st.st_ctime_ns:
            return
        time.sleep(0.01)


def test_hash_file_is_blake2b_128(tmp_path: Path) -> None:
    import hashlib

    f = tmp_path / "a.bin"
    f.write_bytes(b"abc" * 1000)
    assert digests.hash_file(str(f), chunk=7) == hashlib.blake2b(b"abc" * 1000, digest_size=16).hexdigest()


def test_a_second_process_reads_the_index_and_a_rewrite_is_hashed_again(tmp_path: Path, hashed: list[str]) -> None:
    files = _files(tmp_path / "images")
    index = tmp_path / "index" / "digests.sqlite"  # its folder does not exist yet
    first = digests.DigestIndex(index, settle_seconds=0).sized_digests(files)
    assert first == [(1000, digests.hash_file(str(f))) for f in files]
    hashed.clear()

    # another process (a new index object on the same file) reads no byte of the files
    assert digests.DigestIndex(index, settle_seconds=0).sized_digests(files) == first
    assert hashed == []

    _rewrite_keeping_size_and_mtime(files[1], b"\xff" * 1000)
    third = digests.DigestIndex(index, settle_seconds=0).sized_digests(files)
    assert hashed == ["f1.bin"]
    assert third[1] == (1000, digests.hash_file(str(files[1]))) != first[1]
    assert third[0] == first[0] and third[2] == first[2]
    with sqlite3.connect(index) as db:  # one row per path: the rewrite replaced f1's
        assert db.execute("SELECT COUNT(*) FROM digests").fetchone() == (3,)


def test_the_same_process_also_forgets_a_rewritten_file(tmp_path: Path, hashed: list[str]) -> None:
    files = _files(tmp_path, 1)
    index = digests.DigestIndex(None, settle_seconds=0)  # memory only
    before = index.sized_digests(files)
    index.sized_digests(files)
    assert hashed == ["f0.bin"]
    _rewrite_keeping_size_and_mtime(files[0], b"\x07" * 1000)
    assert index.sized_digests(files) != before and hashed == ["f0.bin", "f0.bin"]


def test_files_changed_within_the_settling_time_are_not_remembered(tmp_path: Path, hashed: list[str]) -> None:
    files = _files(tmp_path, 1)  # written just now
    index_file = tmp_path / "digests.sqlite"
    index = digests.DigestIndex(index_file, settle_seconds=60)
    assert index.sized_digests(files) == index.sized_digests(files)
    digests.DigestIndex(index_file, settle_seconds=60).sized_digests(files)
    assert hashed == ["f0.bin"] * 3  # neither in memory nor in the index


def test_an_unusable_index_warns_once_and_the_digests_stay_right(tmp_path: Path, hashed: list[str]) -> None:
    files = _files(tmp_path / "images")
    bad = tmp_path / "digests.sqlite"
    bad.write_bytes(b"this is not an SQLite database" * 50)
    index = digests.DigestIndex(bad, settle_seconds=0)
    with pytest.warns(UserWarning, match=r"digests\.sqlite is unusable .*remembered in this process only"):
        out = index.sized_digests(files)
    assert out == [(1000, digests.hash_file(str(f))) for f in files] and index.file is None
    hashed.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert index.sized_digests(files) == out
    assert hashed == []  # still remembered in memory


def test_malformed_rows_are_ignored(tmp_path: Path, hashed: list[str]) -> None:
    files = _files(tmp_path / "images", 2)
    index_file = tmp_path / "digests.sqlite"
    right = digests.DigestIndex(index_file, settle_seconds=0).sized_digests(files)
    with sqlite3.connect(index_file) as db:
        db.execute("UPDATE digests SET digest = 'not hex' WHERE path = ?", (str(files[0].resolve()),))
    hashed.clear()
    assert digests.DigestIndex(index_file, settle_seconds=0).sized_digests(files) == right
    assert hashed == ["f0.bin"]


def test_errors_name_the_file(tmp_path: Path) -> None:
    index = digests.DigestIndex(None)
    with pytest.raises(FileNotFoundError, match="gone.bin"):
        index.sized_digests([tmp_path / "gone.bin"])
    with pytest.raises(OSError, match="not a regular file"):
        index.sized_digests([tmp_path])


def test_default_index_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(digests, "_default", None)
    monkeypatch.setenv(digests.INDEX_ENV, str(tmp_path / "mine.sqlite"))
    assert digests.default_index().file == tmp_path / "mine.sqlite"
    assert digests.default_index() is digests.default_index()  # one per process

    monkeypatch.setattr(digests, "_default", None)
    monkeypatch.setenv(digests.INDEX_ENV, "")
    assert digests.default_index().file is None

    monkeypatch.setattr(digests, "_default", None)
    monkeypatch.delenv(digests.INDEX_ENV)
    monkeypatch.setenv("CIRLIB_ROOT", str(tmp_path))
    assert digests.default_index().file == tmp_path.resolve() / "data" / "digests.sqlite"

    f = _files(tmp_path / "images", 1)[0]
    assert digests.content_digest(f) == digests.hash_file(str(f))
