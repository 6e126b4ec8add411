"""The command line and the training functions behind it, on tiny settings."""

import json
import math
from dataclasses import replace

import pytest
import torch

import gbml
import gbml.training as training
from gbml.cli import main
from gbml.training import TrainConfig, mean_and_ci95
from reference import adapted_params, relative_error

TINY = ["--dataset", "sinusoid", "--iterations", "30", "--validate-every", "10", "--validation-tasks", "20"]


def test_train_then_evaluate(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out), "--no-progress", "--test-tasks", "50"]) == 0
    printed = capsys.readouterr()
    summary = json.loads(printed.out)
    assert summary["test"]["tasks"] == 50 and summary["test"]["metric"] == "mse"
    # Without a progress bar, each validation says how far the run got (on stderr: stdout is JSON).
    lines = [line for line in printed.err.splitlines() if "meta-iteration" in line]
    assert [line.split("meta-iteration ")[1].split(",")[0] for line in lines] == [
        f"{n} of 30" for n in (10, 20, 30)
    ]
    assert all("validation mse" in line and line.endswith("last.pt written") for line in lines)
    history = json.loads((out / "history.json").read_text())
    assert [v["iteration"] for v in history["val"]] == [10, 20, 30]
    assert len(history["train"]) == 30
    assert (out / "best.pt").exists() and (out / "last.pt").exists()
    assert not list(out.glob("*.tmp"))  # checkpoints are renamed into place
    assert main(["evaluate", "--checkpoint", str(out / "best.pt"), "--device", "cpu"]) == 0
    evaluation = json.loads(capsys.readouterr().out)
    assert evaluation["tasks"] == 600 and evaluation["split"] == "test"
    assert evaluation["ci95"] > 0 and math.isfinite(evaluation["mean"])


def killed_at(monkeypatch, iteration, run, step="meta_step"):
    """Run ``run()`` with training killed (KeyboardInterrupt) at meta-iteration ``iteration``
    (counted in calls of ``gbml.training``'s function ``step``)."""
    real_meta_step, calls = getattr(training, step), {"n": 0}

    def crashing_meta_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == iteration:
            raise KeyboardInterrupt
        return real_meta_step(*args, **kwargs)

    monkeypatch.setattr(training, step, crashing_meta_step)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(training, step, real_meta_step)


def test_an_interrupted_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    config = TrainConfig(dataset="sinusoid", iterations=30, validate_every=10, validation_tasks=20, seed=3)
    training.train(config, tmp_path / "straight", progress=False)

    # killed after the checkpoint at iteration 20
    killed_at(monkeypatch, 25, lambda: training.train(config, tmp_path / "interrupted", progress=False))
    with pytest.raises(FileExistsError, match="--resume"):
        training.train(config, tmp_path / "interrupted", progress=False)
    training.train(config, tmp_path / "interrupted", resume=True, progress=False)

    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)
    resumed = torch.load(tmp_path / "interrupted" / "last.pt", weights_only=False)
    assert resumed["iteration"] == straight["iteration"] == 30
    for name, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][name]), name

    def without_times(entries):  # wall times differ between runs; everything else must not
        return [{k: v for k, v in entry.items() if k != "elapsed_s"} for entry in entries]

    assert without_times(resumed["history"]["val"]) == without_times(straight["history"]["val"])
    sessions = resumed["history"]["sessions"]
    assert [(s["from_iteration"], s["to_iteration"]) for s in sessions] == [(0, 20), (20, 30)]
    assert all(s["machine"].startswith("CPU") and s["torch"] == str(torch.__version__) for s in sessions)
    elapsed = [v["elapsed_s"] for v in resumed["history"]["val"]]
    assert elapsed == sorted(elapsed) and elapsed[-1] >= sum(s["elapsed_s"] for s in sessions) - 0.2

    other = TrainConfig(dataset="sinusoid", iterations=30, validate_every=10, validation_tasks=20, seed=4)
    with pytest.raises(ValueError, match="other options"):
        training.train(other, tmp_path / "interrupted", resume=True, progress=False)
    longer = TrainConfig(
        dataset="sinusoid", iterations=40, validate_every=10, validation_tasks=20, seed=3, batched="false"
    )  # longer, and along the per-task loop instead of vmap: both may change on resume
    history = training.train(longer, tmp_path / "interrupted", resume=True, progress=False)
    assert len(history["train"]) == 40 and history["val"][-1]["iteration"] == 40
    assert [s["batched"] for s in history["sessions"]] == ["auto", "auto", "false"]


