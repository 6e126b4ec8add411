"""Reptile's Δ = φ − θ_t against plain gradients and the closed form on a quadratic."""

import pytest
import torch
from torch import nn

import gbml
from gbml.training import TrainConfig
from reference import clone_params, linear_regression_quantities, loss_gradient, relative_error


def test_one_step_on_the_whole_data_is_a_scaled_gradient(generator, mlp_setup):
    model, criterion = mlp_setup
    task = gbml.SinusoidTasks().sample(1, 5, 10, generator, dtype=torch.float64).task(0)
    phi = clone_params(model)
    delta, _ = gbml.Reptile(inner_lr=0.02, inner_steps=1).task_delta(
        gbml.make_loss(model, criterion), phi, task
    )
    x_all = torch.cat([task.x_support, task.x_query])
    y_all = torch.cat([task.y_support, task.y_query])
    expected = {k: 0.02 * g for k, g in loss_gradient(model, criterion, phi, x_all, y_all).items()}
    assert relative_error(delta, expected) < 1e-12


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_matches_closed_form_on_a_quadratic(steps, generator):
    """On ℓ(w) = mean((Xw − y)²) over all the task's data, gradient descent contracts towards the
    least-squares solution w*: w_L − w* = (I − αH)^L (φ − w*), so Δ = φ − w_L = (I − (I − αH)^L)(φ − w*)."""
    dim = 4
    model = nn.Linear(dim, 1, bias=False).double()
    task = gbml.LinearRegressionTasks(dim=dim).sample(1, 6, 8, generator, dtype=torch.float64).task(0)
    phi = clone_params(model)
    delta, _ = gbml.Reptile(inner_lr=0.1, inner_steps=steps).task_delta(gbml.make_loss(model), phi, task)

    x_all = torch.cat([task.x_support, task.x_query])
    y_all = torch.cat([task.y_support, task.y_query])
    hessian, b = linear_regression_quantities(x_all, y_all)
    w_star = torch.linalg.solve(hessian, b)
    contraction = torch.linalg.matrix_power(torch.eye(dim, dtype=torch.float64) - 0.1 * hessian, steps)
    expected = (torch.eye(dim, dtype=torch.float64) - contraction) @ (phi["weight"].T - w_star)
    assert relative_error(delta["weight"], expected.T) < 1e-12


def test_zero_steps_give_zero_update(generator, mlp_setup):
    model, criterion = mlp_setup
    task = gbml.SinusoidTasks().sample(1, 5, 5, generator, dtype=torch.float64).task(0)
    delta, _ = gbml.Reptile(inner_lr=0.1, inner_steps=0).task_delta(
        gbml.make_loss(model, criterion), clone_params(model), task
    )
    assert all(float(d.abs().max()) == 0.0 for d in delta.values())


def _class_major_task(generator, ways=3, shots=2, queries=3):
    """A float64 image task whose examples are grouped by class (all of class 0 first), as
    Omniglot tasks are, so that the minibatch order has something to interleave."""

    def part(per_class):
        x = torch.randn(ways * per_class, 1, 28, 28, generator=generator, dtype=torch.float64)
        return x, torch.arange(ways).repeat_interleave(per_class)

    return gbml.Task(*part(shots), *part(queries))


def _hand_minibatch_reptile(
    model, task, lr, steps, batch, optimizer="sgd", support_only=False, carried=None, beta1=0.0
):
    """Nichol et al.'s inner loop written out: class-interleaved order, consecutive blocks,
    cycling, one SGD step per block (or one step of torch.optim.Adam with β₁ = 0, started
    afresh, or with ``carried=(theta, adam)`` their one optimiser: θ reset to φ, Adam's state
    kept; ``beta1`` for other first-moment decays); autograd on the module, no torch.func.
    Returns φ − θ."""
    x = task.x_support if support_only else torch.cat([task.x_support, task.x_query])
    y = task.y_support if support_only else torch.cat([task.y_support, task.y_query])
    by_class = {int(c): [i for i in range(len(y)) if int(y[i]) == c] for c in y.unique()}
    order = [
        members[r]
        for r in range(max(map(len, by_class.values())))
        for c, members in sorted(by_class.items())
        if r < len(members)
    ]
    x, y = x[order], y[order]
    names = [name for name, _ in model.named_parameters()]
    if carried is None:
        theta = [p.detach().clone().requires_grad_() for p in model.parameters()]
        adam = torch.optim.Adam(theta, lr=lr, betas=(beta1, 0.999), eps=1e-8, foreach=False)
    else:
        theta, adam = carried
        with torch.no_grad():
            for t, p in zip(theta, model.parameters(), strict=True):
                t.copy_(p)
    for step in range(steps):
        block = [(step * batch + i) % len(y) for i in range(batch)]
        logits = torch.func.functional_call(model, dict(zip(names, theta, strict=True)), (x[block],))
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, y[block]), theta)
        if optimizer == "adam":
            for t, g in zip(theta, grads, strict=True):
                t.grad = g
            adam.step()
        else:
            theta = [(t - lr * g).detach().requires_grad_() for t, g in zip(theta, grads, strict=True)]
    return {
        name: p.detach() - t.detach() for (name, p), t in zip(model.named_parameters(), theta, strict=True)
    }


