"""The training loop every stage shares, and its small building blocks.

One loop trains the tiny CLIP (pretraining), the encoders (stage 1), the Combiner and both
together (end to end), and is meant for any later model trained by gradient steps (a phi network
on cached features, a re-ranker). It runs in epochs of ``train_epoch`` + ``validate``: an epoch is
whatever a stage validates after, a pass over its data or a fixed number of steps. The loop
reseeds every epoch, keeps the best epoch by a metric (or the last one), stops early, and writes
one atomic, resumable checkpoint keyed by a fingerprint of the run (and, when the run names its
inputs, a readable record of them, so that a retrain can say which input changed). It runs the
same in one process and data-parallel under ``torchrun`` (:mod:`cirlib.core.distributed`): callers train on
their share of each batch (:func:`step_batches`), losses are averaged over processes, and only
rank 0 validates, writes the checkpoint and shows progress.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from cirlib.core import distributed
from cirlib.core.io import atomic_path
from cirlib.core.io import fingerprint as digest
from cirlib.core.tensors import eval_mode

Scheduler = torch.optim.lr_scheduler.LRScheduler


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    micro_losses: Sequence[Callable[[], Tensor]],
    scheduler: Scheduler | None = None,
    models: Sequence[nn.Module] = (),
) -> float:
    """One (possibly loss-scaled) optimisation step over accumulated micro-batches; returns the mean loss.

    Each ``micro_losses[i]()`` computes one micro-batch's loss; their gradients add up to those of
    the mean, so ``len(micro_losses)`` micro-batches of ``B / n`` rows fit the memory of one while
    updating as often as batches of ``B`` (with fewer in-batch negatives per loss). Data-parallel
    ``models`` average their gradients over processes once, at the last micro-batch.
    """
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for i, micro_loss in enumerate(micro_losses):
        last = i == len(micro_losses) - 1
        with contextlib.ExitStack() as stack:
            for model in models:
                if not last and isinstance(model, nn.parallel.DistributedDataParallel):
                    stack.enter_context(model.no_sync())
            loss = micro_loss()
            scaler.scale(loss / len(micro_losses)).backward()
        total += loss.item()
    scaler.step(optimizer)
    scaler.update()
    if scheduler is not None:
        scheduler.step()
    return total / len(micro_losses)


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


def step_batches(rows: Tensor, accumulation: int = 1) -> list[Tensor]:
    """This process's rows of each of the ``accumulation`` micro-batches of one step's batch ``rows``.

    Every process draws the same global batch; each trains on its share
    (:func:`cirlib.core.distributed.shard`), so the global batch, and with it the schedule and the
    number of negatives a loss sees once gathered, does not depend on the number of processes.
    """
    if accumulation < 1:
        raise ValueError(f"gradient accumulation must be >= 1 micro-batch, got {accumulation}")
    return [distributed.shard(part) for part in rows.tensor_split(accumulation)]


def best_epoch(history: Sequence[Mapping[str, float]], metric: str) -> int:
    """The epoch :class:`TrainingLoop` keeps: the first with the highest ``metric`` (0 if none ran)."""
    best, best_score = 0, -math.inf
    for row in history:
        if row[metric] > best_score:
            best, best_score = int(row["epoch"]), row[metric]
    return best


def still_rising(history: Sequence[Mapping[str, float]], metric: str, min_delta: float = 0.0) -> bool:
    """Whether the last epoch beat every earlier one on ``metric`` by more than ``min_delta``.

    A run cut by its epoch budget while this holds is a lower bound on what its schedule can reach. A
    rise of ``min_delta`` or less is what early stopping treats as a flat curve, so it does not count;
    a single epoch shows no trend and does not count either.
    """
    if min_delta < 0:
        raise ValueError(f"min_delta must be >= 0, got {min_delta}")
    if len(history) < 2:
        return False
    return history[-1][metric] > max(row[metric] for row in history[:-1]) + min_delta


def checkpoint_history(ckpt_path: Path | str) -> list[dict]:
    """The per-epoch history saved in a :class:`TrainingLoop` checkpoint (epochs, metrics, seconds),
    e.g. to state what an earlier notebook's run cost without re-running it."""
    if not Path(ckpt_path).exists():
        raise FileNotFoundError(f"no training checkpoint at {ckpt_path}; run the notebook that trains it first")
    return list(torch.load(ckpt_path, map_location="cpu", weights_only=True)["history"])


