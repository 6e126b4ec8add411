"""Chapter 8's retraining path (``-p train True``) at smoke size, and the committed Omniglot runs.

nbval executes the chapter in its default mode (meta-testing the committed runs); this file
runs the other mode, which retrains from scratch with the protocols of ``gbml.protocols``, and
checks that every committed run under results/omniglot is what the chapter says it is.
"""

import json
import math
from dataclasses import asdict
from pathlib import Path

import nbformat
import papermill
import pytest
import torch

from gbml.protocols import OMNIGLOT_RUNS, PUBLISHED, TARGETS
from gbml.training import evaluate, load_checkpoint
from test_omniglot import real_data_dir

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = sorted(p.parent for p in (ROOT / "results" / "omniglot").glob("*/run.json"))


def needs_omniglot():
    if not (real_data_dir() / "omniglot" / "images_background.zip").is_file():
        pytest.skip("the Omniglot zips are not here (set GBML_DATA_DIR); see gbml.load_omniglot")


def test_chapter_8_retrains_a_run_at_smoke_size(tmp_path, monkeypatch):
    needs_omniglot()
    monkeypatch.setenv("SMOKE_TEST", "1")
    out = tmp_path / "08.ipynb"
    papermill.execute_notebook(
        str(ROOT / "book" / "08_omniglot.ipynb"),
        str(out),
        parameters={"train": True, "runs": "fomaml-5w1s", "run_dir": str(tmp_path / "runs")},
        cwd=str(ROOT / "book"),
        kernel_name="python3",
        progress_bar=False,
    )
    summary = json.loads((tmp_path / "runs-smoke" / "fomaml-5w1s" / "run.json").read_text())
    assert summary["iterations"] == 4 and summary["config"]["algorithm"] == "fomaml"
    text = "\n".join(
        "".join(o.get("text", ""))
        for cell in nbformat.read(out, as_version=4).cells
        for o in cell.get("outputs", [])
    )
    assert "retraining: fomaml-5w1s" in text
    assert "every run re-evaluates to the accuracies recorded in its run.json: True" in text


def test_there_are_committed_runs_and_each_follows_its_protocol():
    assert COMMITTED, "no committed run under results/omniglot"
    for folder in COMMITTED:
        summary = json.loads((folder / "run.json").read_text())
        protocol = asdict(OMNIGLOT_RUNS[folder.name])
        assert summary["config"] == protocol, folder.name  # the registry describes what ran
        assert summary["tasks_seen"] == summary["iterations"] * protocol["meta_batch"]
        assert summary["sessions"] and summary["sessions"][-1]["to_iteration"] == summary["iterations"]
        assert summary["test"]["tasks"] == 600 and len(summary["test"]["per_task"]) == 600
        assert folder.name in PUBLISHED
        final = torch.load(folder / "final.pt", weights_only=True)
        assert final["iteration"] == summary["iterations"] and set(final) == {"config", "iteration", "model"}


@pytest.mark.parametrize("folder", COMMITTED[:2], ids=lambda p: p.name)
def test_a_committed_run_reloads_and_re_evaluates_to_its_recorded_accuracy(folder):
    """The public loader gives back meta-parameters that score the first 50 of the 600 recorded
    test tasks as recorded (two flipped query predictions allowed, for other processors)."""
    needs_omniglot()
    summary = json.loads((folder / "run.json").read_text())
    config, problem, phi = load_checkpoint(folder / "final.pt", "cpu")
    again = evaluate(config, phi, problem, num_tasks=50, per_task=True)
    recorded = summary["test"]["per_task"][:50]
    flips = sum(abs(a - b) for a, b in zip(again["per_task"], recorded)) * config.ways * config.queries
    assert flips <= 2 + 1e-6
    mean = sum(summary["test"]["per_task"]) / 600
    assert math.isclose(mean, summary["test"]["mean"], rel_tol=1e-12)


def test_targets_name_published_runs():
    assert set(TARGETS) <= set(PUBLISHED)
    for name, target in TARGETS.items():
        assert target < PUBLISHED[name][0]