@pytest.mark.parametrize("steps", [1, 4, 7])
def test_minibatch_steps_are_nichols_inner_loop(steps, generator, conv_setup):
    model, criterion = conv_setup
    task = _class_major_task(generator)  # 15 examples: blocks of 6 cycle through them
    delta, info = gbml.Reptile(inner_lr=0.1, inner_steps=steps, inner_batch=6).task_delta(
        gbml.make_loss(model, criterion), clone_params(model), task
    )
    assert relative_error(delta, _hand_minibatch_reptile(model, task, 0.1, steps, 6)) < 1e-12
    assert info["query_loss"].dim() == 0 and torch.isfinite(info["query_loss"])


@pytest.mark.parametrize("steps", [1, 4, 7])
def test_adam_inner_steps_are_torch_adam_with_beta1_zero(steps, generator, conv_setup):
    """Nichol et al.'s inner optimiser: against torch.optim.Adam on the module's parameters.

    Adam's step α g/(|g| + eps) magnifies rounding in g by up to α/eps where |g| is near eps, so
    float64 agreement is ~1e-9 here, not 1e-12; a wrong moment or bias correction is O(1)."""
    model, criterion = conv_setup
    task = _class_major_task(generator)
    loss, phi = gbml.make_loss(model, criterion), clone_params(model)
    reptile = gbml.Reptile(inner_lr=0.01, inner_steps=steps, inner_batch=6, inner_optimizer="adam")
    delta, info = reptile.task_delta(loss, phi, task)
    expected = _hand_minibatch_reptile(model, task, 0.01, steps, 6, optimizer="adam")
    assert relative_error(delta, expected) < 1e-8 and torch.isfinite(info["query_loss"])
    # Not the SGD answer: the optimiser matters (a test that could fail).
    assert relative_error(delta, _hand_minibatch_reptile(model, task, 0.01, steps, 6)) > 0.1
    # Full batches, at meta-training (support and query) and at meta-test (support only).
    full = gbml.Reptile(inner_lr=0.01, inner_steps=steps, inner_optimizer="adam")
    whole, _ = full.task_delta(loss, phi, task)
    assert (
        relative_error(whole, _hand_minibatch_reptile(model, task, 0.01, steps, 15, optimizer="adam")) < 1e-8
    )
    theta = full.adapt(loss, phi, *task.support)
    adapted = {
        name: phi[name] - d
        for name, d in _hand_minibatch_reptile(
            model, task, 0.01, steps, 6, optimizer="adam", support_only=True
        ).items()
    }
    assert relative_error(theta, adapted) < 1e-8


@pytest.mark.parametrize("steps", [1, 4])
def test_adam_inner_steps_with_a_first_moment_are_torch_adam(steps, generator, conv_setup):
    """β₁ > 0 takes the general moment update (β₁ = 0 skips it): against torch.optim.Adam too."""
    model, criterion = conv_setup
    task = _class_major_task(generator)
    loss, phi = gbml.make_loss(model, criterion), clone_params(model)
    reptile = gbml.Reptile(
        inner_lr=0.01, inner_steps=steps, inner_batch=6, inner_optimizer="adam", betas=(0.9, 0.999)
    )
    delta, _ = reptile.task_delta(loss, phi, task)
    expected = _hand_minibatch_reptile(model, task, 0.01, steps, 6, optimizer="adam", beta1=0.9)
    assert relative_error(delta, expected) < 1e-8
    if steps > 1:  # from the second step on, the first moment is not the gradient
        beta1_zero = _hand_minibatch_reptile(model, task, 0.01, steps, 6, optimizer="adam")
        assert relative_error(delta, beta1_zero) > 1e-3


