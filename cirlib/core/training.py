"""The epoch loop every training stage shares, and its small building blocks.

Per-epoch seeding, validation with a benchmark's protocol, best-checkpoint selection on a named
metric, early stopping and atomic, resumable checkpoints.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from cirlib.core.io import atomic_path


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, loss: Tensor) -> float:
    """One (possibly loss-scaled) optimisation step on ``loss``; returns its value."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.item()


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of everything random in one epoch: resuming at an epoch boundary replays it exactly."""
    return int(seed) * 1_000_003 + int(epoch)


def batch_slices(order: Tensor, batch_size: int) -> Iterator[Tensor]:
    """Consecutive batches of ``order``; a last partial batch is dropped unless it is the only one.

    Dropping it (as CLIP4Cir does) keeps the number of in-batch negatives, and hence the loss
    scale, the same for every step.
    """
    n = len(order)
    n_full = n // batch_size
    if n_full == 0:
        if n > 1:
            yield order
        return
    for i in range(n_full):
        yield order[i * batch_size : (i + 1) * batch_size]



def best_epoch(history: Sequence[Mapping[str, float]], metric: str) -> int:
    """The epoch :class:`TrainingLoop` keeps: the first with the highest ``metric`` (0 if none ran)."""
    best, best_score = 0, -math.inf
    for row in history:
        if row[metric] > best_score:
            best, best_score = int(row["epoch"]), row[metric]
    return best



@dataclass
class TrainingLoop:
    """Epochs of ``train_epoch`` + ``validate``, keeping the best epoch by ``main_metric``.

    After every epoch the loop writes one checkpoint (atomically) holding the current and the best
    weights of ``modules``, the optimizer and grad-scaler states, the history and the early-stopping
    counters, under a ``fingerprint`` of everything the run depends on. A later call with the same
    fingerprint resumes after the last finished epoch, or, if the run had finished, only loads the
    best weights. Each epoch reseeds torch from ``(seed, epoch)``, so an interrupted and resumed run
    gives the same result as an uninterrupted one.
    """

    modules: Mapping[str, nn.Module]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ckpt_path: Path | None
    fingerprint: str
    epochs: int
    patience: int
    main_metric: str
    seed: int
    desc: str = "training"
    meta: dict = field(default_factory=dict)
    _state: dict | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.patience < 1:
            raise ValueError(f"epochs and patience must be >= 1, got {self.epochs} and {self.patience}")
        self._state = self._load()

    def _load(self) -> dict | None:
        """The saved state for this fingerprint, or None (fresh start) with a warning if unusable."""
        if self.ckpt_path is None or not Path(self.ckpt_path).exists():
            return None
        try:
            state = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
        except Exception as err:  # a damaged checkpoint must not block training
            warnings.warn(f"checkpoint {self.ckpt_path} is unreadable ({err}); training from scratch", stacklevel=3)
            return None
        if state.get("fingerprint") != self.fingerprint:
            warnings.warn(
                f"checkpoint {self.ckpt_path} belongs to another configuration or data "
                f"(fingerprint {state.get('fingerprint')} != {self.fingerprint}); training from scratch",
                stacklevel=3,
            )
            return None
        return state

    @property
    def best_epoch(self) -> int:
        """The epoch whose weights ``run`` leaves in ``modules`` (0 before any epoch)."""
        return int(self._state["best_epoch"]) if self._state else 0

    @property
    def finished(self) -> bool:
        """True when a checkpoint of this exact run says training already ended."""
        return bool(self._state and self._state["finished"])

    def _restore_best(self) -> None:
        for name, module in self.modules.items():
            module.load_state_dict(self._state["best_modules"][name])

    def run(self, train_epoch: Callable[[int], float], validate: Callable[[], dict[str, float]]) -> list[dict]:
        """Train (or resume, or just load) and leave the best epoch's weights in ``modules``.

        ``train_epoch(epoch)`` trains one epoch (1-based) and returns its mean loss; ``validate()``
        returns the benchmark's metric dict and runs with all modules in eval mode without grads.
        Returns one dict per epoch: ``epoch``, ``loss``, the metrics and ``seconds``.
        """
        state = self._state
        if state is not None and state["finished"]:
            self._restore_best()
            return list(state["history"])
        if state is None:
            state = {
                "fingerprint": self.fingerprint,
                "meta": self.meta,
                "epoch": 0,
                "history": [],
                "best_epoch": 0,
                "best_score": -math.inf,
                "bad_epochs": 0,
                "finished": False,
                "best_modules": None,
            }
        else:
            for name, module in self.modules.items():
                module.load_state_dict(state["modules"][name])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
        epochs = range(state["epoch"] + 1, self.epochs + 1)
        bar = tqdm(epochs, desc=self.desc, initial=state["epoch"], total=self.epochs)
        for epoch in bar:
            start = time.perf_counter()
            torch.manual_seed(epoch_seed(self.seed, epoch))
            loss = float(train_epoch(epoch))
            if not math.isfinite(loss):
                raise FloatingPointError(f"{self.desc}: loss became {loss} in epoch {epoch}; lower the learning rate")
            for module in self.modules.values():
                module.eval()
            with torch.no_grad():
                metrics = {k: float(v) for k, v in validate().items()}
            if self.main_metric not in metrics:
                raise KeyError(
                    f"{self.desc}: main metric {self.main_metric!r} is not among the validation metrics "
                    f"{sorted(metrics)}"
                )
            score = metrics[self.main_metric]
            if not math.isfinite(score):
                raise ValueError(f"{self.desc}: main metric {self.main_metric!r} is {score} in epoch {epoch}")
            state["history"].append({"epoch": epoch, "loss": loss, **metrics, "seconds": time.perf_counter() - start})
            if score > state["best_score"]:
                state.update(best_score=score, best_epoch=epoch, bad_epochs=0)
                state["best_modules"] = {
                    name: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
                    for name, m in self.modules.items()
                }
            else:
                state["bad_epochs"] += 1
            state["epoch"] = epoch
            state["finished"] = epoch == self.epochs or state["bad_epochs"] >= self.patience
            self._save(state)
            bar.set_postfix(loss=f"{loss:.4f}", **{self.main_metric: f"{score:.2f}"}, best=state["best_epoch"])
            if state["finished"]:
                break
        bar.close()
        self._state = state
        self._restore_best()
        return list(state["history"])

    def _save(self, state: dict) -> None:
        state["modules"] = {name: m.state_dict() for name, m in self.modules.items()}
        state["optimizer"] = self.optimizer.state_dict()
        state["scaler"] = self.scaler.state_dict()
        if self.ckpt_path is not None:
            with atomic_path(self.ckpt_path) as tmp:
                torch.save(state, tmp)
