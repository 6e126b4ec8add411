"""The MAML 20-way plateau pilot (tools/pilot_maml_20w1s_plateau.py), whose measurements chapter 8
prints and asserts: its snapshots load with the public loader, and its averages of checkpoints are
checked against evaluations and means computed here, on a tiny run of the shipped miniature."""

import itertools

import pytest
import torch

from gbml import training
from gbml.cli import main
from test_book_pages import load_tool

TINY_OMNIGLOT = ["--dataset", "omniglot-mini", "--ways", "3", "--shots", "1", "--queries", "2"]
TINY_OMNIGLOT += ["--meta-batch", "2", "--inner-lr", "0.4"]
TINY_OMNIGLOT += ["--validate-every", "5", "--validation-tasks", "3"]
QUIET = ["--no-progress", "--test-tasks", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def pilot():
    return load_tool("pilot_maml_20w1s_plateau")


@pytest.fixture
def snapshots(pilot, tmp_path, monkeypatch):
    """A run's checkpoints at 5, 10 and 15 meta-iterations, taken as the pilot takes them."""
    monkeypatch.setenv("GBML_CACHE_DIR", str(tmp_path / "cache"))
    run, folder = tmp_path / "run", tmp_path / "snapshots"
    folder.mkdir()
    paths = []
    for iterations in (5, 10, 15):
        if iterations == 5:
            assert main(["train", *TINY_OMNIGLOT, "--iterations", "5", "--out", str(run), *QUIET]) == 0
        else:
            assert main(["train", "--resume", str(run), "--iterations", str(iterations), *QUIET]) == 0
        paths.append(pilot.strip_to_snapshot(run / "last.pt", folder))
    return paths


def scored(path, split, tasks, model_state=None):
    config, problem, phi = training.load_checkpoint(path, "cpu")
    if model_state is not None:
        problem.model.load_state_dict(model_state)
    return training.evaluate(config, phi, problem, split=split, num_tasks=tasks, per_task=True)


def test_snapshots_are_stripped_checkpoints_named_by_their_meta_iteration(snapshots):
    assert [path.name for path in snapshots] == ["5.pt", "10.pt", "15.pt"]
    for path in snapshots:
        assert set(torch.load(path, weights_only=True)) == {"config", "iteration", "model"}  # no optimiser


def test_a_window_average_is_the_mean_of_its_checkpoints_scored_on_the_same_tasks(pilot, snapshots):
    tasks = 12
    measured = pilot.measure_average(list(reversed(snapshots)), tasks)  # in any order
    each = [scored(path, "val", tasks) for path in snapshots]
    checkpoints = measured["val"]["checkpoints"]
    assert [c["iteration"] for c in checkpoints] == [5, 10, 15]
    assert [c["mean"] for c in checkpoints] == pytest.approx([100 * s["mean"] for s in each], abs=0.01)
    changes = [abs(b["mean"] - a["mean"]) for a, b in itertools.pairwise(each)]
    largest = measured["val"]["largest_change_between_consecutive"]
    assert largest == pytest.approx(100 * max(changes), abs=0.01)
    # the mean of the three models' tensors, written out here, scored on the same tasks
    states = [torch.load(path, weights_only=True)["model"] for path in snapshots]
    mean_state = {name: (states[0][name] + states[1][name] + states[2][name]) / 3 for name in states[0]}
    average = scored(snapshots[0], "val", tasks, mean_state)
    assert measured["val"]["average"]["mean"] == pytest.approx(100 * average["mean"], abs=0.01)
    differences = torch.tensor(average["per_task"]) - torch.tensor(each[-1]["per_task"])
    assert measured["val"]["average_minus_latest"]["mean"] == pytest.approx(
        100 * differences.mean().item(), abs=0.01
    )
    best = max(each, key=lambda s: s["mean"])
    to_best = torch.tensor(average["per_task"]) - torch.tensor(best["per_task"])
    assert measured["val"]["average_minus_best"]["mean"] == pytest.approx(
        100 * to_best.mean().item(), abs=0.01
    )
    latest_test = scored(snapshots[-1], "test", tasks)
    average_test = scored(snapshots[0], "test", tasks, mean_state)
    assert measured["test"]["latest"]["mean"] == pytest.approx(100 * latest_test["mean"], abs=0.01)
    assert measured["test"]["average"]["mean"] == pytest.approx(100 * average_test["mean"], abs=0.01)


def test_a_window_needs_distinct_checkpoints_of_one_run(pilot, snapshots, tmp_path):
    with pytest.raises(ValueError, match="distinct meta-iterations"):
        pilot.measure_average([snapshots[0], snapshots[0]], 3)
    other = torch.load(snapshots[1], weights_only=True)
    other["config"]["ways"] = 4
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="one run"):
        pilot.measure_average([snapshots[0], tmp_path / "other.pt"], 3)
