"""Two processes (torchrun, gloo backend, CPU) give the single-process meta-step."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gbml
from distributed_worker import ALGORITHMS, make_problem
from gbml.distributed import shard
from reference import relative_error

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed") / "results.pt"
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", "--nnodes=1", "--nproc_per_node=2",
        str(HERE / "distributed_worker.py"), str(out),
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=HERE)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_two_processes_equal_one(name, two_process_results):
    model, tasks = make_problem()
    params = gbml.parameters_of(model)
    single = gbml.meta_step(
        ALGORITHMS[name],
        gbml.make_loss(model, F.cross_entropy),
        params,
        tasks,
        torch.optim.SGD(params.values(), lr=0.5),
        batched=False,
    )
    got = two_process_results[name]
    assert relative_error(got["meta_gradient"], single.meta_gradient) < 1e-10
    assert relative_error(got["params"], {k: v.detach() for k, v in params.items()}) < 1e-12
    assert torch.allclose(got["query_loss"], single.info["query_loss"], rtol=1e-12)


def test_a_nan_on_one_process_raises_on_all(two_process_results):
    assert two_process_results["nan_raised_everywhere"]


def test_shard_and_errors():
    _, tasks = make_problem()
    parts = [shard(tasks, rank, 2) for rank in range(2)]
    assert all(p.num_tasks == 2 for p in parts)
    assert torch.equal(torch.cat([p.x_support for p in parts]), tasks.x_support)
    with pytest.raises(ValueError, match="does not split evenly over 3 processes"):
        shard(tasks, 0, 3)
    model, _ = make_problem()
    params = gbml.parameters_of(model)
    with pytest.raises(RuntimeError, match=r"initialised torch\.distributed process group"):
        gbml.meta_step(
            gbml.MAML(0.1),
            gbml.make_loss(model, F.cross_entropy),
            params,
            tasks,
            torch.optim.SGD(params.values(), lr=0.1),
            distributed=True,
        )