def test_adam_inner_steps_vmap_equals_loop(generator, conv_setup):
    model, criterion = conv_setup
    loss, phi = gbml.make_loss(model, criterion), clone_params(model)
    tasks = gbml.Task(
        *(torch.stack(parts) for parts in zip(*(_class_major_task(generator) for _ in range(3)), strict=True))
    )
    reptile = gbml.Reptile(inner_lr=0.01, inner_steps=4, inner_batch=6, inner_optimizer="adam")
    batched, _ = gbml.meta_gradient(reptile, loss, phi, tasks, batched=True)
    looped, _ = gbml.meta_gradient(reptile, loss, phi, tasks, batched=False)
    assert relative_error(batched, looped) < 1e-8  # Adam magnifies rounding near eps (see above)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"inner_optimizer": "rmsprop"}, "inner_optimizer must be 'sgd' or 'adam'"),
        ({"betas": (1.0, 0.999)}, "betas must be two numbers in"),
        ({"betas": (0.0,)}, "betas must be two numbers in"),
        ({"eps": 0.0}, "eps must be a positive number"),
    ],
)
def test_invalid_adam_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        gbml.Reptile(inner_lr=0.1, **{"inner_optimizer": "adam", **options})


def test_a_minibatch_of_the_whole_task_is_the_full_batch_step(generator, conv_setup):
    model, criterion = conv_setup
    task = _class_major_task(generator)
    loss, phi = gbml.make_loss(model, criterion), clone_params(model)
    full, _ = gbml.Reptile(inner_lr=0.1, inner_steps=3).task_delta(loss, phi, task)
    whole, _ = gbml.Reptile(inner_lr=0.1, inner_steps=3, inner_batch=15).task_delta(loss, phi, task)
    assert relative_error(whole, full) < 1e-12


