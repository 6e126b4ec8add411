"""The four meta-gradients written the way most PyTorch code does it: a Python loop over tasks
with the ``higher`` library's differentiable inner loop. Used only as a speed baseline (the
harness checks it agrees with gbml before timing it)."""

from __future__ import annotations

import higher
import torch

import gbml


def higher_meta_step(
    algorithm: gbml.MetaAlgorithm, model, criterion, tasks: gbml.Task, outer: torch.optim.Optimizer
):
    """Accumulate (1/T) Σ_t Δ_t into ``model``'s ``.grad`` and take one outer step."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for t in range(tasks.num_tasks):
        for acc, delta in zip(total, _task_delta(algorithm, model, criterion, tasks.task(t))):
            acc.add_(delta)
    for p, acc in zip(params, total):
        p.grad = acc / tasks.num_tasks
    outer.step()
    return [p.grad for p in params]


def _task_delta(algorithm, model, criterion, task):
    xs, ys, xq, yq = task
    inner = torch.optim.SGD(model.parameters(), lr=algorithm.inner_lr)
    if isinstance(algorithm, gbml.MAML | gbml.FOMAML):
        second_order = isinstance(algorithm, gbml.MAML)
        with higher.innerloop_ctx(
            model, inner, copy_initial_weights=False, track_higher_grads=second_order
        ) as (
            fmodel,
            diffopt,
        ):
            for _ in range(algorithm.inner_steps):
                diffopt.step(criterion(fmodel(xs), ys))
            query_loss = criterion(fmodel(xq), yq)
            wrt = model.parameters() if second_order else fmodel.parameters()
            return torch.autograd.grad(query_loss, list(wrt))
    if isinstance(algorithm, gbml.Reptile):
        x_all, y_all = task.joined()
        with higher.innerloop_ctx(model, inner, track_higher_grads=False) as (fmodel, diffopt):
            for _ in range(algorithm.inner_steps):
                diffopt.step(criterion(fmodel(x_all), y_all))
            return [p.detach() - q.detach() for p, q in zip(model.parameters(), fmodel.parameters())]
    if isinstance(algorithm, gbml.IMAML):
        return _imaml_delta(algorithm, model, criterion, task, inner)
    raise TypeError(type(algorithm))


def _imaml_delta(algorithm, model, criterion, task, inner):
    xs, ys, xq, yq = task
    anchor = [p.detach() for p in model.parameters()]
    with higher.innerloop_ctx(model, inner, track_higher_grads=False) as (fmodel, diffopt):
        for _ in range(algorithm.inner_steps):
            proximal = sum(((q - a) ** 2).sum() for q, a in zip(fmodel.parameters(), anchor))
            diffopt.step(criterion(fmodel(xs), ys) + 0.5 * algorithm.lam * proximal)
        theta = [q.detach().requires_grad_() for q in fmodel.parameters()]
    fmodel_params = theta

    def loss_at(params, x, y):
        return criterion(fmodel(x, params=params), y)

    g_val = torch.autograd.grad(loss_at(fmodel_params, xq, yq), fmodel_params)
    g_train = torch.autograd.grad(loss_at(fmodel_params, xs, ys), fmodel_params, create_graph=True)

    def matvec(v):
        hv = torch.autograd.grad(g_train, fmodel_params, grad_outputs=v, retain_graph=True)
        return [(1 + algorithm.damping) * vi + hi / algorithm.lam for vi, hi in zip(v, hv)]

    # Conjugate gradient on lists of tensors, as the iMAML reference code does it.
    x = [torch.zeros_like(g) for g in g_val]
    r = [g.clone() for g in g_val]
    p = [g.clone() for g in g_val]
    rr = sum((ri * ri).sum() for ri in r)
    for _ in range(algorithm.cg_steps):
        ap = matvec(p)
        alpha = rr / sum((pi * api).sum() for pi, api in zip(p, ap))
        x = [xi + alpha * pi for xi, pi in zip(x, p)]
        r = [ri - alpha * api for ri, api in zip(r, ap)]
        rr_new = sum((ri * ri).sum() for ri in r)
        p = [ri + (rr_new / rr) * pi for ri, pi in zip(r, p)]
        rr = rr_new
    return [xi.detach() for xi in x]
