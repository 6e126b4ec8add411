"""Scale-out: split the meta-batch across processes and average the meta-gradient.

Each process computes Δ_t for its own share of the tasks; one all-reduce sums
T_local · mean_local(Δ) over processes and divides by the global T, exactly as data-parallel
training averages gradients (DDP). Launch with ``torchrun --nproc_per_node=N script.py`` and
call ``gbml.meta_step(..., distributed=True)`` with each process's shard (see :func:`shard`).

Every process must take part in every collective, so errors are agreed on collectively: a NaN
on one process raises :class:`~gbml.errors.DivergenceError` on all of them, and iMAML's
convergence check sees the diagnostics of the whole meta-batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from gbml.errors import non_finite_entries
from gbml.params import Params
from gbml.tasks import Task


def _world() -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "distributed=True needs an initialised torch.distributed process group: launch with "
            "torchrun and call torch.distributed.init_process_group() first"
        )
    return dist.get_rank(), dist.get_world_size()


def shard(tasks: Task, rank: int | None = None, world_size: int | None = None) -> Task:
    """This process's contiguous share of a meta-batch (all processes get equally many tasks)."""
    if rank is None or world_size is None:
        rank, world_size = _world()
    if tasks.num_tasks % world_size:
        raise ValueError(
            f"a meta-batch of {tasks.num_tasks} tasks does not split evenly over {world_size} processes"
        )
    per_rank = tasks.num_tasks // world_size
    return Task(*(t[rank * per_rank : (rank + 1) * per_rank] for t in tasks))


def mean_over_processes(deltas: Params, info: dict[str, Tensor]) -> tuple[Params, dict[str, Tensor], Tensor]:
    """The mean Δ over the union of every process's tasks (equal shares), from this process's
    per-task ``deltas`` (leading task axis); the diagnostics of the whole meta-batch, in rank
    order; and the number of non-finite entries over all processes (a 0-d tensor).

    What :func:`gbml.meta_gradient` does with ``distributed=True``: one all-reduce carries the
    sums of Δ and the count of non-finite values, flattened together.
    """
    _, world_size = _world()
    names = list(deltas)
    local_tasks = deltas[names[0]].shape[0]
    sums = [deltas[name].sum(dim=0).reshape(-1) for name in names]
    bad = non_finite_entries(deltas, info).to(sums[0].dtype).reshape(1)
    packed = torch.cat([*sums, bad])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    gathered = {key: _all_gather(value, world_size) for key, value in info.items()}
    total_tasks = local_tasks * world_size
    mean, start = {}, 0
    for name in names:
        shape = deltas[name].shape[1:]
        size = deltas[name][0].numel()
        mean[name] = (packed[start : start + size] / total_tasks).reshape(shape)
        start += size
    return mean, gathered, packed[-1]


def _all_gather(value: Tensor, world_size: int) -> Tensor:
    parts = [torch.empty_like(value) for _ in range(world_size)]
    dist.all_gather(parts, value.contiguous())
    return torch.cat(parts)
