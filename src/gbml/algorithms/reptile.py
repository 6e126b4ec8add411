"""Reptile (Nichol et al., 2018): move φ towards the task's adapted parameters::

    θ_t = TASK_ADAPT(φ, D_t)      (L steps on the task's whole data, support and query)
    Δ_t = φ − θ_t

Handed to an optimizer as a gradient, φ ← φ − ε Δ_t = φ + ε (θ_t − φ). With L = 1,
Δ_t = α ∇ℓ(φ; D_t): plain joint training on all tasks. The interesting behaviour comes
from L > 1 (see the book's Reptile chapter for the Taylor expansion).

Nichol et al. take each inner step on a *minibatch* of D_t (``inner_batch``): step k uses the
k-th block of ``inner_batch`` examples, cycling (Nichol et al. choose L · inner_batch equal to the
task's number of examples: one pass over its data). The examples are first put in class-interleaved
order (the first drawing of every class, then the second, ...), so each minibatch holds every class
about equally often.

Their inner optimiser is Adam with β₁ = 0 (``inner_optimizer="adam"``): each step is
θ ← θ − α m̂/(√v̂ + eps), with m and v running averages of g and g² (β₁, β₂) and m̂, v̂ their bias
corrections, as ``torch.optim.Adam`` computes them. By default every task's inner loop (training
and test) starts with fresh moments, so that Δ_t depends on φ and D_t alone and tasks can be
batched. Their code keeps one optimiser for all tasks, its moments carried from task to task and
into meta-testing; :class:`InnerAdamState` is that state, :meth:`Reptile.carried_task_delta`
threads it through training (:func:`gbml.meta.carried_meta_gradient`, tasks in turn), and
``Reptile(start_state=...)`` adapts from it at test.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.func import grad_and_value

from gbml.adapt import LossFn, check_learning_rate, task_adapt
from gbml.algorithms.base import GradientStepAlgorithm, TaskInfo
from gbml.params import Params, detached
from gbml.tasks import Task


def interleaved_by_class(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The examples reordered as (first example of each class, in class order), (second of each),
    ...: the order in which consecutive blocks are balanced across classes. Needs integer labels;
    free of data-dependent Python control flow, so it works under ``vmap``."""
    if y.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"inner_batch needs integer class labels, got labels of dtype {y.dtype}")
    one_hot = torch.nn.functional.one_hot(y.long(), num_classes=y.shape[0])  # labels < #examples
    occurrence = (one_hot.cumsum(dim=0) * one_hot).sum(dim=1) - 1  # how many earlier of this class
    order = torch.argsort(occurrence * y.shape[0] + y, stable=True)
    return x[order], y[order]


INNER_OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class InnerAdamState:
    """The inner Adam's moment estimates (name → tensor) and how many steps it has taken.

    Bias corrections use the step count, so a state carried over many tasks has corrections near
    1, and its second moment v averages g² over thousands of steps of earlier tasks."""

    m: Params
    v: Params
    step: int = 0

    @classmethod
    def zeros(cls, like: Params) -> InnerAdamState:
        """A fresh optimiser's state for parameters shaped like ``like``."""
        return cls(
            {name: torch.zeros_like(p) for name, p in like.items()},
            {name: torch.zeros_like(p) for name, p in like.items()},
        )

    def state_dict(self) -> dict:
        """Plain tensors and an int, for ``torch.save(..., weights_only=True)`` checkpoints."""
        return {"m": dict(self.m), "v": dict(self.v), "step": self.step}

    @classmethod
    def from_state_dict(cls, state: dict, device: torch.device | str | None = None) -> InnerAdamState:
        """The inverse of :meth:`state_dict` (tensors moved to ``device`` if given)."""
        return cls(
            {name: t.to(device) for name, t in state["m"].items()},
            {name: t.to(device) for name, t in state["v"].items()},
            int(state["step"]),
        )


