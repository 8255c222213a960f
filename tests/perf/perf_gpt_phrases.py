"""Time the default small phrase LM's training and its phrases for the whole embedded vocabulary.

Reads the generated roots under data/ (run `make data` first) and caches nothing, so both steps run
in full. Prints wall and CPU seconds: on a shared CPU the wall time measures the neighbours too.
"""

from __future__ import annotations

import tempfile
import time

from cirlib.core import paths
from cirlib.data.concepts import embedded_concepts
from cirlib.methods.gpt_phrases import PhraseConfig, PhraseLMConfig, embedded_corpus, generate_phrases, train_phrase_lm


def _timed(label: str, fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    print(f"{label}: {time.perf_counter() - wall:.1f} s wall, {time.process_time() - cpu:.1f} s CPU", flush=True)
    return out


def main() -> None:
    data = paths.data_dir()
    roots = [data / "fashion", data / "scenes" / "CIRR"]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = _timed("corpus", lambda: embedded_corpus(roots, cache_dir=tmp))
        print(f"  {len(corpus)} sentences")
        lm = _timed("train", lambda: train_phrase_lm(corpus, PhraseLMConfig(), progress=False))
        concepts = embedded_concepts()
        phrases = _timed("generate", lambda: generate_phrases(lm, concepts, PhraseConfig(), progress=False))
    counts = [len(v) for v in phrases.values()]
    print(f"  {len(concepts)} concepts, {sum(counts)} distinct phrases ({min(counts)}-{max(counts)} per concept)")
    for concept in ("red dress", "star print", "small bag", "lavender background"):
        print(f"  {concept}: {phrases[concept][:3]}")


if __name__ == "__main__":
    main()
