"""Data-parallel training across the processes ``torchrun`` starts, in a few small helpers.

Every helper also works in a plain single process (no ``torch.distributed`` group, or a group of
one): it is then rank 0 of a world of one and the collectives are identities, so training code
calls them unconditionally and runs unchanged in a notebook. A script launched with
``torchrun --nproc_per_node=N`` calls :func:`init` first; each process then trains on its share of
every batch (:func:`shard`), gradients are averaged by ``DistributedDataParallel`` (:func:`wrap`),
and only rank 0 writes checkpoints and caches and shows progress bars (:func:`is_main`).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

T = TypeVar("T")


def active() -> bool:
    """True when several processes train together (an initialised group of more than one)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process writes files and shows progress (rank 0)."""
    return rank() == 0


def init(backend: str | None = None) -> None:
    """Join the process group ``torchrun`` describes in the environment; nothing outside torchrun.

    NCCL with one GPU per process (``LOCAL_RANK``) where CUDA is present, gloo on CPUs.
    """
    if dist.is_initialized() or "WORLD_SIZE" not in os.environ:
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend or ("nccl" if cuda else "gloo"))


def barrier() -> None:
    if active():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the body first (and writes the caches it fills), the others after it (and read them)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def wrap(module: nn.Module) -> nn.Module:
    """``module`` in ``DistributedDataParallel`` when several processes train, else ``module`` itself.

    Gradients are only averaged for what runs through the wrapper's ``forward``; the wrapped
    module's weights stay the ones to save (``wrap(m).module is m``).
    """
    if not active():
        return module
    device = next(module.parameters()).device
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def shard(rows: Tensor) -> Tensor:
    """This process's contiguous, equal share of a batch that every process drew identically.

    With a batch size that is not a multiple of the world size the last ``len % world`` rows are
    dropped, so every process gathers equally many rows (:func:`gather`).
    """
    n = len(rows) // world_size()
    return rows[rank() * n : (rank() + 1) * n]


def local_rows(n_local: int) -> slice:
    """Where this process's ``n_local`` rows sit in a :func:`gather` ed batch."""
    return slice(rank() * n_local, (rank() + 1) * n_local)


class _Gather(torch.autograd.Function):
    """All-gather whose backward hands each process the summed gradient of its own rows."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every process's loss depends on every process's rows
        return grad[local_rows(len(grad) // world_size())]


def gather(x: Tensor) -> Tensor:
    """Every process's ``x`` concatenated in rank order, with gradients flowing back to each owner.

    Contrastive losses need the whole batch as negatives: a process scores its own rows against
    the gathered batch, and the backward pass returns each process the gradient of its rows.
    """
    if not active():
        return x
    return _Gather.apply(x)


def _collective_device() -> torch.device:
    """Where small collective tensors live: NCCL only moves CUDA tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def mean(value: float) -> float:
    """``value`` averaged over the processes (a loss each computed on its share)."""
    if not active():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return float(t.item()) / world_size()


def any_rank(flag: bool) -> bool:
    """True on every process when ``flag`` is true on any: decisions that must not diverge."""
    if not active():
        return bool(flag)
    t = torch.tensor([int(bool(flag))], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every process (picklable objects: metrics, a loaded checkpoint)."""
    if not active():
        return obj
    box: list[Any] = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
