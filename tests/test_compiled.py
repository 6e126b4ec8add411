"""The torch.compile'd meta-step gives the per-task loop's updates (float64, on the CPU).

Compiling is slow (10-40 s per algorithm on 2 cores), so the network here is the conv net cut to
one block of 4 filters on 8×8 images: the same kinds of layers (convolution, composite batch norm,
ReLU, pooling, linear head) and the same code paths, with a much smaller program to compile.
"""

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

import gbml
import gbml.training
from conftest import make_classification_task
from gbml.cli import main
from gbml.compiled import CompiledMetaStep
from gbml.training import TrainConfig, load_checkpoint
from reference import clone_params, relative_error

ALGORITHMS = {
    "maml": gbml.MAML(inner_lr=0.1, inner_steps=2),
    "fomaml": gbml.FOMAML(inner_lr=0.1, inner_steps=2),
    "reptile": gbml.Reptile(inner_lr=0.1, inner_steps=2),
    # Three CG steps keep the compiled program small; the loop takes the same three steps, so the
    # two must agree whether or not the solve has converged.
    "imaml": gbml.IMAML(
        inner_lr=0.01, lam=200.0, inner_steps=2, cg_steps=3, cg_tol=1e-8, on_cg_failure="warn"
    ),
    # Rajeswaran et al.'s inner loop (plain steps, then one pull back towards φ), as the iMAML runs train.
    "imaml-pull-back": gbml.IMAML(
        inner_lr=0.01,
        lam=20.0,  # the pull back moves θ 0.01 · 20 = 0.2 of the way to φ, as in the protocol
        inner_steps=2,
        cg_steps=3,
        cg_tol=1e-8,
        on_cg_failure="warn",
        inner_loop="pull_back",
    ),
    # Batch norm's parameters left at φ by the inner loop (fast_weights="no_batch_norm"), as the
    # 20-way runs train: torch 2.11 failed to trace this case (set - dict_keys in task_adapt).
    "maml-frozen-batch-norm": gbml.MAML(
        inner_lr=0.1,
        inner_steps=2,
        frozen=gbml.training.frozen_parameters(
            TrainConfig(fast_weights="no_batch_norm"), gbml.ConvNet(ways=3, hidden=4, blocks=1, image_size=8)
        ),
    ),
}


def small_conv_net():
    """The network, its parameters and an outer optimizer. SGD with momentum rather than Adam:
    Adam divides by √v + ε, which turns the rounding noise (1e-16) in the gradient of a bias
    before a batch norm (exactly 0 in exact arithmetic) into steps of 1e-10, so two correct
    paths can end 1e-10 apart; SGD keeps parameter differences at the gradients' level."""
    torch.manual_seed(0)
    model = gbml.ConvNet(ways=3, hidden=4, blocks=1, image_size=8).double()
    params = gbml.parameters_of(model)
    return model, params, torch.optim.SGD(params.values(), lr=0.1, momentum=0.9)


def small_batch(generator):
    return make_classification_task(generator, num_tasks=3, image_size=8)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_compiled_step_equals_the_loop(name, generator):
    """Three outer steps on three batches: the same meta-gradients and the same φ as
    gbml.meta_step with the per-task loop."""
    batches = [small_batch(generator) for _ in range(3)]
    model_loop, params_loop, sgd_loop = small_conv_net()
    model, params, sgd = small_conv_net()
    step = CompiledMetaStep(ALGORITHMS[name], gbml.make_loss(model, F.cross_entropy), params, sgd)
    loss_loop = gbml.make_loss(model_loop, F.cross_entropy)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="iMAML's conjugate gradient missed")
        for tasks in batches:
            expected = gbml.meta_step(
                ALGORITHMS[name], loss_loop, params_loop, tasks, sgd_loop, batched=False
            )
            got = step(tasks)
            assert relative_error(got.meta_gradient, expected.meta_gradient) < 1e-10
            for key in expected.info:
                assert torch.allclose(
                    got.info[key].double(), expected.info[key].double(), rtol=1e-10, atol=1e-12
                )
    assert relative_error(clone_params(model), clone_params(model_loop)) < 1e-10
    # The parameters moved, so the comparison above was not between two untouched copies.
    assert relative_error(clone_params(model), clone_params(small_conv_net()[0])) > 1e-4