def test_a_time_limit_ends_the_session_at_the_last_checkpoint_that_fits(tmp_path, monkeypatch, capsys):
    # A clock that advances one second per meta-step: each 10-iteration period takes 10 s.
    clock, real_meta_step = {"now": 0.0}, training.meta_step

    def one_second_meta_step(*args, **kwargs):
        clock["now"] += 1.0
        return real_meta_step(*args, **kwargs)

    monkeypatch.setattr(training, "meta_step", one_second_meta_step)
    monkeypatch.setattr(training.time, "perf_counter", lambda: clock["now"])
    out = str(tmp_path / "run")
    # After 20 s a third period would end at 30 s, past the limit of 25 s: stop at iteration 20.
    quiet = ["--no-progress", "--test-tasks", "0", "--time-limit", "25"]
    assert main(["train", *TINY, "--out", out, *quiet]) == 0
    assert "stopped at meta-iteration 20" in capsys.readouterr().err
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert state["iteration"] == 20 and len(state["history"]["train"]) == 20
    assert main(["train", "--resume", out, *quiet]) == 0
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [(s["from_iteration"], s["to_iteration"]) for s in history["sessions"]] == [(0, 20), (20, 30)]
    assert main(["train", *TINY, "--out", str(tmp_path / "other"), "--time-limit", "0"]) == 2
    assert "time_limit_s must be positive" in capsys.readouterr().err


def test_a_checkpoint_older_than_an_option_resumes_only_at_that_options_default(tmp_path, monkeypatch):
    """A checkpoint written before an option existed was trained with the option's default; resuming
    it with another value would silently change the run mid-way, so it must be refused."""
    monkeypatch.setenv("GBML_CACHE_DIR", str(tmp_path / "cache"))
    config = TrainConfig(
        algorithm="fomaml",
        dataset="omniglot-mini",
        ways=3,
        iterations=2,
        validate_every=2,
        validation_tasks=3,
    )
    training.train(config, tmp_path, progress=False)
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    del state["config"]["inner_state"], state["config"]["fast_weights"]  # as written before they existed
    torch.save(state, tmp_path / "last.pt")

    assert training.defining_differences(state["config"], config) == {}
    changed = replace(config, iterations=4, inner_lr=2 * config.inner_lr, fast_weights="no_batch_norm")
    assert training.defining_differences(state["config"], changed) == {
        "inner_lr": (config.inner_lr, 2 * config.inner_lr),
        "fast_weights": ("all", "no_batch_norm"),
    }
    for refused in (replace(config, fast_weights="no_batch_norm"), replace(config, seed=config.seed + 1)):
        with pytest.raises(ValueError, match="other options"):
            training.train(refused, tmp_path, resume=True, progress=False)
        with pytest.raises(ValueError, match="other options"):
            training.resumed_config(tmp_path, {"fast_weights": refused.fast_weights, "seed": refused.seed})
    with pytest.raises(ValueError, match="no such fields"):
        training.resumed_config(tmp_path, {"fast_wieghts": "all"})
    assert training.resumed_config(tmp_path, {"iterations": 4, "fast_weights": "all"}).iterations == 4
    history = training.train(replace(config, iterations=4), tmp_path, resume=True, progress=False)
    assert history["val"][-1]["iteration"] == 4


