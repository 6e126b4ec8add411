"""The command line and the training functions behind it, on tiny settings."""

import json
import math

import pytest
import torch

import gbml.training as training
from gbml.cli import main
from gbml.training import TrainConfig, mean_and_ci95

TINY = ["--dataset", "sinusoid", "--iterations", "30", "--validate-every", "10", "--validation-tasks", "20"]


def test_train_then_evaluate(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out), "--no-progress", "--test-tasks", "50"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["test"]["tasks"] == 50 and summary["test"]["metric"] == "mse"
    history = json.loads((out / "history.json").read_text())
    assert [v["iteration"] for v in history["val"]] == [10, 20, 30]
    assert len(history["train"]) == 30
    assert (out / "best.pt").exists() and (out / "last.pt").exists()
    assert not list(out.glob("*.tmp"))  # checkpoints are renamed into place
    assert main(["evaluate", "--checkpoint", str(out / "best.pt"), "--device", "cpu"]) == 0
    evaluation = json.loads(capsys.readouterr().out)
    assert evaluation["tasks"] == 600 and evaluation["split"] == "test"
    assert evaluation["ci95"] > 0 and math.isfinite(evaluation["mean"])


def test_an_interrupted_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    config = TrainConfig(dataset="sinusoid", iterations=30, validate_every=10, validation_tasks=20, seed=3)
    training.train(config, tmp_path / "straight", progress=False)

    real_meta_step, calls = training.meta_step, {"n": 0}

    def crashing_meta_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 25:  # after the checkpoint at iteration 20
            raise KeyboardInterrupt
        return real_meta_step(*args, **kwargs)

    monkeypatch.setattr(training, "meta_step", crashing_meta_step)
    with pytest.raises(KeyboardInterrupt):
        training.train(config, tmp_path / "interrupted", progress=False)
    monkeypatch.setattr(training, "meta_step", real_meta_step)
    with pytest.raises(FileExistsError, match="--resume"):
        training.train(config, tmp_path / "interrupted", progress=False)
    training.train(config, tmp_path / "interrupted", resume=True, progress=False)

    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)
    resumed = torch.load(tmp_path / "interrupted" / "last.pt", weights_only=False)
    assert resumed["iteration"] == straight["iteration"] == 30
    for name, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    assert resumed["history"]["val"] == straight["history"]["val"]

    other = TrainConfig(dataset="sinusoid", iterations=30, validate_every=10, validation_tasks=20, seed=4)
    with pytest.raises(ValueError, match="other options"):
        training.train(other, tmp_path / "interrupted", resume=True, progress=False)
    longer = TrainConfig(dataset="sinusoid", iterations=40, validate_every=10, validation_tasks=20, seed=3)
    history = training.train(longer, tmp_path / "interrupted", resume=True, progress=False)
    assert len(history["train"]) == 40 and history["val"][-1]["iteration"] == 40


def test_bad_options_and_divergence_give_clear_errors(tmp_path, capsys):
    assert main(["train", *TINY, "--iterations", "0", "--out", str(tmp_path / "a")]) == 2
    assert "iterations must be a positive integer" in capsys.readouterr().err
    assert main(["train", *TINY, "--inner-lr", "-1", "--out", str(tmp_path / "b")]) == 2
    assert "inner_lr must be a positive number" in capsys.readouterr().err
    assert main(["train", *TINY, "--inner-lr", "1e30", "--no-progress", "--out", str(tmp_path / "c")]) == 2
    assert "diverged" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    with pytest.raises(ValueError, match="algorithm must be one of"):
        TrainConfig(algorithm="anil")


@pytest.mark.parametrize("algorithm", ["fomaml", "reptile", "imaml"])
def test_every_algorithm_trains(algorithm, tmp_path):
    config = TrainConfig(
        algorithm=algorithm, dataset="sinusoid", iterations=4, validate_every=2, validation_tasks=5, lam=50.0
    )
    history = training.train(config, tmp_path / algorithm, progress=False)
    assert len(history["val"]) == 2 and all(math.isfinite(v["mean"]) for v in history["val"])


def test_omniglot_training_on_tiny_settings(tmp_path, monkeypatch, capsys):
    from test_omniglot import real_data_dir

    monkeypatch.setenv("GBML_DATA_DIR", str(real_data_dir()))
    monkeypatch.setenv("GBML_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "omniglot"
    options = ["--dataset", "omniglot", "--ways", "3", "--shots", "1", "--queries", "2", "--meta-batch", "2"]
    options += ["--inner-lr", "0.4", "--iterations", "2", "--validate-every", "2", "--validation-tasks", "3"]
    assert (
        main(["train", *options, "--out", str(out), "--no-progress", "--test-tasks", "4", "--device", "cpu"])
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["test"]["metric"] == "accuracy" and summary["test"]["tasks"] == 4
    assert 0.0 <= summary["test"]["mean"] <= 1.0


def test_missing_omniglot_data_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GBML_DATA_DIR", str(tmp_path / "nothing-here"))
    monkeypatch.setenv("GBML_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr("gbml.omniglot.URL_BASE", (tmp_path / "no-network").as_uri() + "/")
    options = ["--dataset", "omniglot", "--iterations", "1", "--no-progress", "--out", str(tmp_path / "run")]
    assert main(["train", *options]) == 2
    message = capsys.readouterr().err
    assert "images_background.zip" in message and "GBML_DATA_DIR" in message


def test_imaml_options_reach_the_algorithm():
    algorithm = TrainConfig(algorithm="imaml", lam=3.0, cg_steps=7, cg_tol=1e-4, damping=0.5).make_algorithm()
    assert (algorithm.lam, algorithm.cg_steps, algorithm.cg_tol, algorithm.damping) == (3.0, 7, 1e-4, 0.5)
    with pytest.raises(ValueError, match="damping must be non-negative"):
        TrainConfig(algorithm="imaml", damping=-1.0)


def test_confidence_interval():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mean, ci = mean_and_ci95(values)
    sample_std = (sum((v - 2.5) ** 2 for v in (1.0, 2.0, 3.0, 4.0)) / 3) ** 0.5
    assert mean == 2.5 and ci == pytest.approx(1.96 * sample_std / 2)
