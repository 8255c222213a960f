"""What the digest index saves at a notebook's start: hashing a gallery's bytes against reading their digests back.

Caches and checkpoints are keyed by their input files' content digests, so every process that looks up
a cached gallery's features first needs the digest of each image. Without an index that means reading
every byte again; with :class:`cirlib.core.digests.DigestIndex` a process after the first stats the files
and reads their rows. The benchmark writes ``--files`` files of ``--kib`` KiB of random bytes (a real
dataset's JPEGs are tens to hundreds of KiB), waits until they have settled (``SETTLE_SECONDS``) and
times, each in a fresh index object as a new process would have it:

1. memory only: every file hashed (what every process did before the index);
2. the first process with an index: hashed, and the rows written;
3. a later process: stat and look up only.

The files were just written, so they are in the page cache: step 1 is the best case of hashing, and
reading a dataset that is not cached (a cold start, a network disk) costs more, step 3 does not.

    .venv/bin/python tests/perf/perf_digests.py [--files 20000] [--kib 64] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from cirlib.core.digests import SETTLE_SECONDS, DigestIndex


def timed(index: DigestIndex, files: list[Path]) -> tuple[float, list[tuple[int, str]]]:
    start = time.perf_counter()
    out = index.sized_digests(files)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=20000)
    parser.add_argument("--kib", type=int, default=64)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the scratch folder is made")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="cirlib-digests-") as scratch:
        folder = Path(scratch) / "images"
        folder.mkdir()
        files = []
        for i in range(args.files):
            f = folder / f"{i:07d}.jpg"
            f.write_bytes(os.urandom(args.kib * 1024))
            files.append(f)
        time.sleep(SETTLE_SECONDS + 0.5)
        gib = args.files * args.kib / 2**20
        print(f"{args.files} files of {args.kib} KiB ({gib:.2f} GiB) in {folder}")

        index_file = Path(scratch) / "digests.sqlite"
        runs = [("memory only: every file hashed", DigestIndex(None)),
                ("first process with the index: hashed, rows written", DigestIndex(index_file)),
                ("a later process: stat and look up", DigestIndex(index_file))]
        results = []
        for what, index in runs:
            seconds, out = timed(index, files)
            results.append(out)
            print(f"{what:<52} {seconds:8.2f} s  {args.files / seconds:10.0f} files/s  {gib / seconds:6.2f} GiB/s")
        if not results[0] == results[1] == results[2]:
            raise SystemExit("the three runs disagree")
        print(f"index file: {index_file.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