def test_training_and_evaluation_run_without_tf32_and_restore_the_settings(tmp_path, monkeypatch):
    """On a GPU, TF32 would round float32 products to 10-bit mantissas (PyTorch allows it for
    cuDNN convolutions by default): train and evaluate turn it off for their duration, say so in
    the run's record, and leave the caller's settings as they were."""
    from gbml.notebook import exact_float32, tf32_enabled

    monkeypatch.setenv("GBML_CACHE_DIR", str(tmp_path / "cache"))
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    seen = []
    real_evaluate_tasks = training.evaluate_tasks

    def spy(*args, **kwargs):
        seen.append(tf32_enabled())
        return real_evaluate_tasks(*args, **kwargs)

    monkeypatch.setattr(training, "evaluate_tasks", spy)
    config = TrainConfig(algorithm="maml", dataset="omniglot-mini", ways=3, iterations=2, validate_every=2)
    try:
        history = training.train(config, tmp_path, progress=False)
        assert history["sessions"][-1]["tf32"] is False and seen and not any(seen)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32 and tf32_enabled()
        with exact_float32():
            assert not tf32_enabled()
        assert tf32_enabled()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_an_annealed_run_cannot_be_resumed_at_another_length(tmp_path, monkeypatch):
    """With the outer step annealed over the run (outer_lr_final), the length sets every step's
    size: resuming at another length would change the step mid-way, so it is refused; a run whose
    step is constant may be made longer."""
    monkeypatch.setenv("GBML_CACHE_DIR", str(tmp_path / "cache"))
    config = TrainConfig(
        algorithm="reptile",
        dataset="omniglot-mini",
        ways=3,
        iterations=2,
        outer_optimizer="sgd",
        outer_lr=1.0,
        outer_lr_final=0.0,
        validate_every=2,
        validation_tasks=3,
    )
    training.train(config, tmp_path, progress=False)
    assert config.outer_lr_at(1) != replace(config, iterations=4).outer_lr_at(1)  # why it matters
    assert training.defining_differences(config, replace(config, iterations=4)) == {"iterations": (2, 4)}
    assert training.defining_differences(config, replace(config, device="cpu", batched=False)) == {}
    with pytest.raises(ValueError, match="other options"):
        training.resumed_config(tmp_path, {"iterations": 4})
    with pytest.raises(ValueError, match="other options"):
        training.train(replace(config, iterations=4), tmp_path, resume=True, progress=False)
    constant = replace(config, outer_lr_final=None)
    assert training.defining_differences(constant, replace(constant, iterations=4)) == {}


