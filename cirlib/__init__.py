"""cirlib: the library behind the Composed Image Retrieval course notebooks.

Packages, in the order data flows through them: :mod:`cirlib.data` (dataset formats, the embedded
benchmarks, preprocessing), :mod:`cirlib.models` (networks), :mod:`cirlib.methods` (how each paper
trains them), :mod:`cirlib.evaluation` (protocols, baselines, analyses, intervals) and
:mod:`cirlib.viz` (tables and figures); :mod:`cirlib.core` holds what all of them share and
:mod:`cirlib.course` the notebooks' common set-up.
"""

__version__ = "0.1.0"
