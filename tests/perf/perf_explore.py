"""How long one turn of the interactive search takes: encode the caption, combine it with the
reference, rank the gallery (cached features) and take the top k, per method and benchmark.

A widget feels responsive below ~200 ms a turn (issue 15's goal). Each turn is one
:meth:`cirlib.search.engine.Retriever.search` from a gallery reference with a caption of the
split's queries, as :class:`cirlib.viz.widgets.MultiTurnSearch` runs it; the gallery features come
from the notebooks' feature cache, so building the retrievers first (loading backbones and
checkpoints, reading the cache) is timed separately and not part of a turn. Only the methods whose
artifacts are on disk are measured (run the notebooks first). The goal is checked for the methods
that combine two features (the Sums, the Combiner, iSEARLE); re-ranking also runs its cross-attention
re-ranker on each of the filter's top K candidates (K = 100 on FashionIQ, 50 on CIRR) and is
reported beside it.

    .venv/bin/python tests/perf/perf_explore.py [--quick] [--turns 50] [--threads N] [--k 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from cirlib.course import setup_course
from cirlib.data.datasets import query_text
from cirlib.search.engine import Retriever, available_methods

GOAL_MS = 200.0
SPLITS = {"fashioniq": "fashioniq/dress", "cirr": "cirr", "circo": "circo"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick-mode benchmarks and artifacts")
    parser.add_argument("--turns", type=int, default=50)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    course = setup_course(quick=args.quick)
    rng = np.random.default_rng(0)
    print(f"torch threads: {torch.get_num_threads()}; {args.turns} turns per row, top {args.k}; goal {GOAL_MS:.0f} ms")
    print(f"{'benchmark':10s} {'method':14s} {'gallery':>7s} {'build s':>8s} {'median ms':>9s} {'p90 ms':>7s} "
          f"{'max ms':>7s}")
    worst = {"combining": 0.0, "re-ranking": 0.0}
    for benchmark, name in SPLITS.items():
        for method in available_methods(course, benchmark):
            start = time.perf_counter()
            retriever = Retriever.for_method(course, benchmark, name, method)
            build = time.perf_counter() - start
            queries = retriever.split.queries
            gallery = len(retriever.gallery_names)
            retriever.search(0, query_text(queries[0]), args.k)  # first call: lazy imports, allocator
            times = []
            for _ in range(args.turns):
                caption = query_text(queries[int(rng.integers(len(queries)))])
                reference = int(rng.integers(gallery))
                start = time.perf_counter()
                retriever.search(reference, caption, args.k)
                times.append(1000 * (time.perf_counter() - start))
            median, p90 = statistics.median(times), float(np.percentile(times, 90))
            kind = "re-ranking" if method == "reranking" else "combining"
            worst[kind] = max(worst[kind], median)
            print(f"{benchmark:10s} {method:14s} {gallery:7d} {build:8.2f} {median:9.1f} {p90:7.1f} {max(times):7.1f}")
    print(f"slowest median turn of the combining methods {worst['combining']:.1f} ms: goal "
          f"{'met' if worst['combining'] < GOAL_MS else 'MISSED'}; re-ranking {worst['re-ranking']:.1f} ms")


if __name__ == "__main__":
    main()