def test_reptile_meta_trains_one_and_five_shot_alike_and_exports_the_training_as_both(tmp_path, monkeypatch):
    """Nichol et al. meta-train 5-way 1-shot and 5-shot Reptile alike (10 drawings per class, all
    trained on); only meta-testing differs. Trained separately (tiny, on the miniature), the two
    protocols give the same φ and inner state bit for bit, so one run's training can be exported
    as the other, and is meta-tested there as a run of that setting would be."""
    from gbml.protocols import OMNIGLOT_RUNS, smoke_version

    monkeypatch.setenv("GBML_CACHE_DIR", str(tmp_path / "cache"))

    def tiny(name):
        config = smoke_version(OMNIGLOT_RUNS[name], iterations=4)
        return replace(config, dataset="omniglot-mini", device="cpu", meta_batch=3)

    one, five = tiny("reptile-5w1s"), tiny("reptile-5w5s")
    assert set(training.defining_differences(one, five)) == {"shots", "queries", "eval_inner_batch"}
    assert training.training_differences(one, five) == {}
    for config in (one, five):
        training.train(config, tmp_path / f"{config.shots}-shot", progress=False)
    trained = [torch.load(tmp_path / f"{k}-shot" / "last.pt", weights_only=True) for k in (1, 5)]
    for name, value in trained[0]["model"].items():
        assert torch.equal(value, trained[1]["model"][name]), name
    for moment in ("m", "v"):
        for name, value in trained[0]["inner_state"][moment].items():
            assert torch.equal(value, trained[1]["inner_state"][moment][name]), name
    assert trained[0]["history"]["val"] != trained[1]["history"]["val"]  # validated on their settings

    training.export_run(tmp_path / "1-shot", test_tasks=0)
    shared = training.export_shared_training(tmp_path / "1-shot", five, tmp_path / "as-5-shot", test_tasks=10)
    assert shared["trained_by"] == "1-shot" and shared["val"] == [] and shared["iterations"] == 4
    assert shared["command"] is None  # (the command line passes the one that writes it)
    # Meta-tested as the run trained with the 5-shot protocol is.
    _, problem, phi = training.load_checkpoint(tmp_path / "5-shot" / "last.pt", "cpu")
    separately = training.evaluate(five, phi, problem, num_tasks=10, per_task=True)
    assert shared["test"]["per_task"] == separately["per_task"]
    assert json.loads((tmp_path / "as-5-shot" / "run.json").read_text())["test"] == shared["test"]

    # What trains differently is refused, with the differing options named.
    maml = replace(
        one,
        algorithm="maml",
        inner_batch=None,
        inner_optimizer="sgd",
        inner_state="fresh",
        outer_lr_final=None,
    )
    assert set(training.training_differences(maml, replace(maml, shots=5, queries=5))) == {"shots", "queries"}
    assert set(training.training_differences(one, replace(five, queries=3))) == {"shots", "queries"}
    assert set(training.training_differences(one, replace(one, iterations=8))) == {
        "iterations"
    }  # ε's schedule
    assert training.training_differences(maml, replace(maml, iterations=8, test_queries=3)) == {}
    with pytest.raises(ValueError, match=r"meta-trained differently.*'seed'"):
        training.export_shared_training(tmp_path / "1-shot", replace(five, seed=1), tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="export the run first"):
        training.export_shared_training(tmp_path / "5-shot", one, tmp_path / "x")
    # An export overwrites neither the run it exports nor another run.
    for taken in ("1-shot", "5-shot"):  # an exported run; a run with a checkpoint
        with pytest.raises(FileExistsError, match="holds a run of its own"):
            training.export_shared_training(tmp_path / "1-shot", five, tmp_path / taken, test_tasks=0)
    again = training.export_shared_training(tmp_path / "1-shot", five, tmp_path / "as-5-shot", test_tasks=0)
    assert again["trained_by"] == "1-shot"  # a re-export replaces an earlier export of the same run

    # The command line writes it and records the command that does (a protocol registered for it).
    monkeypatch.setitem(OMNIGLOT_RUNS, "tiny-5w5s", five)
    out = str(tmp_path / "cli-5-shot")
    argv = f"export {tmp_path / '1-shot'} --as tiny-5w5s --out {out} --test-tasks 10 --device cpu".split()
    assert main(argv) == 0
    written = json.loads((tmp_path / "cli-5-shot" / "run.json").read_text())
    assert written["command"] == "python -m gbml " + " ".join(argv)
    assert written["test"]["per_task"] == separately["per_task"] and written["trained_by"] == "1-shot"
    assert (
        main(["export", str(tmp_path / "1-shot"), "--as", "tiny-5w5s", "--out", str(tmp_path / "1-shot")])
        == 2
    )
    assert main(["export", str(tmp_path / "1-shot"), "--as", "reptile-5w5s", "--out", out]) == 2
    assert main(["export", str(tmp_path / "1-shot"), "--as", "reptile-5w9s", "--out", out]) == 2
    assert main(["export", str(tmp_path / "1-shot"), "--out", out]) == 2


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


