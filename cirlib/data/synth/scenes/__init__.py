"""The embedded ``scenes`` benchmark, written in the exact CIRR and CIRCO layouts.

A scene is a small graph: a pale background (colour + texture) on a canvas of varied aspect
ratio, holding 1-4 objects -- real Fashion-MNIST product photos (bag, sneaker, ankle boot, ...)
and simple shapes -- each with a colour, a size and a grid cell, seen in a view (mirrored and/or
close-up). A query edits a reference scene (1-2 edits); its relative caption is generated from the
*difference* of the two graphs and tagged with the CIRCO semantic aspects it exercises.

Every caption is also compiled into a predicate over scene graphs (the query's constraints: what
both images share -- their common objects, and the background unless the caption changes it --
plus what the caption asks for). The generator checks that the target satisfies it and the
reference does not, that no other member of a CIRR image set satisfies it (so Recall_subset is
well posed) and, for CIRCO, lists *every* gallery image that satisfies it as ground truth -- no
false negatives, which is what CIRCO's multiple ground truths approximate.

Graphs of all images (``attributes``) and queries (captions, aspects, constraints) are kept in
each root's ``cirlib_meta.json`` for absolute captions, zero-shot labels and analyses.

The parts, in the order a scene goes through them:

- :mod:`~cirlib.data.synth.scenes.config`: sizes and knobs (:class:`ScenesBenchConfig`);
- :mod:`~cirlib.data.synth.scenes.graph`: scene graphs, their vocabulary and :func:`satisfies`;
- :mod:`~cirlib.data.synth.scenes.captions`: :func:`absolute_caption` and :func:`describe_change`;
- :mod:`~cirlib.data.synth.scenes.sampler`: random scenes and edits whose change is sayable;
- :mod:`~cirlib.data.synth.scenes.drawing`: :class:`SceneRenderer` and the threaded image writer;
- :mod:`~cirlib.data.synth.scenes.writer`: CIRR and CIRCO roots, :func:`generate_scenes`,
  :func:`load_meta`.
"""

from cirlib.data.synth.scenes.captions import ASPECTS, Change, absolute_caption, describe_change
from cirlib.data.synth.scenes.config import CIRCO_SPLITS, CIRR_SPLITS, ScenesBenchConfig
from cirlib.data.synth.scenes.drawing import SceneRenderer
from cirlib.data.synth.scenes.graph import ITEM_KINDS, KINDS, Scene, SceneObject, satisfies
from cirlib.data.synth.scenes.writer import GENERATOR, PARTIAL_MARKER, VERSION, generate_scenes, load_meta

__all__ = [
    "ASPECTS",
    "CIRCO_SPLITS",
    "CIRR_SPLITS",
    "GENERATOR",
    "ITEM_KINDS",
    "KINDS",
    "PARTIAL_MARKER",
    "VERSION",
    "Change",
    "Scene",
    "SceneObject",
    "SceneRenderer",
    "ScenesBenchConfig",
    "absolute_caption",
    "describe_change",
    "generate_scenes",
    "load_meta",
    "satisfies",
]