def test_minibatch_vmap_equals_loop(generator, conv_setup):
    model, criterion = conv_setup
    loss, phi = gbml.make_loss(model, criterion), clone_params(model)
    tasks = gbml.Task(
        *(torch.stack(parts) for parts in zip(*(_class_major_task(generator) for _ in range(3)), strict=True))
    )
    reptile = gbml.Reptile(inner_lr=0.1, inner_steps=4, inner_batch=6)
    batched, _ = gbml.meta_gradient(reptile, loss, phi, tasks, batched=True)
    looped, _ = gbml.meta_gradient(reptile, loss, phi, tasks, batched=False)
    assert relative_error(batched, looped) < 1e-10


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_meta_test_minibatches_cycle_through_the_support_set(optimizer, generator, conv_setup):
    """adapt_batch: at meta-test each step takes the next block of the class-interleaved support
    set, cycling (Nichol et al.'s eval_batch, in a fixed order where theirs reshuffles), from fresh
    moments or from a carried state; against the loop written out. A block of the whole support set
    is the full-batch step."""
    model, criterion = conv_setup
    task = _class_major_task(generator)
    loss, phi = gbml.make_loss(model, criterion), clone_params(model)
    support = len(task.y_support)
    lr = 0.01 if optimizer == "adam" else 0.1
    options = {"inner_lr": lr, "inner_steps": 5, "inner_optimizer": optimizer, "inner_batch": 6}
    adapted = gbml.Reptile(**options, adapt_batch=4).adapt(loss, phi, *task.support)
    hand = _hand_minibatch_reptile(model, task, lr, 5, 4, optimizer=optimizer, support_only=True)
    assert relative_error(adapted, {name: phi[name] - d for name, d in hand.items()}) < 1e-8
    whole = gbml.Reptile(**options).adapt(loss, phi, *task.support)
    assert relative_error(adapted, whole) > 1e-3  # the blocks matter (a test that could fail)
    # (in another order: the sum's rounding differs, which Adam's g/(|g| + eps) magnifies)
    one_block = gbml.Reptile(**options, adapt_batch=support).adapt(loss, phi, *task.support)
    assert relative_error(one_block, whole) < 1e-8
    if optimizer == "adam":  # from a carried state, as Nichol et al.'s evaluation
        theta, adam = _nichols_optimizer(model, lr)
        _hand_minibatch_reptile(model, task, lr, 3, 6, optimizer="adam", carried=(theta, adam))
        state = gbml.InnerAdamState(
            {name: adam.state[t]["exp_avg"] for name, t in zip(phi, theta, strict=True)},
            {name: adam.state[t]["exp_avg_sq"] for name, t in zip(phi, theta, strict=True)},
            3,
        )
        carried = gbml.Reptile(**options, adapt_batch=4, start_state=state).adapt(loss, phi, *task.support)
        hand = _hand_minibatch_reptile(
            model, task, lr, 5, 4, optimizer="adam", support_only=True, carried=(theta, adam)
        )
        assert relative_error(carried, {name: phi[name] - d for name, d in hand.items()}) < 1e-8
    # The evaluation path batches test tasks with vmap.
    tasks = gbml.Task(*(torch.stack(parts) for parts in zip(task, _class_major_task(generator), strict=True)))
    reptile = gbml.Reptile(**options, adapt_batch=4)
    batched = torch.func.vmap(lambda t: reptile.adapt(loss, phi, *t.support), randomness="error")(tasks)
    assert relative_error({name: v[0] for name, v in batched.items()}, adapted) < 1e-10
    # TrainConfig's eval_inner_batch is Reptile's adapt_batch, and Reptile's alone.
    config = TrainConfig(algorithm="reptile", inner_optimizer=optimizer, inner_lr=lr, eval_inner_batch=4)
    assert config.make_algorithm().adapt_batch == 4
    with pytest.raises(ValueError, match="eval_inner_batch is Reptile's"):
        TrainConfig(algorithm="maml", eval_inner_batch=4)
    # On Omniglot a minibatch that does not fit is refused when the run is set up, not at its first
    # validation: meta-test steps draw from the N·K support images, training steps from N·(K+Q).
    omniglot = {"algorithm": "reptile", "dataset": "omniglot", "ways": 5, "shots": 1, "queries": 9}
    assert TrainConfig(**omniglot, inner_batch=50, eval_inner_batch=5).eval_inner_batch == 5
    with pytest.raises(ValueError, match="eval_inner_batch 10 is more than the 5 images"):
        TrainConfig(**omniglot, eval_inner_batch=10)
    with pytest.raises(ValueError, match="inner_batch 51 is more than the 50 images"):
        TrainConfig(**omniglot, inner_batch=51)
    with pytest.raises(ValueError, match="adapt_batch must be a positive integer"):
        gbml.Reptile(inner_lr=0.1, adapt_batch=0)
    with pytest.raises(ValueError, match="minibatch of 7 is more than the task's 6 examples"):
        gbml.Reptile(**{**options, "inner_batch": None}, adapt_batch=7).adapt(loss, phi, *task.support)


@pytest.mark.parametrize("bad", [0, -2, 2.5, True])
def test_invalid_inner_batch_is_refused(bad):
    with pytest.raises(ValueError, match="inner_batch"):
        gbml.Reptile(inner_lr=0.1, inner_steps=2, inner_batch=bad)


def test_an_inner_batch_larger_than_the_task_is_refused(generator, conv_setup):
    model, criterion = conv_setup
    with pytest.raises(ValueError, match="more than the task's 15 examples"):
        gbml.Reptile(inner_lr=0.1, inner_steps=2, inner_batch=16).task_delta(
            gbml.make_loss(model, criterion), clone_params(model), _class_major_task(generator)
        )


def test_inner_batch_belongs_to_reptile_only():
    with pytest.raises(ValueError, match="inner_batch is Reptile's"):
        TrainConfig(algorithm="maml", inner_batch=10)
    with pytest.raises(ValueError, match="inner_optimizer 'adam' is Reptile's"):
        TrainConfig(algorithm="maml", inner_optimizer="adam")
    algorithm = TrainConfig(algorithm="reptile", inner_optimizer="adam", inner_lr=1e-3).make_algorithm()
    assert algorithm.inner_optimizer == "adam" and algorithm.betas == (0.0, 0.999)


def _nichols_optimizer(model, lr):
    """Their code's single inner optimiser: fast weights and one torch.optim.Adam (β₁ = 0) over them."""
    theta = [p.detach().clone().requires_grad_() for p in model.parameters()]
    return theta, torch.optim.Adam(theta, lr=lr, betas=(0.0, 0.999), eps=1e-8, foreach=False)