@pytest.mark.parametrize("dataset", ["omniglot-mini", "omniglot"])
def test_omniglot_training_on_tiny_settings(dataset, tmp_path, monkeypatch, capsys):
    """Offline on the miniature shipped with gbml; on the full data set where it is found."""
    from test_omniglot import full_data_or_skip

    if dataset == "omniglot":
        monkeypatch.setenv("GBML_DATA_DIR", str(full_data_or_skip()))
    monkeypatch.setenv("GBML_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "omniglot"
    options = ["--dataset", dataset, "--ways", "3", "--shots", "1", "--queries", "2", "--meta-batch", "2"]
    options += ["--inner-lr", "0.4", "--iterations", "2", "--validate-every", "2", "--validation-tasks", "3"]
    assert (
        main(["train", *options, "--out", str(out), "--no-progress", "--test-tasks", "4", "--device", "cpu"])
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["test"]["metric"] == "accuracy" and summary["test"]["tasks"] == 4
    assert 0.0 <= summary["test"]["mean"] <= 1.0
    config, problem, _ = training.load_checkpoint(out / "last.pt", "cpu")
    characters = {split: len(family.characters) for split, family in problem.tasks.items()}
    full = dataset == "omniglot"
    assert config.dataset == dataset
    assert characters == (
        {"train": 1100, "val": 100, "test": 423} if full else {"train": 34, "val": 3, "test": 13}
    )


def test_a_carried_inner_state_is_checkpointed_resumed_and_evaluated_from(tmp_path, monkeypatch):
    """Nichol et al.'s protocol at tiny size on the miniature: the carried Adam state goes into
    last.pt and final.pt, a killed run resumes to the same φ and state, and evaluation adapts
    from the state (not from fresh moments)."""
    from gbml.protocols import OMNIGLOT_RUNS, smoke_version

    monkeypatch.setenv("GBML_CACHE_DIR", str(tmp_path / "cache"))
    config = replace(
        smoke_version(OMNIGLOT_RUNS["reptile-5w1s"], iterations=6), dataset="omniglot-mini", device="cpu"
    )
    assert config.inner_state == "carried"
    training.train(config, tmp_path / "straight", progress=False)
    killed_at(
        monkeypatch,
        5,
        lambda: training.train(config, tmp_path / "killed", progress=False),
        step="carried_meta_gradient",
    )
    training.train(config, tmp_path / "killed", resume=True, progress=False)
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)
    assert straight["inner_state"]["step"] == 6 * config.meta_batch * config.inner_steps
    for name, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    for moment in ("m", "v"):
        for name, value in straight["inner_state"][moment].items():
            assert torch.equal(value, resumed["inner_state"][moment][name]), name
    assert resumed["history"]["val"][-1]["mean"] == straight["history"]["val"][-1]["mean"]

    training.export_run(tmp_path / "straight", test_tasks=0)
    loaded_config, problem, phi = training.load_checkpoint(tmp_path / "straight" / "final.pt", "cpu")
    assert problem.inner_state is not None and problem.inner_state.step == straight["inner_state"]["step"]
    # The last validation in training adapted from the state of that moment: the loaded state
    # reproduces it exactly.
    again = training.evaluate(
        loaded_config, phi, problem, split="val", num_tasks=config.validation_tasks, seed=config.seed + 1
    )
    assert again["mean"] == straight["history"]["val"][-1]["mean"]
    # Evaluation starts from the state, not from fresh moments: the adapted networks differ.
    task = problem.tasks["val"].sample(1, config.shots, 1, torch.Generator().manual_seed(0)).task(0)
    steps = loaded_config.test_inner_steps
    from_state = loaded_config.make_algorithm(steps, problem).adapt(problem.loss, phi, *task.support)
    from_zeros = replace(loaded_config, inner_state="fresh").make_algorithm(steps)
    from_zeros = from_zeros.adapt(problem.loss, phi, *task.support)
    with pytest.raises(ValueError, match="starts from the run's carried inner state"):
        loaded_config.make_algorithm(steps)
    assert max(float((from_state[n] - from_zeros[n]).abs().max()) for n in phi) > 1e-4


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
    assert TrainConfig(algorithm="imaml", inner_loop="pull_back").make_algorithm().inner_loop == "pull_back"


def test_imaml_meta_tests_with_eval_lam(generator):
    """eval_lam sets λ at validation and meta-test only; 0 adapts by plain gradient steps from φ,
    checked against an autograd loop (tests/reference.py)."""
    model = torch.nn.Linear(4, 1).double()
    phi = {k: v.detach().clone() for k, v in model.named_parameters()}
    x = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    y = torch.randn(6, 1, generator=generator, dtype=torch.float64)
    loss = gbml.make_loss(model)
    config = TrainConfig(algorithm="imaml", inner_lr=0.1, inner_steps=5, eval_inner_steps=3, eval_lam=0.0)
    assert config.make_algorithm().lam == 2.0  # training keeps λ
    plain = config.make_test_algorithm().adapt(loss, phi, x, y)
    expected = adapted_params(model, torch.nn.functional.mse_loss, phi, x, y, lr=0.1, steps=3)
    assert relative_error(plain, expected) < 1e-12
    assert replace(config, eval_lam=0.5).make_test_algorithm().lam == 0.5
    unset = replace(config, eval_lam=None).make_test_algorithm()
    assert (unset.lam, unset.inner_steps) == (2.0, 3)
    assert relative_error(unset.adapt(loss, phi, x, y), expected) > 1e-3  # the proximal term acts
    assert "eval_lam" in training.EVALUATION_OPTIONS  # changes no run's training
    with pytest.raises(ValueError, match="eval_lam must be non-negative"):
        TrainConfig(algorithm="imaml", eval_lam=-1.0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"algorithm": "maml", "eval_lam": 0.0}, "eval_lam is iMAML's"),
        ({"algorithm": "fomaml", "inner_loop": "pull_back"}, "inner_loop is iMAML's"),
        ({"algorithm": "imaml", "inner_loop": "pullback"}, "inner_loop must be"),
        ({"outer_eps": 0.0}, "outer_eps .* must be positive"),
        ({"outer_optimizer": "sgd", "outer_eps": 1e-3}, "outer_eps is Adam's"),
        ({"network": "flatten"}, "network must be one of"),
    ],
)
def test_bad_imaml_and_optimizer_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**options)


