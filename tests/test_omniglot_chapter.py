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
import torch.nn.functional as F

import gbml
from gbml.protocols import (
    GPU_RUNS,
    OMNIGLOT_RUNS,
    PAPER_ITERATIONS,
    PUBLISHED,
    REGISTERED_RUNS,
    TARGETS,
    committed_runs,
    published_name,
    runs_in_training,
)
from gbml.training import EXECUTION_OPTIONS, TrainConfig, evaluate, load_checkpoint
from test_omniglot import full_data_or_skip

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "omniglot"
COMMITTED = list(committed_runs(RESULTS).values())  # the CPU runs, and under gpu/ a GPU's


def run_name(folder: Path) -> str:
    """A committed run's name in the registries: "maml-5w1s", "gpu/maml-5w1s"."""
    return folder.relative_to(RESULTS).as_posix()


def needs_omniglot():
    full_data_or_skip()


def test_chapter_8_retrains_a_run_at_smoke_size(tmp_path, monkeypatch):
    """On the miniature shipped with gbml, so that it runs offline from a bare clone (nbval runs
    the default mode on the full data set where that is found)."""
    monkeypatch.setenv("SMOKE_TEST", "1")
    out = tmp_path / "08.ipynb"
    # Reptile's 5-shot protocol trains as its 1-shot one: retraining meta-tests the 1-shot training.
    runs = "fomaml-5w1s,reptile-5w1s,reptile-5w5s"
    parameters = {"train": True, "runs": runs, "run_dir": str(tmp_path / "runs")}
    papermill.execute_notebook(
        str(ROOT / "book" / "08_omniglot.ipynb"),
        str(out),
        parameters={**parameters, "dataset": "omniglot-mini"},
        cwd=str(ROOT / "book"),
        kernel_name="python3",
        progress_bar=False,
    )
    summary = json.loads((tmp_path / "runs-smoke" / "fomaml-5w1s" / "run.json").read_text())
    assert summary["iterations"] == 4 and summary["config"]["algorithm"] == "fomaml"
    assert summary["config"]["dataset"] == "omniglot-mini"
    shared = json.loads((tmp_path / "runs-smoke" / "reptile-5w5s" / "run.json").read_text())
    assert shared["trained_by"] == "reptile-5w1s" and shared["config"]["shots"] == 5
    assert not (tmp_path / "runs-smoke" / "reptile-5w5s" / "last.pt").exists()  # not trained again
    # retraining chooses the pretrained baseline's fine-tuning again, for every setting it meta-tests
    choices = json.loads((tmp_path / "runs-smoke" / "pretrained_finetuning.json").read_text())
    assert sorted((c["ways"], c["shots"], c["whole_net"]) for c in choices["choices"]) == [
        (5, 1, False),
        (5, 1, True),
        (5, 5, False),
        (5, 5, True),
    ]
    text = "\n".join(
        "".join(o.get("text", ""))
        for cell in nbformat.read(out, as_version=4).cells
        for o in cell.get("outputs", [])
    )
    assert f"retraining: {runs.replace(',', ', ')}" in text
    assert "every run re-evaluates to the accuracies recorded in its run.json: True" in text
    assert "Omniglot(50 characters × 20 drawings, 28×28 uint8)" in text


def test_there_are_committed_runs_and_each_follows_its_protocol():
    assert COMMITTED, "no committed run under results/omniglot"
    for folder in COMMITTED:
        summary = json.loads((folder / "run.json").read_text())
        protocol = asdict(REGISTERED_RUNS[run_name(folder)])
        defining = {k: v for k, v in protocol.items() if k not in EXECUTION_OPTIONS}
        # Fields added to TrainConfig after a run was saved take their defaults (what it ran with).
        saved = asdict(TrainConfig.from_dict(summary["config"]))
        assert {k: saved[k] for k in defining} == defining, folder.name  # the registry says what ran
        assert summary["tasks_seen"] == summary["iterations"] * protocol["meta_batch"]
        assert summary["sessions"] and summary["sessions"][-1]["to_iteration"] == summary["iterations"]
        assert summary["test"]["tasks"] == 600 and len(summary["test"]["per_task"]) == 600
        assert published_name(run_name(folder)) in PUBLISHED
        final = torch.load(folder / "final.pt", weights_only=True)
        # Meta-parameters only, no optimizer state; a carried inner Adam state is part of the
        # result (meta-test tasks adapt from it), so it is kept.
        carried = {"inner_state"} if saved["inner_state"] == "carried" else set()
        assert final["iteration"] == summary["iterations"]
        assert set(final) == {"config", "iteration", "model"} | carried, folder.name


