"""Multi-turn search: the CBIR demo's loop, without widgets.

The CLIP4Cir authors' demo (the figure in §I of the CBIR student paper) shows results and asks "Is this what
you were looking for?"; if not, "What do you want to change?", and the result the user picks becomes
the next reference. A :class:`Session` is that loop as plain state: :meth:`Session.ask` runs a turn,
:meth:`Session.choose` makes a result the next reference, :meth:`Session.accept` ends the search.
The widget (:class:`cirlib.viz.widgets.MultiTurnSearch`) and notebook 09's scripted sessions
drive the same object, so what a test checks here is what a user clicks.

:class:`SimulatedUser` plays the user in scripted sessions: it knows the target, says what to
change (:func:`attribute_describer` from the embedded benchmark's attributes, or a fixed
caption), and picks the result closest to the target.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import torch.nn.functional as F

from cirlib.data.datasets import Query, query_text
from cirlib.data.synth import fashion
from cirlib.evaluation.bootstrap import Interval, PerQuery
from cirlib.search.engine import Hit, Ranking, Reference, ReferenceLike, Retriever


@dataclass(frozen=True)
class Turn:
    """One round: the reference shown, what the user asked to change, the results, and the answer."""

    reference: Reference
    caption: str
    hits: tuple[Hit, ...]
    chosen: Hit | None = None  # the result that became the next reference, or the one accepted
    accepted: bool = False
    ranking: Ranking | None = field(default=None, repr=False, compare=False)


class Session:
    """A multi-turn search over one :class:`Retriever`'s gallery, starting from ``start``.

    Each turn leaves out of its results the images that were already references in this session
    (showing the user the image they just changed is no help), besides what the benchmark's
    protocol leaves out.
    """

    def __init__(self, retriever: Retriever, start: ReferenceLike, k: int = 8) -> None:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.retriever, self.k = retriever, k
        self.start: Reference = retriever.reference(start)
        self.reference: Reference = self.start
        self.turns: list[Turn] = []

    def __repr__(self) -> str:
        state = "accepted" if self.done else f"reference {self.reference.name}"
        return f"Session({len(self.turns)} turns, {state}, {self.retriever!r})"

    @property
    def done(self) -> bool:
        """True once a result was accepted."""
        return bool(self.turns) and self.turns[-1].accepted

    @property
    def accepted(self) -> Hit | None:
        """The result the user accepted, if any."""
        return self.turns[-1].chosen if self.done else None

    @property
    def seen(self) -> list[int]:
        """Gallery indices of the references so far (the start image included when it is in the gallery)."""
        refs = [self.start, *(t.chosen for t in self.turns if t.chosen is not None and not t.accepted)]
        return list(dict.fromkeys(r.index for r in refs if r.index is not None))

    def ask(self, caption: str) -> Turn:
        """Search from the current reference for ``caption``. Asking again before choosing a result
        replaces the unanswered turn (the user rephrased)."""
        if self.done:
            raise RuntimeError("this session is over (a result was accepted); start a new one")
        if self.turns and self.turns[-1].chosen is None:
            self.turns.pop()
        ranking = self.retriever.ranking(self.reference, caption, self.seen)
        turn = Turn(self.reference, caption.strip(), tuple(ranking.hits(self.k)), ranking=ranking)
        self.turns.append(turn)
        return turn

    def _answer(self, hit: Hit | int) -> Hit:
        """The current turn's result ``hit`` (a :class:`Hit` or its 0-based position)."""
        if not self.turns or self.turns[-1].chosen is not None:
            raise RuntimeError("no results to pick from: ask what to change first")
        hits = self.turns[-1].hits
        if isinstance(hit, int):
            if not 0 <= hit < len(hits):
                raise IndexError(f"result {hit} out of range: this turn shows {len(hits)}")
            return hits[hit]
        if hit not in hits:
            raise ValueError(f"{hit.name} is not among this turn's results")
        return hit

    def choose(self, hit: Hit | int) -> Reference:
        """Make a result of the current turn the next reference ("not yet: change this one")."""
        hit = self._answer(hit)
        self.turns[-1] = replace(self.turns[-1], chosen=hit)
        self.reference = self.retriever.reference(hit.index)
        return self.reference

    def accept(self, hit: Hit | int) -> Hit:
        """End the search with a result of the current turn ("yes, this is what I was looking for")."""
        hit = self._answer(hit)
        self.turns[-1] = replace(self.turns[-1], chosen=hit, accepted=True)
        return hit


# --------------------------------------------------------------------------------------------
# Scripted sessions
# --------------------------------------------------------------------------------------------

Describer = Callable[[Reference], str]
"""What a simulated user asks to change, given the current reference."""


@dataclass(frozen=True)
class SimulatedUser:
    """A user who has ``target`` (a gallery index) in mind.

    Each turn it says what to change (``describe``), accepts the target when it is shown, and
    otherwise picks the result whose image features are closest to the target's: the model's own
    similarity stands in for the user's eye, as in simulated-user studies of interactive retrieval.
    """

    target: int
    describe: Describer

    def pick(self, retriever: Retriever, hits: tuple[Hit, ...]) -> Hit:
        """The result that looks most like the target (first on ties)."""
        gallery = F.normalize(retriever.gallery_features.float(), dim=-1)
        similarity = gallery[[h.index for h in hits]] @ gallery[self.target]
        return hits[int(similarity.argmax())]