def test_outer_eps_is_adams_epsilon():
    params = [torch.zeros(3, requires_grad=True)]
    assert TrainConfig().make_outer_optimizer(params).param_groups[0]["eps"] == 1e-8
    assert TrainConfig(outer_eps=1e-3).make_outer_optimizer(params).param_groups[0]["eps"] == 1e-3


def test_confidence_interval():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mean, ci = mean_and_ci95(values)
    sample_std = (sum((v - 2.5) ** 2 for v in (1.0, 2.0, 3.0, 4.0)) / 3) ** 0.5
    assert mean == 2.5 and ci == pytest.approx(1.96 * sample_std / 2)


def test_export_writes_final_parameters_and_a_run_summary(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out), "--no-progress", "--test-tasks", "0"]) == 0
    capsys.readouterr()
    assert main(["export", str(out), "--test-tasks", "30"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["iterations"] == 30 and printed["tasks_seen"] == 30 * TrainConfig().meta_batch
    final = torch.load(out / "final.pt", weights_only=True)  # tensors and plain data only
    torch.load(out / "last.pt", weights_only=True)  # the resumable checkpoint too
    assert set(final) == {"config", "iteration", "model"}  # no optimizer state
    summary = json.loads((out / "run.json").read_text())
    assert [v["iteration"] for v in summary["train"]] == [10, 20, 30]
    losses = [r["query_loss"] for r in torch.load(out / "last.pt", weights_only=False)["history"]["train"]]
    assert summary["train"][1]["query_loss"] == pytest.approx(sum(losses[10:20]) / 10, rel=1e-12)
    assert summary["command"].startswith("python -m gbml train --algorithm maml --dataset sinusoid")
    assert summary["command"].endswith(f"--out {out} --resume")
    # final.pt loads with the public loader and evaluates exactly like the checkpoint it came from
    results = []
    for name in ("last.pt", "final.pt"):
        config, problem, phi = training.load_checkpoint(out / name, "cpu")
        results.append(training.evaluate(config, phi, problem, num_tasks=40, seed=5))
    assert results[0] == results[1]
    # run.json keeps every test task's metric; whole chunks of tasks are drawn alike, so a
    # shorter evaluation with the same seed and chunk scores the first tasks of the longer one
    assert summary["test"]["tasks"] == 30 and len(summary["test"]["per_task"]) == 30
    config, problem, phi = training.load_checkpoint(out / "final.pt", "cpu")
    short = training.evaluate(config, phi, problem, num_tasks=20, chunk=10, per_task=True)
    longer = training.evaluate(config, phi, problem, num_tasks=30, chunk=10, per_task=True)
    assert short["per_task"] == longer["per_task"][:20]
    again = training.evaluate(config, phi, problem, num_tasks=30, per_task=True)
    assert again["per_task"] == pytest.approx(summary["test"]["per_task"], rel=1e-6)
    # Adapting a chunk a few tasks per vmap (7 does not divide 10) or one at a time scores the
    # same tasks in the same order as the whole chunk at once
    whole = training.evaluate(config, phi, problem, num_tasks=30, chunk=10, per_task=True, tasks_per_call=10)
    for tasks_per_call in (7, 1):
        split = training.evaluate(
            config, phi, problem, num_tasks=30, chunk=10, per_task=True, tasks_per_call=tasks_per_call
        )
        assert split["per_task"] == pytest.approx(whole["per_task"], rel=1e-5)
    assert len(set(whole["per_task"])) == 30  # distinct tasks: an order error would show
    with pytest.raises(ValueError, match="tasks_per_call"):
        training.evaluate(config, phi, problem, num_tasks=10, tasks_per_call=0)
    with pytest.raises(FileNotFoundError, match="train the run first"):
        training.export_run(tmp_path / "nothing")


def test_a_run_in_training_is_summarised_as_its_export_will_record_it(tmp_path, capsys):
    out, quiet = tmp_path / "run", ["--no-progress", "--test-tasks", "0"]
    assert main(["train", *TINY, "--iterations", "20", "--out", str(out), *quiet]) == 0
    before = sorted(path.name for path in out.iterdir())
    halfway = training.training_summary(out)
    assert sorted(path.name for path in out.iterdir()) == before  # it writes nothing
    assert halfway["iterations"] == 20 and halfway["tasks_seen"] == 20 * TrainConfig().meta_batch
    assert [v["iteration"] for v in halfway["val"]] == [10, 20] and "test" not in halfway
    assert main(["train", "--resume", str(out), "--iterations", "30", *quiet]) == 0
    capsys.readouterr()
    later = training.training_summary(out)
    assert later["iterations"] == 30 and later["val"][:2] == halfway["val"]
    assert [(s["from_iteration"], s["to_iteration"]) for s in later["sessions"]] == [(0, 20), (20, 30)]
    exported = training.export_run(out, test_tasks=5)
    assert {k: v for k, v in exported.items() if k != "test"} == later
    with pytest.raises(FileNotFoundError, match="train the run first"):
        training.training_summary(tmp_path / "nothing")


def test_reptile_with_outer_sgd_of_step_one_moves_phi_to_theta(tmp_path):
    """Nichol et al.'s outer update: φ ← φ + ε (θ_t − φ) is SGD of step ε on Δ_t = φ − θ_t; with
    ε = 1 and one task, φ becomes θ_t, computed here by hand from the same task."""
    config = TrainConfig(
        algorithm="reptile",
        dataset="sinusoid",
        inner_lr=0.01,
        inner_steps=3,
        meta_batch=1,
        iterations=1,
        validate_every=1,
        validation_tasks=5,
        outer_optimizer="sgd",
        outer_lr=1.0,
        outer_lr_final=0.0,
        seed=7,
    )
    initial = gbml.parameters_of(training.make_problem(config, torch.device("cpu")).model)
    phi0 = {name: p.detach().clone() for name, p in initial.items()}
    training.train(config, tmp_path, progress=False)
    _, problem, phi = training.load_checkpoint(tmp_path / "last.pt", "cpu")
    task = (
        gbml.SinusoidTasks().sample(1, config.shots, config.queries, torch.Generator().manual_seed(7)).task(0)
    )
    theta = gbml.task_adapt(problem.loss, phi0, *task.joined(), lr=0.01, steps=3, differentiable=False)
    for name in theta:
        assert torch.allclose(phi[name], theta[name], rtol=0, atol=1e-6), name
    # the step size anneals linearly from outer_lr to outer_lr_final over the run
    longer = TrainConfig(outer_lr=1.0, outer_lr_final=0.0, iterations=100)
    assert [longer.outer_lr_at(i) for i in (0, 50, 99)] == pytest.approx([1.0, 0.5, 0.01])
    assert TrainConfig(outer_lr=0.3).outer_lr_at(99) == 0.3
    with pytest.raises(ValueError, match="outer_optimizer"):
        TrainConfig(outer_optimizer="rmsprop")


def test_evaluation_uses_test_queries():
    config = TrainConfig(dataset="sinusoid", queries=10, test_queries=3)
    assert config.evaluation_queries == 3 and TrainConfig(queries=4).evaluation_queries == 4
    problem = training.make_problem(config, torch.device("cpu"))
    drawn = []
    real_sample = problem.tasks["test"].sample

    def recording_sample(num_tasks, shots, queries, generator, **kwargs):
        drawn.append(queries)
        return real_sample(num_tasks, shots, queries, generator, **kwargs)

    problem.tasks["test"] = type("Recording", (), {"sample": staticmethod(recording_sample)})()
    training.evaluate(config, gbml.parameters_of(problem.model), problem, num_tasks=20)
    assert drawn == [3]


def test_resume_reads_the_options_from_the_checkpoint(tmp_path, capsys, monkeypatch):
    """``train --resume RUN_DIR`` with no other option continues a killed run to the same
    parameters as an uninterrupted run; options that define the run cannot be changed."""
    options = [*TINY, "--seed", "5", "--inner-lr", "0.02", "--no-progress", "--test-tasks", "0"]
    assert main(["train", *options, "--out", str(tmp_path / "straight")]) == 0

    # killed after the checkpoint at iteration 10
    killed_at(monkeypatch, 15, lambda: main(["train", *options, "--out", str(tmp_path / "killed")]))
    capsys.readouterr()

    assert main(["train", "--resume", str(tmp_path / "killed"), "--no-progress", "--test-tasks", "0"]) == 0
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)
    assert resumed["iteration"] == 30 and resumed["config"] == straight["config"]
    for name, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][name]), name

    capsys.readouterr()
    assert (
        main(["train", "--resume", str(tmp_path / "killed"), "--inner-lr", "0.05", "--test-tasks", "0"]) == 2
    )
    assert "may change only iterations" in capsys.readouterr().err
    longer = ["train", "--resume", str(tmp_path / "killed"), "--iterations", "40", "--no-progress"]
    assert main([*longer, "--test-tasks", "0"]) == 0
    assert torch.load(tmp_path / "killed" / "last.pt", weights_only=True)["iteration"] == 40
    assert main(["train", "--iterations", "5"]) == 2
    assert "needs --out" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nothing-here"), "--test-tasks", "0"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_options_come_from_one_table_with_help_and_choices(capsys, monkeypatch):
    from dataclasses import fields

    from gbml.cli import TRAIN_OPTIONS

    assert set(TRAIN_OPTIONS) == {f.name for f in fields(TrainConfig)}
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert (
        "{auto,true,false,compile}" in text
        and "{stride,stride_flatten,max_pool}" in text
        and "--data-dir" in text
    )
    assert "``" not in text
    with pytest.raises(SystemExit):
        main(["train", "--batched", "sometimes", "--out", "x"])
    assert "invalid choice" in capsys.readouterr().err
    monkeypatch.setenv("GBML_DATA_DIR", "elsewhere")  # restored after the test
    assert main(["evaluate", "--checkpoint", "no-such.pt", "--data-dir", "my-data"]) == 2
    import os

    assert os.environ["GBML_DATA_DIR"] == "my-data"