def test_compiled_step_leaves_phi_alone_when_it_diverges(generator):
    model, params, sgd = small_conv_net()
    step = CompiledMetaStep(gbml.FOMAML(0.1), gbml.make_loss(model, F.cross_entropy), params, sgd)
    tasks = small_batch(generator)
    step(tasks)
    before = clone_params(model)
    state_before = {k: v.clone() for k, v in sgd.state[params["head.weight"]].items()}
    poisoned = tasks._replace(x_query=tasks.x_query.clone())
    poisoned.x_query[1, 0, 0, 0, 0] = float("nan")
    with pytest.raises(gbml.DivergenceError, match="φ was left unchanged"):
        step(poisoned)
    assert relative_error(clone_params(model), before) == 0.0
    for key, value in sgd.state[params["head.weight"]].items():
        assert torch.equal(value, state_before[key]), key


def test_compiled_step_refuses_bad_input(generator):
    model, params, sgd = small_conv_net()
    loss = gbml.make_loss(model, F.cross_entropy)
    with pytest.raises(ValueError, match="mode must be one of"):
        CompiledMetaStep(gbml.MAML(0.1), loss, params, sgd, mode="fastest")
    with pytest.raises(ValueError, match="no parameters"):
        CompiledMetaStep(gbml.MAML(0.1), loss, {}, sgd)
    native = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    with pytest.raises(ValueError, match="batch norm"):
        CompiledMetaStep(
            gbml.MAML(0.1),
            gbml.make_loss(native),
            gbml.parameters_of(native),
            torch.optim.SGD(native.parameters()),
        )
    step = CompiledMetaStep(gbml.MAML(0.1), loss, params, sgd)
    with pytest.raises(ValueError, match=r"expected \(tasks, samples"):
        step(small_batch(generator).task(0))  # one task, not a batch: checked before compiling


def test_many_compiled_steps_in_one_process(generator):
    """TorchDynamo compiles at most 8 programs per code object and then (with fullgraph=True)
    fails; every CompiledMetaStep compiles its own copy, so a ninth one still works."""
    tasks = gbml.Task(*(torch.randn(2, 4, 1, generator=generator) for _ in range(4)))
    for i in range(9):
        model = gbml.SinusoidMLP(hidden=(3,))
        params = gbml.parameters_of(model)
        step = CompiledMetaStep(
            gbml.FOMAML(inner_lr=0.01 * (i + 1)),
            gbml.make_loss(model),
            params,
            torch.optim.SGD(params.values(), lr=0.1),
        )
        expected, _ = gbml.meta_gradient(step.algorithm, step.loss, params, tasks, batched=False)
        assert relative_error(step(tasks).meta_gradient, expected) < 1e-5  # float32


def test_training_with_the_compiled_step(tmp_path, capsys):
    """``python -m gbml train --batched compile`` trains as the vmap path does: the same
    training losses and the same meta-parameters up to float32 rounding (1e-5 relative)."""
    tiny = [
        "--dataset",
        "sinusoid",
        "--iterations",
        "10",
        "--validate-every",
        "5",
        "--validation-tasks",
        "10",
    ]
    for batched in ("true", "compile"):
        assert (
            main(["train", *tiny, "--batched", batched, "--out", str(tmp_path / batched), "--no-progress"])
            == 0
        )
    capsys.readouterr()
    histories = {b: json.loads((tmp_path / b / "history.json").read_text()) for b in ("true", "compile")}
    losses = {b: torch.tensor([r["query_loss"] for r in h["train"]]) for b, h in histories.items()}
    assert len(losses["compile"]) == 10
    assert torch.allclose(losses["compile"], losses["true"], rtol=1e-5)
    phi = {
        b: clone_params(load_checkpoint(tmp_path / b / "last.pt", device="cpu")[1].model)
        for b in ("true", "compile")
    }
    assert relative_error(phi["compile"], phi["true"]) < 1e-5
    with pytest.raises(ValueError, match="'compile'"):
        TrainConfig(batched="jit")
