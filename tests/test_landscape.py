"""gbml.landscape against closed forms and autograd, in float64."""

import math

import pytest
import torch
from torch import nn
from torch.func import grad, jacrev

import gbml
from gbml.landscape import QuadraticTask, ValleyTasks, quadratic

F64 = torch.float64


def linear_task(shots: int, seed: int = 0, dim: int = 4) -> QuadraticTask:
    family = gbml.LinearRegressionTasks(dim=dim, noise_std=0.3)
    return QuadraticTask(family.sample(1, shots, 5, torch.Generator().manual_seed(seed), dtype=F64).task(0))


def test_quadratic_is_the_gradient_and_hessian_of_the_mean_squared_error():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, generator=generator, dtype=F64)
    y = torch.randn(7, 1, generator=generator, dtype=F64)
    theta = torch.randn(3, 1, generator=generator, dtype=F64)
    H, b = quadratic(x, y)

    def mse(t):
        return ((x @ t - y) ** 2).mean()

    torch.testing.assert_close(grad(mse)(theta), H @ theta - b, rtol=1e-12, atol=0)
    torch.testing.assert_close(jacrev(grad(mse))(theta).reshape(3, 3), H, rtol=1e-12, atol=1e-14)


def test_quadratic_task_splits_spectrum_and_null_space():
    many, few = linear_task(shots=6), linear_task(shots=2)
    # all of the data: a weighted mean of the support (6 points) and query (5 points) quadratics
    torch.testing.assert_close(many.H_all, (6 * many.H + 5 * many.H_val) / 11)
    torch.testing.assert_close(many.b_all, (6 * many.b + 5 * many.b_val) / 11)
    U, h = many.eigenvectors, many.eigenvalues
    torch.testing.assert_close(U @ torch.diag(h) @ U.T, many.H)
    assert many.h_max == pytest.approx(float(torch.linalg.matrix_norm(many.H, ord=2)), rel=1e-12)
    assert (many.rank, few.rank) == (4, 2)  # at most one constraint per support point
    assert float(torch.linalg.matrix_norm(many.null_space_projector)) == 0.0
    P0 = few.null_space_projector
    torch.testing.assert_close(P0 @ P0, P0, rtol=0, atol=1e-12)
    torch.testing.assert_close(few.H @ P0, torch.zeros(4, 4, dtype=F64), rtol=0, atol=1e-12)
    assert float(torch.trace(P0)) == pytest.approx(2.0, abs=1e-12)
    x_support = few.task.x_support  # P₀ projects onto the inputs' orthogonal complement
    torch.testing.assert_close(x_support @ P0, torch.zeros_like(x_support), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shots", [6, 2])
@pytest.mark.parametrize("lam", [1e-2, 1.0, 1e2])
def test_converged_imaml_reaches_the_closed_form(shots, lam):
    task = linear_task(shots)
    model = nn.Linear(4, 1, bias=False).to(F64)
    phi = {"weight": torch.randn(1, 4, generator=torch.Generator().manual_seed(2), dtype=F64)}
    algorithm = task.converged_imaml(lam)
    delta, info = algorithm.task_delta(gbml.make_loss(model), phi, task.task)
    algorithm.diagnose(info)  # raises if CG missed its tolerance
    eye = torch.eye(4, dtype=F64)
    theta = torch.linalg.solve(task.H + lam * eye, task.b + lam * phi["weight"].T)  # proximal optimum
    expected = lam * torch.linalg.solve(task.H + lam * eye, task.H_val @ theta - task.b_val)
    torch.testing.assert_close(delta["weight"].T, expected, rtol=1e-10, atol=0)


def test_valley_tasks_geometry():
    family = ValleyTasks()
    angles = family.angles(torch.linspace(0, 1, 9, dtype=F64))
    assert float(angles[0]) == family.arc[0] and float(angles[-1]) == pytest.approx(family.arc[1])
    tasks, w = family.tasks(angles), family.optima(angles)
    torch.testing.assert_close(w.norm(dim=-1), torch.ones(9, dtype=F64))
    radius = tasks.x_support[:, 0].norm(dim=-1)
    assert (float(radius[0]), float(radius[-1])) == pytest.approx(family.radius)

    generator = torch.Generator().manual_seed(3)
    for t in range(9):
        support, query = tasks.task(t).support, tasks.task(t).query
        tangent = torch.stack([-w[t, 1], w[t, 0]])
        for s in (-2.0, 0.0, 0.7):  # the support loss is zero along the tangent line at w_t
            assert float(family.loss({"w": w[t] + s * tangent}, *support)) == pytest.approx(0, abs=1e-24)
        across = float(family.loss({"w": w[t] * 1.1}, *support))  # 0.1 across the valley: (0.1 r)²
        assert across == pytest.approx((0.1 * float(radius[t])) ** 2, rel=1e-12)
        theta = torch.randn(2, generator=generator, dtype=F64)  # the query loss is a round bowl
        bowl = family.query_scale**2 * float((theta - w[t]).pow(2).sum()) / 2
        assert float(family.loss({"w": theta}, *query)) == pytest.approx(bowl, rel=1e-12)

    phi = torch.tensor([0.3, -1.2], dtype=F64)  # distance to the tangent line wᵀθ = 1 (‖w‖ = 1)
    expected = (w @ phi - 1).abs()
    torch.testing.assert_close(family.valley_distance(phi, tasks), expected, rtol=1e-12, atol=0)
    assert math.isclose(float(family.valley_distance(w[4], tasks)[4]), 0.0, abs_tol=1e-15)