def test_one_batched_vocabulary():
    """TrainConfig.batched speaks the API's True/False/"auto" (plus "compile"); "true"/"false",
    the command line's and saved runs' spelling, are read as the bools and written back as such."""
    assert TrainConfig(batched="true").batched is True and TrainConfig(batched=False).batched is False
    assert TrainConfig.from_dict({"batched": "false"}).batched is False
    assert TrainConfig(batched="compile").batched_option is True
    assert "--batched true " in training.train_command(TrainConfig(batched=True), "out")
    with pytest.raises(ValueError, match="batched must be"):
        TrainConfig(batched="sometimes")


def test_fast_weights_leave_out_batch_norm_where_the_protocol_says(tmp_path, monkeypatch):
    """``fast_weights="no_batch_norm"``: the problem names batch norm's shifts (Finn et al.'s
    network has no scale), the algorithm freezes exactly those, and runs without a model refuse."""
    monkeypatch.setenv("GBML_CACHE_DIR", str(tmp_path / "cache"))
    config = TrainConfig(algorithm="fomaml", dataset="omniglot-mini", fast_weights="no_batch_norm", ways=3)
    problem = training.make_problem(config, torch.device("cpu"))
    assert problem.frozen == {f"features.{i}.bias" for i in (1, 4, 7, 10)}
    assert config.make_algorithm(problem=problem).frozen == problem.frozen
    assert (
        training.make_problem(replace(config, fast_weights="all"), torch.device("cpu")).frozen == frozenset()
    )
    with pytest.raises(ValueError, match="depends on the network's parameter names"):
        config.make_algorithm()
    with pytest.raises(ValueError, match="the network has no batch norm"):
        training.make_problem(replace(config, dataset="sinusoid"), torch.device("cpu"))
    for algorithm in ("reptile", "imaml"):
        with pytest.raises(ValueError, match="is for MAML and FO-MAML"):
            TrainConfig(algorithm=algorithm, fast_weights="no_batch_norm")
    with pytest.raises(ValueError, match="fast_weights must be"):
        TrainConfig(fast_weights="some")