def test_a_run_meta_tested_from_another_runs_training_holds_exactly_that_training():
    """Reptile's 5-shot row is the 1-shot run's meta-training (Nichol et al. train both alike): its
    final.pt must hold that run's final φ and inner state, and the two protocols must differ only in
    evaluation, so that re-exporting it after the run goes on is not forgotten."""
    from gbml.training import training_differences

    shared = [f for f in COMMITTED if json.loads((f / "run.json").read_text()).get("trained_by")]
    assert "reptile-5w5s" in {f.name for f in shared}
    for folder in shared:
        summary = json.loads((folder / "run.json").read_text())
        source = folder.parent / summary["trained_by"]
        trained = json.loads((source / "run.json").read_text())
        assert training_differences(trained["config"], summary["config"]) == {}, folder.name
        assert (summary["iterations"], summary["sessions"]) == (trained["iterations"], trained["sessions"])
        ours, theirs = (
            _result_tensors(torch.load(f / "final.pt", weights_only=True)) for f in (folder, source)
        )
        assert ours.keys() == theirs.keys(), folder.name
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), folder.name


def _result_tensors(checkpoint):
    """What a run's final.pt holds of the meta-learned result: φ, its iteration and any carried
    inner state (moments and step count), keyed by where they come from."""
    tensors = {("model", k): v for k, v in checkpoint["model"].items()}
    tensors["iteration",] = torch.tensor(checkpoint["iteration"])
    if "inner_state" in checkpoint:
        state = checkpoint["inner_state"]
        tensors |= {(moment, k): v for moment in ("m", "v") for k, v in state[moment].items()}
        tensors["step",] = torch.tensor(state["step"])
    return tensors


# One committed run of each algorithm (its first setting).
ONE_PER_ALGORITHM = list({p.name.split("-")[0]: p for p in reversed(COMMITTED)}.values())


@pytest.mark.parametrize("folder", ONE_PER_ALGORITHM, ids=run_name)
def test_a_committed_run_reloads_and_re_evaluates_to_its_recorded_accuracy(folder):
    """The public loader gives back meta-parameters that score the first 50 of the 600 recorded
    test tasks as recorded (two flipped query predictions allowed, for other processors)."""
    needs_omniglot()
    summary = json.loads((folder / "run.json").read_text())
    config, problem, phi = load_checkpoint(folder / "final.pt", "cpu")
    again = evaluate(config, phi, problem, num_tasks=50, per_task=True)
    recorded = summary["test"]["per_task"][:50]
    per_query = 1 / (config.ways * config.evaluation_queries)  # one query image more or less right
    flips = sum(abs(a - b) for a, b in zip(again["per_task"], recorded)) / per_query
    assert flips <= 2 + 1e-6
    mean = sum(summary["test"]["per_task"]) / 600
    assert math.isclose(mean, summary["test"]["mean"], rel_tol=1e-12)


def test_targets_name_published_runs():
    assert set(TARGETS) <= set(PUBLISHED)
    for name, target in TARGETS.items():
        assert target < PUBLISHED[name][0]


def test_a_gpu_run_is_its_published_rows_protocol_at_the_papers_budget():
    """gpu/<name> is compared with <name>'s published row, so it must train that row's setting and
    algorithm, with the paper's fast weights and budget."""
    assert GPU_RUNS
    for name, config in GPU_RUNS.items():
        row = published_name(name)
        assert name == f"gpu/{row}" and row in PUBLISHED and row in OMNIGLOT_RUNS
        cpu = OMNIGLOT_RUNS[row]
        assert (config.algorithm, config.ways, config.shots) == (cpu.algorithm, cpu.ways, cpu.shots)
        assert config.fast_weights == "no_batch_norm" and config.iterations == PAPER_ITERATIONS