def simulate(session: Session, user: SimulatedUser, turns: int = 3) -> Session:
    """Play up to ``turns`` rounds: ask, then accept the target if shown, else choose the closest result."""
    for _ in range(turns):
        if session.done:
            break
        turn = session.ask(user.describe(session.reference))
        found = [h for h in turn.hits if h.index == user.target]
        if found:
            session.accept(found[0])
        else:
            session.choose(user.pick(session.retriever, turn.hits))
    return session


def target_ranks(session: Session, target: int) -> list[int]:
    """The target's 1-based rank in each turn's ranking of the gallery (``0`` where it was left out)."""
    return [t.ranking.rank(target) if t.ranking is not None else 0 for t in session.turns]


def fixed_describer(caption: str) -> Describer:
    """A user who says the same thing every turn (e.g. a benchmark query's caption)."""

    def describe(_reference: Reference) -> str:
        return caption

    return describe


def attribute_describer(attributes: Mapping[str, Mapping[str, str]], target: str, seed: int = 0) -> Describer:
    """A user of the embedded ``fashion`` benchmark who says how the reference's colour, pattern and
    print differ from the target's, in the benchmark's own caption style
    (:func:`cirlib.data.synth.fashion.relative_captions`): at most two changes a turn, as FashionIQ's
    annotators write them. A reference that already has every attribute of the target (another
    product) is described by the target's plain description. ``attributes`` is the generated
    root's ``cirlib_meta.json`` ``attributes`` (:func:`cirlib.data.synth.fashion.load_meta`)."""
    rng = np.random.default_rng(seed)
    wanted = attributes[target]

    def describe(reference: Reference) -> str:
        have = attributes[reference.name]
        changed = [a for a in fashion.ATTRIBUTES if have[a] != wanted[a]]
        if not changed:
            return f"is {fashion.absolute_caption(dict(wanted))}"
        step = {**have, **{a: wanted[a] for a in changed[:2]}}
        return " and ".join(fashion.relative_captions(dict(have), step, rng))

    return describe


def describers(attributes: Mapping[str, Mapping[str, str]] | None, seed: int = 0) -> Callable[[Query], Describer]:
    """Per benchmark query, the simulated user's way of saying what to change: from the generated
    attributes (:func:`attribute_describer`, toward the query's target) when a root has them, else
    the query's own caption every turn (real datasets carry no attributes)."""

    def for_query(query: Query) -> Describer:
        if attributes is None:
            return fixed_describer(query_text(query))
        return attribute_describer(attributes, query.target, seed)

    return for_query


def scripted_sessions(
    retriever: Retriever,
    queries: Sequence[int],
    describer_for: Callable[[Query], Describer],
    k: int = 6,
    turns: int = 3,
) -> tuple[pd.DataFrame, list[Session]]:
    """A simulated session per benchmark query (start: its reference; goal: its target).

    Returns one row per query (``turns`` used, ``found`` and at which turn, the target's rank in
    the first and last turn, its rank for the query's own caption under the protocol, ``one-shot
    rank``) and the sessions themselves. Queries whose target is not in the gallery are skipped.
    """
    split, rows, sessions = retriever.split, [], []
    one_shot = retriever.target_ranks(queries).tolist()
    for index, protocol_rank in zip(queries, one_shot):
        query = split.queries[index]
        if query.target not in retriever.gallery_names:
            continue
        target = retriever.gallery_names.index(query.target)
        session = simulate(Session(retriever, query.reference, k), SimulatedUser(target, describer_for(query)), turns)
        ranks = target_ranks(session, target)
        rows.append({"query": index, "turns": len(session.turns), "found": session.done,
                     "found at turn": len(session.turns) if session.done else 0, "first rank": ranks[0],
                     "last rank": ranks[-1], "one-shot rank": protocol_rank})
        sessions.append(session)
    return pd.DataFrame(rows).set_index("query"), sessions


def _found(frame: pd.DataFrame, k: int, turns: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query, 100 if the target was shown: within ``turns`` turns / in the one-shot top ``k * turns``."""
    multi = (frame["found at turn"] >= 1) & (frame["found at turn"] <= turns)
    ranks = frame["one-shot rank"]
    one_shot = (ranks >= 1) & (ranks <= k * turns)
    return 100.0 * multi.to_numpy(dtype=float), 100.0 * one_shot.to_numpy(dtype=float)


def success_difference(frame: pd.DataFrame, k: int, turns: int, seed: int = 0) -> Interval:
    """Multi-turn success within ``turns`` minus one-shot recall at as many images, with its paired
    95 % bootstrap interval over the queries (:meth:`cirlib.evaluation.bootstrap.PerQuery.difference`)."""
    multi, one_shot = _found(frame, k, turns)
    strata = np.zeros(len(frame), dtype=int)
    return PerQuery({"found": multi}, strata).difference(PerQuery({"found": one_shot}, strata), "found", seed)


def success_by_turn(frame: pd.DataFrame, k: int, turns: int) -> pd.DataFrame:
    """Percent of scripted sessions whose target was shown within 1..``turns`` turns, beside the
    one-shot protocol recall of the queries' own captions at the same number of images looked at
    (``k`` per turn): is a conversation better than a longer result list?"""
    found = [_found(frame, k, t) for t in range(1, turns + 1)]
    table = pd.DataFrame({
        "turn": range(1, turns + 1),
        "images shown": [k * t for t in range(1, turns + 1)],
        "multi-turn found %": [multi.mean() for multi, _ in found],
        "one-shot R@images %": [one_shot.mean() for _, one_shot in found],
    })
    return table.set_index("turn")
