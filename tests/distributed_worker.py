"""Run by tests/test_distributed.py under torchrun: each process takes its share of a meta-batch,
takes one distributed meta-step per algorithm, and rank 0 saves the results."""

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

import gbml
from gbml.distributed import shard

ALGORITHMS = {
    "maml": gbml.MAML(inner_lr=0.1, inner_steps=2),
    "fomaml": gbml.FOMAML(inner_lr=0.1, inner_steps=2),
    "reptile": gbml.Reptile(inner_lr=0.1, inner_steps=2),
    "imaml": gbml.IMAML(inner_lr=0.01, lam=200.0, inner_steps=3, cg_steps=25, cg_tol=1e-8),
}


def make_problem():
    """The same model and meta-batch in every process (and in the single-process test)."""
    torch.manual_seed(0)
    model = gbml.ConvNet(ways=3, hidden=8).double()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 6 + 9, 1, 28, 28, generator=g, dtype=torch.float64)
    labels = torch.arange(15).remainder(3).expand(4, 15).clone()
    tasks = gbml.Task(images[:, :6], labels[:, :6], images[:, 6:], labels[:, 6:])
    return model, tasks


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    results = {}
    for name, algorithm in ALGORITHMS.items():
        model, tasks = make_problem()
        params = gbml.parameters_of(model)
        optimizer = torch.optim.SGD(params.values(), lr=0.5)
        result = gbml.meta_step(
            algorithm,
            gbml.make_loss(model, F.cross_entropy),
            params,
            shard(tasks),
            optimizer,
            distributed=True,
        )
        results[name] = {
            "meta_gradient": result.meta_gradient,
            "params": {k: v.detach().clone() for k, v in params.items()},
            "query_loss": result.info["query_loss"],
        }
    # A NaN in one process's share must raise in every process, not hang the others.
    model, tasks = make_problem()
    if dist.get_rank() == 1:
        tasks.x_query[3, 0, 0, 0, 0] = float("nan")  # one pixel of a task in rank 1's share
    params = gbml.parameters_of(model)
    try:
        gbml.meta_step(
            ALGORITHMS["fomaml"],
            gbml.make_loss(model, F.cross_entropy),
            params,
            shard(tasks),
            torch.optim.SGD(params.values(), lr=0.5),
            distributed=True,
        )
        results["nan_raised"] = False
    except gbml.DivergenceError:
        results["nan_raised"] = True
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results["nan_raised"])
    if dist.get_rank() == 0:
        results["nan_raised_everywhere"] = all(gathered)
        torch.save(results, out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