@pytest.mark.parametrize("dataset", ["omniglot-mini", "omniglot"])
def test_pretraining_and_fine_tuning_on_real_omniglot(dataset, tmp_path, capsys):
    """The joint-training baseline: the CLI trains and saves a body; fine-tuning with no steps
    leaves a zero head (chance accuracy exactly); head-only fine-tuning equals a logistic
    regression written by hand on the body's features (float64); vmap equals the loop.
    On the miniature shipped with gbml, and on the full data set where it is found."""
    if dataset == "omniglot":
        needs_omniglot()
    from gbml.baselines import evaluate_finetuning, finetune_accuracies, load_pretrained
    from gbml.cli import main
    from gbml.omniglot import OmniglotTasks

    out = tmp_path / "pretrained.pt"
    options = ["--steps", "3", "--classes-per-batch", "4", "--device", "cpu", "--dataset", dataset]
    assert main(["pretrain", *options, "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["classes"] == (4400 if dataset == "omniglot" else 4 * 34) and printed["last"]["step"] == 3
    body, record = load_pretrained(out)
    assert not any(name.startswith("head.") for name in body) and len(record["curve"]) == 1

    data = gbml.load_omniglot() if dataset == "omniglot" else gbml.load_omniglot_miniature()
    family = OmniglotTasks("test", 5, data=data)
    tasks = family.sample(4, 1, 3, torch.Generator().manual_seed(0))
    tasks = tasks._replace(x_support=tasks.x_support.double(), x_query=tasks.x_query.double())
    body64 = {name: p.double() for name, p in body.items()}
    untouched = finetune_accuracies(body64, tasks, ways=5, lr=0.5, steps=0, whole_net=False)
    assert torch.equal(untouched, torch.full((4,), 1 / 5, dtype=torch.float64))  # argmax of zeros: label 0

    lr, steps = 0.5, 7
    batched = finetune_accuracies(body64, tasks, ways=5, lr=lr, steps=steps, whole_net=False)
    looped = finetune_accuracies(body64, tasks, ways=5, lr=lr, steps=steps, whole_net=False, batched=False)
    assert torch.equal(batched, looped)
    net = gbml.finn_omniglot_net(5).double()
    by_hand = []
    for t in range(4):
        task = tasks.task(t)

        def features(x):
            return torch.func.functional_call(
                net.features, {k[len("features.") :]: v for k, v in body64.items()}, (x,)
            ).mean(dim=(2, 3))

        f_support, f_query = features(task.x_support), features(task.x_query)
        weight, bias = torch.zeros(5, 64, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
        onehot = F.one_hot(task.y_support, 5).double()
        for _ in range(steps):  # gradient of the mean cross-entropy of a linear softmax classifier
            residual = (torch.softmax(f_support @ weight.T + bias, dim=-1) - onehot) / len(onehot)
            weight, bias = weight - lr * residual.T @ f_support, bias - lr * residual.sum(0)
        by_hand.append(float(((f_query @ weight.T + bias).argmax(-1) == task.y_query).double().mean()))
    assert batched.tolist() == by_hand

    whole = evaluate_finetuning(
        body, family, shots=1, queries=1, lr=0.5, steps=2, whole_net=True, num_tasks=10
    )
    assert whole["tasks"] == 10 and len(whole["per_task"]) == 10 and 0 <= whole["mean"] <= 1


@pytest.mark.parametrize("whole_net", [False, True])
def test_a_fine_tuning_sweep_scores_every_setting_as_its_own_run(whole_net):
    """A sweep shares the first steps of settings with one step size (and head-only fine-tuning the
    body's features); each setting must still give the query logits and accuracies of gradient
    descent written by hand from a zero head (float64, on the miniature shipped with gbml), and
    sweep_finetuning must score the tasks evaluate draws, chunk by chunk."""
    from gbml.baselines import finetune_grid_accuracies, finetune_grid_logits, sweep_finetuning
    from gbml.omniglot import OmniglotTasks

    torch.manual_seed(0)
    net = gbml.finn_omniglot_net(5).double()
    body = {name: p.detach() for name, p in net.named_parameters() if not name.startswith("head.")}
    family = OmniglotTasks("val", 5, data=gbml.load_omniglot_miniature())
    tasks = family.sample(3, 2, 2, torch.Generator().manual_seed(1))
    tasks = tasks._replace(x_support=tasks.x_support.double(), x_query=tasks.x_query.double())
    grid = [(0.5, 4), (0.5, 1), (0.1, 3), (0.5, 0), (0.5, 4)]  # unsorted, with a repeat
    swept = finetune_grid_accuracies(body, tasks, ways=5, grid=grid, whole_net=whole_net)
    assert list(swept) == [(0.5, 4), (0.5, 1), (0.1, 3), (0.5, 0)]
    looped = finetune_grid_accuracies(body, tasks, ways=5, grid=grid, whole_net=whole_net, batched=False)
    assert all(torch.equal(swept[s], looped[s]) for s in swept)
    swept_logits = finetune_grid_logits(body, tasks, ways=5, grid=grid, whole_net=whole_net)
    # one more step changes the logits: the comparison below can tell step counts apart
    assert not torch.allclose(swept_logits[0.5, 1], swept_logits[0.5, 0])

    for (lr, steps), accuracies in swept.items():
        for t in range(3):
            task = tasks.task(t)
            theta = {name: p.clone().requires_grad_(whole_net) for name, p in body.items()}
            theta["head.weight"] = torch.zeros(5, 64, dtype=torch.float64, requires_grad=True)
            theta["head.bias"] = torch.zeros(5, dtype=torch.float64, requires_grad=True)
            for _ in range(steps):
                loss = F.cross_entropy(
                    torch.func.functional_call(net, theta, (task.x_support,)), task.y_support
                )
                trained = {n: p for n, p in theta.items() if p.requires_grad}
                grads = torch.autograd.grad(loss, list(trained.values()))
                for (name, p), g in zip(trained.items(), grads):
                    theta[name] = (p - lr * g).detach().requires_grad_(True)
            with torch.no_grad():
                by_hand = torch.func.functional_call(net, theta, (task.x_query,))
            torch.testing.assert_close(swept_logits[lr, steps][t], by_hand, rtol=1e-9, atol=1e-12)
            predicted = by_hand.argmax(-1)
            assert float(accuracies[t]) == float((predicted == task.y_query).double().mean()), (lr, steps, t)

    body32 = {name: p.float() for name, p in body.items()}  # the sampled tasks are float32
    sweep = sweep_finetuning(
        body32,
        family,
        shots=1,
        queries=1,
        grid=(setting for setting in [(0.5, 1), (0.5, 3)]),  # a generator, read for every chunk
        whole_net=whole_net,
        num_tasks=6,
        chunk=4,
        seed=7,
    )
    generator = torch.Generator().manual_seed(7)  # evaluate's draw: chunks of 4, then the 2 left
    drawn = [family.sample(size, 1, 1, generator) for size in (4, 2)]
    for setting in [(0.5, 1), (0.5, 3)]:
        expected = torch.cat(
            [
                finetune_grid_accuracies(body32, t, ways=5, grid=[setting], whole_net=whole_net)[setting]
                for t in drawn
            ]
        )
        assert sweep[setting]["per_task"] == expected.double().tolist() and sweep[setting]["tasks"] == 6
    # Fine-tuned 3 tasks per vmap (chunks of 4 split as 3 + 1): the same tasks, in the same order
    grouped = sweep_finetuning(
        body32,
        family,
        shots=1,
        queries=1,
        grid=[(0.5, 3)],
        whole_net=whole_net,
        num_tasks=6,
        chunk=4,
        seed=7,
        tasks_per_call=3,
    )
    assert grouped[0.5, 3]["per_task"] == sweep[0.5, 3]["per_task"]
    with pytest.raises(ValueError, match="grid is empty"):
        finetune_grid_accuracies(body, tasks, ways=5, grid=[], whole_net=whole_net)
    with pytest.raises(ValueError, match="lr"):
        finetune_grid_accuracies(body, tasks, ways=5, grid=[(-1.0, 2)], whole_net=whole_net)


def test_choosing_fine_tuning_takes_each_settings_best_validation_accuracy():
    """choose_finetuning keeps, per setting and kind, the grid point sweep_finetuning scores best
    on the validation tasks (on the miniature shipped with gbml, from a random body)."""
    from gbml.baselines import choose_finetuning, finetuning_choice, sweep_finetuning
    from gbml.omniglot import OmniglotTasks

    torch.manual_seed(0)
    net = gbml.finn_omniglot_net(5)
    body = {name: p.detach() for name, p in net.named_parameters() if not name.startswith("head.")}
    data = gbml.load_omniglot_miniature()
    grids = {False: [(0.5, 1), (0.5, 5), (0.01, 2)], True: [(0.3, 1), (0.1, 2)]}
    record = choose_finetuning(body, data, [(5, 1), (5, 2)], grids=grids, num_tasks=6, seed=3)
    assert record["validation_tasks"] == 6 and record["seed"] == 3 and len(record["choices"]) == 4
    family = OmniglotTasks("val", 5, data=data)
    for choice in record["choices"]:
        ways, shots, whole_net = choice["ways"], choice["shots"], choice["whole_net"]
        sweep = sweep_finetuning(
            body,
            family,
            shots=shots,
            queries=shots,
            grid=grids[whole_net],
            whole_net=whole_net,
            num_tasks=6,
            seed=3,
        )
        assert [(v["lr"], v["steps"]) for v in choice["validation"]] == list(sweep)
        assert [v["mean"] for v in choice["validation"]] == [r["mean"] for r in sweep.values()]
        best = max(r["mean"] for r in sweep.values())
        assert sweep[finetuning_choice(record, ways, shots, whole_net)]["mean"] == best
    assert finetuning_choice(record, 20, 1, False) is None


def test_the_committed_fine_tuning_choices_are_the_best_on_their_validation_tasks():
    """results/omniglot/pretrained_finetuning.json, which chapter 8 reuses: every choice is the best
    of its recorded grid, and the cheap head-only 5-way 1-shot sweep scores again as recorded
    (two flipped query predictions allowed, for other processors)."""
    needs_omniglot()
    from gbml.baselines import FINETUNING_GRIDS, load_pretrained, sweep_finetuning
    from gbml.omniglot import OmniglotTasks

    record = json.loads((ROOT / "results" / "omniglot" / "pretrained_finetuning.json").read_text())
    settings = {(c["ways"], c["shots"]) for c in record["choices"]}
    protocols = [REGISTERED_RUNS[run_name(folder)] for folder in COMMITTED]
    assert settings == {(protocol.ways, protocol.shots) for protocol in protocols}
    for choice in record["choices"]:
        points = {(v["lr"], v["steps"]): v["mean"] for v in choice["validation"]}
        assert list(points) == FINETUNING_GRIDS[choice["whole_net"]]
        assert points[choice["lr"], choice["steps"]] == max(points.values())
    body, _ = load_pretrained(ROOT / "results" / "omniglot" / "pretrained.pt")
    (head_5w1s,) = [c for c in record["choices"] if (c["ways"], c["shots"], c["whole_net"]) == (5, 1, False)]
    again = sweep_finetuning(
        body,
        OmniglotTasks("val", 5, data=gbml.load_omniglot()),
        shots=1,
        queries=1,
        grid=FINETUNING_GRIDS[False],
        whole_net=False,
        num_tasks=record["validation_tasks"],
        seed=record["seed"],
    )
    one_flip = 1 / (5 * record["validation_tasks"])  # one query image of one task, in the mean
    for v in head_5w1s["validation"]:
        assert abs(again[v["lr"], v["steps"]]["mean"] - v["mean"]) <= 2 * one_flip + 1e-12


def test_committed_runs_are_the_exported_runs_and_the_gpus_not_pilots_or_abandoned_ones(tmp_path):
    for folder in ("maml-5w1s", "gpu/maml-5w1s", "abandoned/maml-5w1s-old", "pilots/reptile-lr0.1"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "run.json").write_text("{}")
    (tmp_path / "fomaml-5w1s").mkdir()  # still training: no run.json yet
    for folder in ("fomaml-5w1s", "gpu/imaml-5w5s", "maml-5w1s", "pilots/reptile-lr0.1"):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / "last.pt").write_bytes(b"")
    assert committed_runs(tmp_path) == {
        "gpu/maml-5w1s": tmp_path / "gpu" / "maml-5w1s",
        "maml-5w1s": tmp_path / "maml-5w1s",
    }
    # started, not exported: a last.pt without run.json (maml-5w1s is exported, the pilot is deeper)
    assert runs_in_training(tmp_path) == {
        "fomaml-5w1s": tmp_path / "fomaml-5w1s",
        "gpu/imaml-5w5s": tmp_path / "gpu" / "imaml-5w5s",
    }
