"""From features to the numbers the papers report.

- :mod:`~cirlib.evaluation.metrics`: ranks, Recall@K, Recall_subset@K and mAP@K of score matrices.
- :mod:`~cirlib.evaluation.protocols`: the benchmark protocols (FashionIQ, CIRR, CIRCO) applied to a
  split's query and gallery features; every evaluation in the course goes through it.
- :mod:`~cirlib.evaluation.baselines`: zero-shot baselines and modality redundancy (iSEARLE).
- :mod:`~cirlib.evaluation.analysis`: the numbers behind CLIP4Cir's analysis figures.
- :mod:`~cirlib.evaluation.bootstrap`: bootstrap intervals and checks of the papers' orderings.
- :mod:`~cirlib.evaluation.paper_results`: published numbers to set beside the course's own.
"""