@dataclass(frozen=True)
class Reptile(GradientStepAlgorithm):
    """Reptile with ``inner_steps`` (L) steps of size ``inner_lr`` (α), each on all of D_t
    (``inner_batch=None``) or on the next ``inner_batch`` examples of it (Nichol et al.'s
    minibatches); plain gradient steps (``inner_optimizer="sgd"``) or Adam's (``"adam"``), with
    ``betas`` and ``eps``. Adam starts every task, at meta-training and at meta-test, from
    ``start_state``: fresh moments if None, or a state carried from training (Nichol et al.'s
    evaluation; see :meth:`carried_task_delta`). At meta-test, :meth:`adapt` steps on the whole
    support set, or on the next ``adapt_batch`` examples of it (Nichol et al.'s ``eval_batch``)."""

    inner_steps: int = 5
    inner_batch: int | None = None
    adapt_batch: int | None = None
    inner_optimizer: str = "sgd"
    betas: tuple[float, float] = (0.0, 0.999)  # Nichol et al.'s β₁ = 0
    eps: float = 1e-8
    start_state: InnerAdamState | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("inner_batch", "adapt_batch"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.inner_optimizer not in INNER_OPTIMIZERS:
            raise ValueError(f"inner_optimizer must be 'sgd' or 'adam', got {self.inner_optimizer!r}")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        check_learning_rate("eps", self.eps)
        if self.frozen:  # Δ = φ − θ would be 0 for them: they would never be learned
            raise ValueError("Reptile learns only what its inner loop adapts: frozen must be empty")
        if self.start_state is not None and self.inner_optimizer != "adam":
            raise ValueError("start_state is the inner Adam's state: it needs inner_optimizer='adam'")

    def adapt(self, loss: LossFn, phi: Params, x: Tensor, y: Tensor) -> Params:
        """L steps of the inner optimiser on the support set (at test the query set is unseen): on
        all of it, or on consecutive minibatches of ``adapt_batch`` examples in class-interleaved
        order, cycling."""
        if self.inner_optimizer == "sgd" and self.adapt_batch is None:
            return super().adapt(loss, phi, x, y)
        return self._inner_loop(loss, phi, x, y, batch=self.adapt_batch, start=self.start_state)[0]

    def task_delta(self, loss: LossFn, phi: Params, task: Task) -> tuple[Params, TaskInfo]:
        x_all, y_all = task.joined()
        if self.inner_batch is None and self.inner_optimizer == "sgd":
            theta = task_adapt(
                loss,
                phi,
                x_all,
                y_all,
                lr=self.inner_lr,
                steps=self.inner_steps,
                differentiable=False,
                validate=False,  # checked once, when the algorithm was built
            )
            # Reptile trains on the query set too, so this is a training loss, reported for monitoring.
            return self._delta(phi, theta), {"query_loss": loss(theta, *task.query)}
        theta, last_batch_loss, _ = self._inner_loop(
            loss, phi, x_all, y_all, batch=self.inner_batch, start=self.start_state
        )
        # The loss of the last inner (mini)batch comes with its gradient: monitoring at no extra
        # forward pass (it is a training loss either way, since Reptile trains on D_t's query set).
        return self._delta(phi, theta), {"query_loss": last_batch_loss}

    def carried_task_delta(
        self, loss: LossFn, phi: Params, task: Task, state: InnerAdamState
    ) -> tuple[Params, TaskInfo, InnerAdamState]:
        """Δ_t with the inner Adam started from ``state``, and the state it ends in.

        Nichol et al.'s training: one optimiser serves every task in turn, so each task's inner
        loop starts where the previous task's ended (:func:`gbml.meta.carried_meta_gradient`).
        Δ_t then depends on the tasks before it, and a meta-batch runs as a loop, not a vmap."""
        if self.inner_optimizer != "adam":
            raise ValueError("a carried inner state is Adam's: build Reptile with inner_optimizer='adam'")
        x_all, y_all = task.joined()
        theta, last_batch_loss, end = self._inner_loop(
            loss, phi, x_all, y_all, batch=self.inner_batch, start=state
        )
        return self._delta(phi, theta), {"query_loss": last_batch_loss}, end

    def _inner_loop(
        self,
        loss: LossFn,
        phi: Params,
        x: Tensor,
        y: Tensor,
        *,
        batch: int | None,
        start: InnerAdamState | None = None,
    ) -> tuple[Params, Tensor, InnerAdamState | None]:
        """θ after L steps (each on the next ``batch`` examples, or on all with None), the loss of
        the last step's batch, and (Adam) the optimiser's state after them, which began at
        ``start`` (None: fresh moments). ``start`` itself is not modified."""
        size = x.shape[0]
        if batch is not None:
            if batch > size:
                raise ValueError(f"a minibatch of {batch} is more than the task's {size} examples")
            x, y = interleaved_by_class(x, y)
        gradient_and_loss = grad_and_value(loss)
        theta = detached(phi)
        adam = self.inner_optimizer == "adam"  # plain steps need no moments: allocate none
        if adam and start is None:
            start = InnerAdamState.zeros(theta)
        if self.inner_steps == 0:
            return theta, loss(theta, x[:batch], y[:batch]).detach(), start
        moments = {name: (start.m[name], start.v[name]) for name in theta} if adam else {}
        for step in range(self.inner_steps):
            if batch is None:
                g, batch_loss = gradient_and_loss(theta, x, y)
            else:
                block = [(step * batch + i) % size for i in range(batch)]
                g, batch_loss = gradient_and_loss(theta, x[block], y[block])
            if adam:
                theta = detached(self._adam_step(theta, g, moments, start.step + step + 1))
            else:
                theta = detached({name: theta[name] - self.inner_lr * g[name] for name in theta})
        if not adam:
            return theta, batch_loss.detach(), None
        end = InnerAdamState(
            {name: m.detach() for name, (m, _) in moments.items()},
            {name: v.detach() for name, (_, v) in moments.items()},
            start.step + self.inner_steps,
        )
        return theta, batch_loss.detach(), end

    def _adam_step(self, theta: Params, g: Params, moments: dict, t: int) -> Params:
        """One Adam step (the t-th), updating ``moments`` (name → (m, v)) in place."""
        beta1, beta2 = self.betas
        stepped = {}
        for name in theta:
            m, v = moments[name]
            # With Nichol et al.'s β₁ = 0 the first moment is the gradient itself, bit for bit: skipping
            # its four elementwise passes makes a 50-step meta-test about a quarter faster on a CPU.
            m = g[name] if beta1 == 0 else beta1 * m + (1 - beta1) * g[name]
            v = beta2 * v + (1 - beta2) * g[name] * g[name]
            moments[name] = (m, v)
            m_hat = m if beta1 == 0 else m / (1 - beta1**t)
            v_hat = v / (1 - beta2**t)
            stepped[name] = theta[name] - self.inner_lr * m_hat / (v_hat.sqrt() + self.eps)
        return stepped

    @staticmethod
    def _delta(phi: Params, theta: Params) -> Params:
        return {name: phi[name] - theta[name] for name in phi}