def test_carried_inner_state_is_one_torch_adam_through_the_tasks(generator, conv_setup):
    """carried_meta_gradient against Nichol et al.'s training written out: the tasks in turn, θ
    reset to φ before each, one torch.optim.Adam whose moments and step count go on from task to
    task. Then meta-test adaptation from the carried state against a copy of that Adam."""
    import copy

    model, criterion = conv_setup
    loss, phi = gbml.make_loss(model, criterion), clone_params(model)
    task_list = [_class_major_task(generator) for _ in range(3)]
    tasks = gbml.Task(*(torch.stack(parts) for parts in zip(*task_list, strict=True)))
    reptile = gbml.Reptile(inner_lr=0.01, inner_steps=4, inner_batch=6, inner_optimizer="adam")
    start = gbml.InnerAdamState.zeros(phi)
    mean, info, end = gbml.carried_meta_gradient(reptile, loss, phi, tasks, start)

    theta, adam = _nichols_optimizer(model, 0.01)
    hand = [
        _hand_minibatch_reptile(model, t, 0.01, 4, 6, optimizer="adam", carried=(theta, adam))
        for t in task_list
    ]
    expected = {name: torch.stack([d[name] for d in hand]).mean(0) for name in phi}
    assert relative_error(mean, expected) < 1e-8 and info["query_loss"].shape == (3,)
    assert end.step == 12 and start.step == 0 and all(float(v.abs().max()) == 0 for v in start.v.values())
    hand_v = {name: adam.state[t]["exp_avg_sq"] for name, t in zip(phi, theta, strict=True)}
    assert relative_error(end.v, hand_v) < 1e-10
    # Carrying changes the second and third tasks' Δ (the first starts from zeros either way).
    fresh, _ = gbml.meta_gradient(reptile, loss, phi, tasks, batched=False)
    assert relative_error(mean, fresh) > 1e-3

    # Meta-test: a copy of their optimiser, support set only; the carried state is left as it was.
    test_task = _class_major_task(generator)
    snapshot = copy.deepcopy(adam.state_dict())
    evaluated = gbml.Reptile(inner_lr=0.01, inner_steps=5, inner_optimizer="adam", start_state=end)
    adapted = evaluated.adapt(loss, phi, *test_task.support)
    adam.load_state_dict(snapshot)
    hand_delta = _hand_minibatch_reptile(
        model, test_task, 0.01, 5, 6, optimizer="adam", support_only=True, carried=(theta, adam)
    )
    assert relative_error(adapted, {name: phi[name] - d for name, d in hand_delta.items()}) < 1e-8
    assert end.step == 12 and relative_error(end.v, hand_v) < 1e-10  # untouched by adapt
    # vmap over test tasks from the carried state agrees with the loop (the evaluation path).
    per_task = [evaluated.adapt(loss, phi, *t.support) for t in task_list]
    looped = {name: torch.stack([theta_t[name] for theta_t in per_task]) for name in phi}
    batched = torch.func.vmap(lambda t: evaluated.adapt(loss, phi, *t.support), randomness="error")(tasks)
    assert relative_error(batched, looped) < 1e-8


def test_a_carried_state_needs_adam():
    state = gbml.InnerAdamState.zeros({"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="start_state is the inner Adam's state"):
        gbml.Reptile(inner_lr=0.1, start_state=state)
    with pytest.raises(ValueError, match="carried inner state is Adam's"):
        gbml.Reptile(inner_lr=0.1).carried_task_delta(None, {}, None, state)
    with pytest.raises(TypeError, match="not MAML's"):
        gbml.carried_meta_gradient(gbml.MAML(inner_lr=0.1), None, {"w": torch.zeros(2)}, None, state)
    for options in (
        {"algorithm": "maml"},
        {"algorithm": "reptile"},  # plain gradient steps: nothing to carry
        {"algorithm": "reptile", "inner_optimizer": "adam", "batched": "compile"},
    ):
        with pytest.raises(ValueError, match="inner_state='carried'"):
            TrainConfig(**options, inner_state="carried")
    with pytest.raises(ValueError, match="inner_state must be"):
        TrainConfig(algorithm="reptile", inner_optimizer="adam", inner_state="kept")


def test_a_carried_state_round_trips_through_a_checkpoint(tmp_path):
    state = gbml.InnerAdamState({"w": torch.randn(3)}, {"w": torch.rand(3)}, 7)
    torch.save(state.state_dict(), tmp_path / "s.pt")
    again = gbml.InnerAdamState.from_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert (
        again.step == 7
        and torch.equal(again.m["w"], state.m["w"])
        and torch.equal(again.v["w"], state.v["w"])
    )
