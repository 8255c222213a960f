"""The shared training loop: keep-last runs, LR schedules, accumulation, time budgets, resume, the
record of a run's inputs that names what changed when a checkpoint is retrained, and data-parallel
training on two CPU processes (gloo) against one process with the same global batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cirlib.core import distributed
from cirlib.core.io import fingerprint
from cirlib.core.training import (
    TrainingLoop,
    changed_inputs,
    checkpoint_history,
    describe_inputs,
    load_kept,
    optimizer_step,
    step_batches,
    still_rising,
)
from cirlib.methods.combiner_training import CombinerConfig, CombinerData, train_combiner
from cirlib.methods.losses import batch_contrastive_loss

# ------------------------------------------------------------------------------ one process


def test_distributed_helpers_are_identities_in_one_process() -> None:
    x = torch.arange(6.0)
    assert not distributed.active() and distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.is_main() and torch.equal(distributed.shard(x), x) and distributed.gather(x) is x
    assert distributed.local_rows(6) == slice(0, 6) and distributed.mean(2.5) == 2.5
    assert distributed.broadcast({"a": 1}) == {"a": 1} and not distributed.any_rank(False)
    module = nn.Linear(2, 2)
    assert distributed.wrap(module) is module
    assert [b.tolist() for b in step_batches(torch.arange(5), 2)] == [[0, 1, 2], [3, 4]]


def test_accumulated_micro_batches_give_the_full_batch_gradient() -> None:
    """For a loss that is a mean over rows, two half-batches step exactly like one full batch."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)
    steps = {}
    for accumulation in (1, 2):
        torch.manual_seed(0)
        model = nn.Linear(3, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        losses = [lambda rows=rows, model=model: nn.functional.mse_loss(model(x[rows]), y[rows])
                  for rows in step_batches(torch.arange(8), accumulation)]
        loss = optimizer_step(opt, scaler, losses)
        steps[accumulation] = (loss, model.weight.detach().clone())
    assert steps[1][0] == pytest.approx(steps[2][0], rel=1e-6)
    torch.testing.assert_close(steps[1][1], steps[2][1])


def _regression_loop(tmp_path: Path, epochs: int = 4, inputs: str | dict = "fp",
                     **kw) -> tuple[TrainingLoop, nn.Module, callable]:
    """A linear regression trained with AdamW and a step LR schedule, 4 steps per epoch."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    x = torch.randn(32, 3, generator=torch.Generator().manual_seed(1))
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
    loop = TrainingLoop({"model": model}, opt, scaler, tmp_path / "ckpt.pt", inputs, epochs, seed=0,
                        scheduler=sched, progress=False, **kw)

    def train_epoch(epoch: int) -> float:
        order = torch.randperm(32)  # from the epoch's seed
        losses = [optimizer_step(opt, scaler, [lambda r=rows: nn.functional.mse_loss(model(x[r]), y[r])], sched)
                  for rows in order.view(4, 8)]
        return sum(losses) / len(losses)

    return loop, model, train_epoch


def _crashing_in(crash_epoch: int, train_epoch: callable) -> callable:
    """``train_epoch`` interrupted (as by Ctrl-C) when epoch ``crash_epoch`` starts."""

    def train(epoch: int) -> float:
        if epoch == crash_epoch:
            raise KeyboardInterrupt
        return train_epoch(epoch)

    return train


def test_keep_last_run_with_a_schedule_resumes_exactly(tmp_path: Path) -> None:
    loop, model, train_epoch = _regression_loop(tmp_path / "full")
    history = loop.run(train_epoch)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4] and loop.best_epoch == 4
    assert history[-1]["loss"] < history[0]["loss"]
    uninterrupted = model.weight.detach().clone()

    cut, _, cut_epoch = _regression_loop(tmp_path / "cut")
    with pytest.raises(KeyboardInterrupt):
        cut.run(_crashing_in(3, cut_epoch))
    resumed, model2, train2 = _regression_loop(tmp_path / "cut")
    assert resumed.resumed and resumed.epoch == 2
    again = resumed.run(train2)
    assert [h["loss"] for h in again] == [h["loss"] for h in history]
    assert torch.equal(model2.weight, uninterrupted)

    done, model3, _ = _regression_loop(tmp_path / "full")  # finished: loaded, not retrained
    assert done.finished and done.run(lambda e: pytest.fail("retrained")) == history
    assert torch.equal(model3.weight, uninterrupted)
    finished = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)
    assert "modules" in finished and not {"optimizer", "scaler", "scheduler"} & set(finished), (
        "a finished keep-last run keeps its last weights and history only")


def test_time_budget_ends_the_run_after_the_epoch_under_way(tmp_path: Path) -> None:
    loop, _, train_epoch = _regression_loop(tmp_path, epochs=50, time_budget_s=0.0)
    history = loop.run(train_epoch)
    assert len(history) == 1 and loop.finished


def test_selection_keeps_the_best_epoch_and_stops_early(tmp_path: Path) -> None:
    scores = {1: 1.0, 2: 3.0, 3: 2.0, 4: 2.5, 5: 9.0}
    loop, model, train_epoch = _regression_loop(tmp_path, epochs=5, main_metric="score", patience=2)
    weights = {}

    def train_and_remember(epoch: int) -> float:
        loss = train_epoch(epoch)
        weights[epoch] = model.weight.detach().clone()
        return loss

    history = loop.run(train_and_remember, lambda: {"score": scores[loop.epoch + 1]})
    assert [h["epoch"] for h in history] == [1, 2, 3, 4] and loop.best_epoch == 2
    assert torch.equal(model.weight, weights[2])
    finished = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert not {"modules", "optimizer", "scaler", "scheduler"} & set(finished), "only the best weights stay"
    again, model2, _ = _regression_loop(tmp_path, epochs=5, main_metric="score", patience=2)
    assert again.run(lambda e: pytest.fail("retrained")) == history and torch.equal(model2.weight, weights[2])


def test_load_kept_rebuilds_the_kept_weights_of_either_kind_of_run(tmp_path: Path) -> None:
    hparams = {"in_features": 3, "out_features": 1}
    last, last_model, last_epoch = _regression_loop(tmp_path / "last", meta={"hparams": hparams})
    with pytest.raises(KeyboardInterrupt):
        last.run(_crashing_in(2, last_epoch))
    with pytest.raises(ValueError, match="no finished module 'model'"):  # epoch 1 saved, the run unfinished
        load_kept(tmp_path / "last" / "ckpt.pt", "model", nn.Linear)
    last, last_model, last_epoch = _regression_loop(tmp_path / "last", meta={"hparams": hparams})
    last.run(last_epoch)
    kept = load_kept(tmp_path / "last" / "ckpt.pt", "model", nn.Linear)
    assert not kept.training and torch.equal(kept.weight, last_model.weight)

    scores = {1: 1.0, 2: 3.0, 3: 2.0, 4: 0.5}
    best, best_model, best_epoch = _regression_loop(tmp_path / "best", main_metric="score", meta={"hparams": hparams})
    weights = {}

    def train_and_remember(epoch: int) -> float:
        loss = best_epoch(epoch)
        weights[epoch] = best_model.weight.detach().clone()
        return loss

    best.run(train_and_remember, lambda: {"score": scores[best.epoch + 1]})
    kept = load_kept(tmp_path / "best" / "ckpt.pt", "model", nn.Linear)
    assert torch.equal(kept.weight, weights[2]) and not torch.equal(kept.weight, weights[4])
    with pytest.raises(ValueError, match="no finished module 'phi'"):
        load_kept(tmp_path / "best" / "ckpt.pt", "phi", nn.Linear)


def test_checkpoint_history_reads_a_finished_run(tmp_path: Path) -> None:
    loop, _, train_epoch = _regression_loop(tmp_path, epochs=3)
    history = loop.run(train_epoch)
    assert checkpoint_history(tmp_path / "ckpt.pt") == history and len(history) == 3
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        checkpoint_history(tmp_path / "missing.pt")


def test_describe_inputs_flattens_and_hashes_long_values() -> None:
    files = [f"image_{i:05d}.png" for i in range(40)]
    record = describe_inputs({"config": {"lr": 3e-4, "merge": "half", "schedule": {"epochs": 3}},
                              "precision": "bf16", "data": files, "gpt": None, "empty": {}})
    assert record == {"config.lr": "0.0003", "config.merge": '"half"', "config.schedule.epochs": "3",
                      "precision": '"bf16"', "data": f"<hash {fingerprint(files)}>", "gpt": "null", "empty": "{}"}


def test_changed_inputs_names_each_difference() -> None:
    old = {"config.lr": "0.0003", "precision": '"bf16"', "data": "<hash a>", "removed": "1"}
    new = {"config.lr": "0.0003", "precision": '"fp32"', "data": "<hash b>", "added": "2"}
    assert changed_inputs(old, new) == ('added: (absent) -> 2; data: <hash a> -> <hash b>; '
                                        'precision: "bf16" -> "fp32"; removed: 1 -> (absent)')
    assert changed_inputs(old, new, shown=2) == "added: (absent) -> 2; data: <hash a> -> <hash b>; and 2 more"
    assert changed_inputs(old, dict(old)) == ""


def test_a_retrain_names_the_inputs_that_changed(tmp_path: Path) -> None:
    inputs = {"config": {"lr": 0.05, "epochs": 2}, "precision": "fp32"}
    loop, _, train_epoch = _regression_loop(tmp_path, epochs=2, inputs=inputs)
    history = loop.run(train_epoch)
    assert loop.fingerprint == fingerprint(inputs), "the digest of the mapping: checkpoints keyed by it still load"
    again, _, _ = _regression_loop(tmp_path, epochs=2, inputs=fingerprint(inputs))
    assert again.finished and again.run(lambda e: pytest.fail("retrained")) == history

    with pytest.warns(UserWarning, match=r'changed: config\.lr: 0\.05 -> 0\.1; precision: "fp32" -> "bf16"\)'):
        other, _, other_epoch = _regression_loop(tmp_path, epochs=2, inputs={**inputs, "precision": "bf16",
                                                                          "config": {"lr": 0.1, "epochs": 2}})
    assert not other.finished and len(other.run(other_epoch)) == 2
    # a checkpoint written before runs recorded their inputs: only the digests can be compared
    old, _, old_epoch = _regression_loop(tmp_path / "old", epochs=1)
    old.run(old_epoch)
    with pytest.warns(UserWarning, match=f"fingerprint fp != {fingerprint(inputs)}"):
        assert not _regression_loop(tmp_path / "old", epochs=1, inputs=inputs)[0].finished


def test_min_delta_stops_a_creeping_curve_but_keeps_its_best_epoch(tmp_path: Path) -> None:
    # rises of 0.05 after epoch 2 do not count as progress at min_delta 0.1; the best epoch is still
    # the highest score, and a later real rise (epoch 6) would have reset the patience
    scores = {1: 1.0, 2: 2.0, 3: 2.05, 4: 2.1, 5: 2.15, 6: 3.0}
    loop, _, train_epoch = _regression_loop(tmp_path, epochs=6, main_metric="score", patience=2, min_delta=0.1)
    history = loop.run(train_epoch, lambda: {"score": scores[loop.epoch + 1]})
    assert [h["epoch"] for h in history] == [1, 2, 3, 4] and loop.best_epoch == 4
    plain, _, train_epoch = _regression_loop(tmp_path / "plain", epochs=6, main_metric="score", patience=2)
    assert len(plain.run(train_epoch, lambda: {"score": scores[plain.epoch + 1]})) == 6
    with pytest.raises(ValueError, match="min_delta"):
        _regression_loop(tmp_path / "bad", main_metric="score", patience=2, min_delta=-1.0)


# ------------------------------------------------------------------------- two processes (gloo)
DDP_CONFIG = CombinerConfig(
    projection_factor=2.0, hidden_factor=2.0, dropout=0.0,  # dropout masks would differ per process
    lr=1e-2, batch_size=16, epochs=3, patience=3, scale=10.0, amp=False, device="cpu",  # fp32: portable
)


def _random_data(n: int = 64, dim: int = 8) -> CombinerData:
    g = torch.Generator().manual_seed(0)
    return CombinerData(
        images=torch.randn(n, dim, generator=g),
        reference_index=torch.arange(n),
        target_index=torch.randperm(n, generator=g),
        texts=torch.randn(2 * n, dim, generator=g),
        text_index=torch.arange(2 * n).view(n, 2),
        dataset="cirr",
    )


def _val_fn(combiner: nn.Module) -> dict[str, float]:
    data = _random_data()
    rows = torch.arange(32)
    query = combiner(data.images[rows], data.texts[data.text_index[rows, 0]])
    return {"recall_mean": -batch_contrastive_loss(query, data.images[data.target_index[rows]], 10.0).item()}


def _train_on_ranks(rank: int, world: int, folder: str) -> None:
    """One process of a run: train the Combiner, record the history and who wrote checkpoints."""
    out = Path(folder)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    real_save = torch.save

    def recording_save(obj, f, *args, **kwargs):
        (out / f"saved-by-rank-{rank}").touch()
        return real_save(obj, f, *args, **kwargs)

    torch.save = recording_save
    try:
        _, history = train_combiner(_random_data(), _val_fn, DDP_CONFIG, out / "combiner.pt")
        (out / f"history-{rank}.json").write_text(json.dumps(history))
    finally:
        torch.save = real_save
        if world > 1:
            dist.destroy_process_group()


def test_two_processes_follow_the_one_process_loss_curve(tmp_path: Path) -> None:
    """Same global batch on 1 and 2 processes: the same losses and validation scores, within float
    round-off (reductions run in another order), and only rank 0 writes the checkpoint."""
    runs = {}
    for world in (1, 2):
        folder = tmp_path / f"world-{world}"
        folder.mkdir()
        mp.spawn(_train_on_ranks, args=(world, str(folder)), nprocs=world, join=True)
        runs[world] = [json.loads((folder / f"history-{r}.json").read_text()) for r in range(world)]
        assert sorted(p.name for p in folder.glob("saved-by-rank-*")) == ["saved-by-rank-0"]
        assert (folder / "combiner.pt").is_file()
    one, two = runs[1][0], runs[2][0]
    drop_time = lambda history: [{k: v for k, v in h.items() if k != "seconds"} for h in history]  # noqa: E731
    assert drop_time(runs[2][1]) == drop_time(two)  # both hold the same averaged losses and metrics
    assert [h["epoch"] for h in one] == [h["epoch"] for h in two] == [1, 2, 3]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5)
        assert b["recall_mean"] == pytest.approx(a["recall_mean"], rel=1e-4, abs=1e-5)
    assert one[-1]["loss"] < 0.95 * one[0]["loss"]  # it learns, so the curves compare something


def test_still_rising_counts_only_a_last_epoch_rise_beyond_min_delta() -> None:
    # the stage-1 histories of notebook 04: fashioniq/image gained 0.17 in its last epoch, under the
    # quarter point early stopping treats as flat; fashioniq/both gained 2.17
    image = [{"average": 17.78}, {"average": 19.94}, {"average": 22.44}, {"average": 22.61}]
    both = [{"average": 19.72}, {"average": 20.56}, {"average": 23.89}, {"average": 26.06}]
    assert still_rising(image, "average") and not still_rising(image, "average", min_delta=0.25)
    assert still_rising(both, "average", min_delta=0.25) and not still_rising(both, "average", min_delta=2.2)
    # the last epoch must beat every earlier one, not only the one before it
    dip = [{"R@1": 30.0}, {"R@1": 20.0}, {"R@1": 29.0}]
    assert not still_rising(dip, "R@1")
    assert not still_rising([{"R@1": 30.0}], "R@1") and not still_rising([], "R@1")
    with pytest.raises(ValueError, match="min_delta"):
        still_rising(both, "average", min_delta=-1.0)
    with pytest.raises(KeyError):
        still_rising(both, "R@1")
