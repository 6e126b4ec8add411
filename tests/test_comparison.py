"""The controlled comparison (gbml.comparison, book §6.8): its training and testing loops against
plain torch.autograd loops written here, and its confidence intervals against tabulated values."""

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

import gbml
from gbml import comparison
from gbml.comparison import (
    ComparisonConfig,
    initial_params,
    meta_train,
    run_comparison,
    student_ci95,
    t_quantile_975,
)
from reference import adapted_params, relative_error

F64 = torch.float64


def small_net() -> nn.Module:
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))


def config(**changes) -> ComparisonConfig:
    values = dict(inner_lr=0.05, inner_steps=2, shots=4, queries=3, meta_batch=3, iterations=3, seeds=(0, 1))
    values.update(changes)
    return ComparisonConfig(**values)


@pytest.mark.parametrize(
    ("df", "table"), [(1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (30, 2.042), (1000, 1.962)]
)
def test_t_quantile_matches_the_tables(df, table):
    assert t_quantile_975(df) == pytest.approx(table, abs=1e-3)


def test_student_ci95_by_hand():
    mean, half_width = student_ci95([1.0, 2.0, 3.0])  # s = 1, n = 3, t = 4.303
    assert mean == 2.0
    assert half_width == pytest.approx(4.3027 / math.sqrt(3), rel=1e-4)
    with pytest.raises(ValueError, match="at least two"):
        student_ci95([1.0])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"inner_lr": 0.0}, "inner_lr"),
        ({"inner_steps": -1}, "inner_steps"),
        ({"lam": -1.0}, "lam"),
        ({"iterations": 0}, "iterations"),
        ({"seeds": (3,)}, "seeds"),
        ({"seeds": (1, 1)}, "seeds"),
        ({"methods": ("MAML", "ANIL")}, "methods"),
    ],
)
def test_invalid_configurations_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        config(**changes)


def test_imaml_lambda_defaults_to_one_over_alpha_l():
    assert config().proximal_strength == pytest.approx(1 / (0.05 * 2))
    assert config(lam=3.0).proximal_strength == 3.0


def reference_training(method: str, cfg: ComparisonConfig, seed: int) -> dict:
    """The same training written out per task with torch.autograd: MAML's Δ_t by differentiating
    through the inner loop, the pretrained network's gradient of the joint loss; Adam outside."""
    model, phi = initial_params(small_net, seed, "cpu", F64)
    params = {name: p.clone().requires_grad_() for name, p in phi.items()}
    optimizer = torch.optim.Adam(params.values(), lr=cfg.outer_lr)
    generator = torch.Generator().manual_seed(seed)
    family = gbml.SinusoidTasks()
    for _ in range(cfg.iterations):
        tasks = family.sample(cfg.meta_batch, cfg.shots, cfg.queries, generator, dtype=F64)
        optimizer.zero_grad()
        if method == "pretrained":
            x = torch.cat([tasks.x_support, tasks.x_query], dim=1).reshape(-1, 1)
            y = torch.cat([tasks.y_support, tasks.y_query], dim=1).reshape(-1, 1)
            nn.functional.mse_loss(functional_call(model, params, (x,)), y).backward()
        else:
            for t in range(cfg.meta_batch):
                xs, ys, xq, yq = tasks.task(t)
                theta = adapted_params(
                    model,
                    nn.functional.mse_loss,
                    params,
                    xs,
                    ys,
                    cfg.inner_lr,
                    cfg.inner_steps,
                    create_graph=True,
                )
                query = nn.functional.mse_loss(functional_call(model, theta, (xq,)), yq) / cfg.meta_batch
                query.backward()
        optimizer.step()
    return {name: p.detach() for name, p in params.items()}


@pytest.mark.parametrize("method", ["MAML", "pretrained"])
def test_meta_train_equals_a_per_task_autograd_loop(method):
    cfg = config()
    model, phi = initial_params(small_net, 1, "cpu", F64)
    trained = meta_train(method, cfg, gbml.make_loss(model), phi, gbml.SinusoidTasks(), 1, dtype=F64)
    expected = reference_training(method, cfg, 1)
    assert relative_error(trained, phi) > 1e-4  # it did move
    assert relative_error(trained, expected) < 1e-10


def test_test_losses_equal_a_per_task_loop():
    cfg = config()
    model, phi = initial_params(small_net, 0, "cpu", F64)
    tasks = gbml.SinusoidTasks().sample(4, cfg.shots, 5, torch.Generator().manual_seed(9), dtype=F64)
    losses = comparison.test_losses("pretrained", cfg, gbml.make_loss(model), phi, tasks)
    for t in range(4):
        xs, ys, xq, yq = tasks.task(t)
        theta = adapted_params(model, nn.functional.mse_loss, phi, xs, ys, cfg.inner_lr, cfg.inner_steps)
        with torch.no_grad():
            expected = nn.functional.mse_loss(functional_call(model, theta, (xq,)), yq)
        assert float(losses[t]) == pytest.approx(float(expected), rel=1e-12)


def test_a_diverging_method_raises():
    cfg = config(inner_lr=1e20, methods=("MAML",))  # float32 overflows in the first inner step
    with pytest.raises(gbml.DivergenceError):
        run_comparison(cfg, make_model=small_net)


@pytest.mark.filterwarnings("ignore:iMAML's conjugate gradient missed")  # 3 tiny tasks, 5 CG steps
def test_run_comparison_is_reproducible_and_paired():
    cfg = config(test_tasks=6, test_queries=5)
    first = run_comparison(cfg, make_model=small_net, dtype=F64)
    second = run_comparison(cfg, make_model=small_net, dtype=F64)
    assert first.after == second.after and first.before == second.before
    assert set(first.after) == set(cfg.methods) and all(len(v) == 2 for v in first.after.values())
    # the pretrained network is tested with MAML's loop, so its number is that loop's loss
    model, phi = initial_params(small_net, 0, "cpu", F64)
    trained = meta_train("pretrained", cfg, gbml.make_loss(model), phi, gbml.SinusoidTasks(), 0, dtype=F64)
    tests = gbml.SinusoidTasks().sample(
        6, cfg.shots, 5, torch.Generator().manual_seed(cfg.test_seed), dtype=F64
    )
    losses = comparison.test_losses("pretrained", cfg, gbml.make_loss(model), trained, tests)
    assert first.after["pretrained"][0] == pytest.approx(float(losses.mean()), rel=1e-12)
    mean, _ = first.difference("MAML", "pretrained")
    assert mean == pytest.approx(sum(first.after["MAML"]) / 2 - sum(first.after["pretrained"]) / 2)