_SHORT = 60  # characters: longer values (file lists, configs of configs) are recorded by their hash


def describe_inputs(inputs: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A flat, readable record of what a run depends on: ``{"config.lr": "0.0003", "precision": "\"bf16\""}``.

    Nested mappings become dotted keys; each leaf is its JSON text when short and its hash when
    not, so a checkpoint stays small and two records differ exactly where the inputs differ.
    """
    record: dict[str, str] = {}
    for key, value in inputs.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            record |= describe_inputs(value, f"{name}.")
            continue
        text = json.dumps(value, sort_keys=True, default=str)
        record[name] = text if len(text) <= _SHORT else f"<hash {digest(value)}>"
    return record


def changed_inputs(old: Mapping[str, str], new: Mapping[str, str], shown: int = 6) -> str:
    """What differs between two :func:`describe_inputs` records, e.g. ``precision: "bf16" -> "fp32"``."""
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    parts = [f"{k}: {old.get(k, '(absent)')} -> {new.get(k, '(absent)')}" for k in keys[:shown]]
    if len(keys) > shown:
        parts.append(f"and {len(keys) - shown} more")
    return "; ".join(parts)


def _cpu_copy(modules: Mapping[str, nn.Module]) -> dict[str, dict[str, Tensor]]:
    return {name: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()} for name, m in modules.items()}


@dataclass
class TrainingLoop:
    """Epochs of ``train_epoch`` + ``validate`` with one resumable checkpoint.

    With ``main_metric`` the loop keeps the epoch with the best validation score and stops after
    ``patience`` epochs without an improvement of more than ``min_delta`` (a validation curve that
    still creeps up by a few hundredths per epoch has converged for practical purposes, and on a CPU
    every further epoch costs real minutes); without it, it keeps the last epoch's weights and runs
    all ``epochs`` (or until ``time_budget_s`` of training time is spent, see :meth:`out_of_time`).

    After every epoch rank 0 writes one checkpoint (atomically) holding the current (and, when
    selecting, the best) weights of ``modules``, the optimizer, grad-scaler and scheduler states,
    the history and the stopping counters, under a ``fingerprint`` of everything the run depends
    on. Given as the mapping it is computed from (rather than its digest), the loop also records
    the inputs readably (:func:`describe_inputs`) and, when a checkpoint belongs to other inputs,
    its warning names the entries that changed (a precision, a learning rate, the data). A later
    call with the same fingerprint resumes after the last finished epoch, or, if the run had
    finished, only loads the kept weights. Each epoch reseeds torch from ``(seed, epoch)``,
    so an interrupted and resumed run gives the same result as an uninterrupted one.
    """

    modules: Mapping[str, nn.Module]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ckpt_path: Path | None
    fingerprint: str | Mapping[str, Any]  # a digest, or the inputs it is computed from (a digest after init)
    epochs: int
    seed: int
    main_metric: str | None = None
    patience: int | None = None
    min_delta: float = 0.0
    scheduler: Scheduler | None = None
    time_budget_s: float | None = None
    desc: str = "training"
    progress: bool = True
    meta: dict = field(default_factory=dict)
    _inputs: dict[str, str] | None = field(default=None, init=False, repr=False)
    _state: dict | None = field(default=None, init=False, repr=False)
    _epoch_start: float | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.patience is not None and (self.patience < 1 or self.main_metric is None):
            raise ValueError(f"patience must be >= 1 and needs a main metric, got {self.patience}")
        if self.min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {self.min_delta}")
        if isinstance(self.fingerprint, Mapping):
            self._inputs = describe_inputs(self.fingerprint)
            self.fingerprint = digest(self.fingerprint)
        self._state = distributed.broadcast(self._load() if distributed.is_main() else None)

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
            recorded = state.get("inputs")
            what = (f"changed: {changed_inputs(recorded, self._inputs)}" if recorded and self._inputs
                    else f"fingerprint {state.get('fingerprint')} != {self.fingerprint}")
            warnings.warn(f"checkpoint {self.ckpt_path} belongs to another configuration or data ({what}); "
                          "training from scratch", stacklevel=3)
            return None
        return state

    @property
    def epoch(self) -> int:
        """The last finished epoch (0 before any)."""
        return int(self._state["epoch"]) if self._state else 0

    @property
    def best_epoch(self) -> int:
        """The epoch whose weights ``run`` leaves in ``modules`` (0 before any epoch)."""
        return int(self._state["best_epoch"]) if self._state else 0

    @property
    def finished(self) -> bool:
        """True when a checkpoint of this exact run says training already ended."""
        return bool(self._state and self._state["finished"])

    @property
    def resumed(self) -> bool:
        """True when ``run`` continues an unfinished checkpoint rather than starting afresh."""
        return bool(self._state and not self._state["finished"] and self._state["epoch"] > 0)

    @property
    def history(self) -> list[dict]:
        """One dict per finished epoch, as ``run`` returns them."""
        return list(self._state["history"]) if self._state else []

    @property
    def train_seconds(self) -> float:
        """Seconds spent in ``train_epoch`` so far (over resumes), counting the epoch under way."""
        spent = self._state["train_seconds"] if self._state else 0.0
        if self._epoch_start is not None:
            spent += time.perf_counter() - self._epoch_start
        return spent

    def out_of_time(self) -> bool:
        """Whether ``time_budget_s`` of training time is spent, counting the epoch under way.

        A ``train_epoch`` that checks it before each step ends its epoch early; the loop then
        validates, saves and finishes. Every process gets rank 0's answer, so none trains alone.
        """
        if self.time_budget_s is None:
            return False
        return distributed.any_rank(distributed.is_main() and self.train_seconds >= self.time_budget_s)

    def run(
        self,
        train_epoch: Callable[[int], float | Mapping[str, Any]],
        validate: Callable[[], Mapping[str, float]] | None = None,
    ) -> list[dict]:
        """Train (or resume, or just load) and leave the kept epoch's weights in ``modules``.

        ``train_epoch(epoch)`` trains one epoch (1-based) on this process's share and returns its
        mean loss, or a dict with ``"loss"`` and anything else to record (e.g. finer-grained log
        rows); ``validate()`` returns metrics and runs on rank 0 with all modules in eval mode and
        without grads. Returns one dict per epoch: ``epoch``, ``loss``, the metrics and ``seconds``.
        """
        state = self._state
        if state is not None and state["finished"]:
            self._restore(state["best_modules"] if self.main_metric is not None else state["modules"])
            return list(state["history"])
        state = self._state = self._start(state)
        bar = tqdm(total=self.epochs, initial=state["epoch"], desc=self.desc,
                   disable=not (self.progress and distributed.is_main()))
        while not state["finished"]:
            self._run_epoch(state, state["epoch"] + 1, train_epoch, validate)
            bar.update(1)
            bar.set_postfix(self._postfix(state))
        bar.close()
        if self.main_metric is not None:  # else the last epoch's weights are already in place
            self._restore(state["best_modules"])
        return list(state["history"])

    def _start(self, resume: dict | None) -> dict:
        """A fresh state, or the checkpoint's with ``modules``, optimizer and schedule restored from it."""
        if resume is None:
            return {
                "fingerprint": self.fingerprint, "inputs": self._inputs, "meta": self.meta, "epoch": 0,
                "history": [], "best_epoch": 0, "best_score": -math.inf, "plateau_score": -math.inf, "bad_epochs": 0,
                "finished": False, "best_modules": None,
                "train_seconds": 0.0,
            }
        for name, module in self.modules.items():
            module.load_state_dict(resume["modules"][name])
        self.optimizer.load_state_dict(resume["optimizer"])
        self.scaler.load_state_dict(resume["scaler"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(resume["scheduler"])
        resume.setdefault("train_seconds", 0.0)
        return resume

    def _run_epoch(
        self,
        state: dict,
        epoch: int,
        train_epoch: Callable[[int], float | Mapping[str, Any]],
        validate: Callable[[], Mapping[str, float]] | None,
    ) -> None:
        start = self._epoch_start = time.perf_counter()
        torch.manual_seed(epoch_seed(self.seed, epoch))
        result = train_epoch(epoch)
        record = dict(result) if isinstance(result, Mapping) else {"loss": result}
        record["loss"] = distributed.mean(float(record["loss"]))
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(
                f"{self.desc}: loss became {record['loss']} in epoch {epoch}; lower the learning rate"
            )
        state["train_seconds"] += time.perf_counter() - start
        self._epoch_start = None
        out_of_time = self.out_of_time()
        metrics = distributed.broadcast(self._validate(validate, epoch) if distributed.is_main() else None)
        state["history"].append({"epoch": epoch, **record, **metrics, "seconds": time.perf_counter() - start})
        self._keep(state, epoch, metrics)
        state["epoch"] = epoch
        stalled = self.patience is not None and state["bad_epochs"] >= self.patience
        state["finished"] = epoch == self.epochs or stalled or out_of_time
        if distributed.is_main():
            self._save(state)

    def _validate(self, validate: Callable[[], Mapping[str, float]] | None, epoch: int) -> dict[str, float]:
        if validate is None:
            return {}
        with eval_mode(*self.modules.values()), torch.no_grad():
            metrics = {k: float(v) for k, v in validate().items()}
        if self.main_metric is not None:
            if self.main_metric not in metrics:
                raise KeyError(
                    f"{self.desc}: main metric {self.main_metric!r} is not among the validation metrics "
                    f"{sorted(metrics)}"
                )
            if not math.isfinite(metrics[self.main_metric]):
                raise ValueError(f"{self.desc}: main metric {self.main_metric!r} is {metrics[self.main_metric]} "
                                 f"in epoch {epoch}")
        return metrics

    def _keep(self, state: dict, epoch: int, metrics: Mapping[str, float]) -> None:
        """Update the kept epoch: the best by ``main_metric``, else simply the latest."""
        if self.main_metric is None:
            state["best_epoch"] = epoch
            return
        score = metrics[self.main_metric]
        # patience counts the epochs since the score last rose by more than min_delta
        plateau = state.setdefault("plateau_score", state["best_score"])  # checkpoints from before min_delta
        if score > state["best_score"]:
            state.update(best_score=score, best_epoch=epoch, best_modules=_cpu_copy(self.modules))
        if score > plateau + self.min_delta:
            state.update(plateau_score=score, bad_epochs=0)
        else:
            state["bad_epochs"] += 1

    def _postfix(self, state: dict) -> dict[str, str]:
        last = state["history"][-1]
        postfix = {"loss": f"{last['loss']:.4f}"}
        if self.main_metric is not None:
            postfix |= {self.main_metric: f"{last[self.main_metric]:.2f}", "best": str(state["best_epoch"])}
        return postfix

    def _restore(self, weights: Mapping[str, Mapping[str, Tensor]]) -> None:
        for name, module in self.modules.items():
            module.load_state_dict(weights[name])

    def _save(self, state: dict) -> None:
        if state["finished"]:
            # Only the kept weights and the history are ever read again: dropping the optimizer state
            # (2x the trained weights for Adam) and the current weights shrinks the file 2-4x.
            for key in ("optimizer", "scaler", "scheduler"):
                state.pop(key, None)
            if self.main_metric is None:
                state["modules"] = {name: m.state_dict() for name, m in self.modules.items()}
            else:
                state.pop("modules", None)
        else:
            state["modules"] = {name: m.state_dict() for name, m in self.modules.items()}
            state["optimizer"] = self.optimizer.state_dict()
            state["scaler"] = self.scaler.state_dict()
            if self.scheduler is not None:
                state["scheduler"] = self.scheduler.state_dict()
        if self.ckpt_path is not None:
            with atomic_path(self.ckpt_path) as tmp:
                torch.save(state, tmp)


def load_kept(ckpt_path: Path | str, name: str, build: Callable[..., nn.Module],
              device: torch.device | str = "cpu") -> nn.Module:
    """The module ``name`` of a finished :class:`TrainingLoop` checkpoint, in eval mode:
    ``build(**hparams)`` (the ``meta["hparams"]`` the trainer recorded) with the weights the loop
    kept, the best epoch's where it selected one, else the last epoch's. How a later notebook or the
    search engine uses what an earlier one trained, without its training data."""
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    weights = (state.get("best_modules") or state.get("modules") or {}).get(name)
    if not state.get("finished") or weights is None:
        raise ValueError(f"{ckpt_path} holds no finished module {name!r} (field 'best_modules.{name}' or "
                         f"'modules.{name}'); re-run the notebook that trains it")
    module = build(**state["meta"]["hparams"])
    module.load_state_dict(weights)
    return module.to(device).eval()
