"""The baseline without meta-learning that Finn et al. compare MAML with: *pretrain* one network on
all meta-training classes at once (ordinary classification), then *fine-tune* it on each test
task's support set.

:func:`pretrain` trains Finn et al.'s Omniglot network with one output per meta-training class
(4400 with rotations) on batches of random drawings; its body (everything but the head) is the
pretrained representation. :func:`evaluate_finetuning` gives each test task a new N-way head,
initialised to zero, and takes gradient steps on the support set, either on the head alone (a
logistic regression on the pretrained features) or on the whole network; it scores the same tasks
as :func:`gbml.training.evaluate` with the same seed. :func:`sweep_finetuning` scores a grid of
step sizes and step counts on the same tasks for about the cost of its longest run per step size.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, vmap

from gbml.adapt import check_learning_rate, check_steps, task_adapt
from gbml.errors import DivergenceError, check_positive_integer
from gbml.models import finn_omniglot_net, make_loss
from gbml.notebook import machine_description, source_revision
from gbml.omniglot import OmniglotTasks
from gbml.params import Params, detached
from gbml.tasks import Task
from gbml.training import groups_of_tasks, mean_and_ci95, save_checkpoint


@dataclass(frozen=True)
class PretrainConfig:
    """Joint training on every class of the meta-training split.

    Each step draws ``classes_per_batch`` classes (with replacement) and two drawings of each,
    a batch of 2 × ``classes_per_batch`` images, and takes an Adam step on their mean cross-entropy.
    """

    steps: int = 20000
    classes_per_batch: int = 32
    lr: float = 1e-3
    seed: int = 0
    split: str = "train"
    log_every: int = 100

    def __post_init__(self) -> None:
        for name in ("steps", "classes_per_batch", "log_every"):
            check_positive_integer(name, getattr(self, name))
        check_learning_rate("lr", self.lr)


def pretrain(
    config: PretrainConfig, family: OmniglotTasks, device: torch.device | str = "cpu"
) -> tuple[Params, dict[str, Any]]:
    """Train the network on all of ``family``'s classes; return its body's parameters (without
    the head) and a record: the configuration, the training loss and accuracy every
    ``log_every`` steps, wall time, machine, torch version and code commit."""
    device = torch.device(device)
    torch.manual_seed(config.seed)
    model = finn_omniglot_net(family.num_classes).to(device)
    # The wide head starts at zero: with Finn et al.'s N(0, 1) head over 4400 classes, a
    # 10,000-step run sat at the uniform loss log 4400 for its first 5,000 steps.
    torch.nn.init.zeros_(model.head.weight)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    curve, window, start = [], [], time.perf_counter()
    for step in range(1, config.steps + 1):
        classes = torch.randint(family.num_classes, (config.classes_per_batch, 1), generator=generator)
        pair = family.make_tasks((classes,), 1, 1, generator, device=device)  # two drawings per class
        x = torch.cat([pair.x_support, pair.x_query], dim=1).flatten(0, 1)
        y = classes.to(device).expand(-1, 2).flatten()  # the class itself is the label
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if not torch.isfinite(loss):
            raise DivergenceError(f"pretraining diverged at step {step} (loss {float(loss)}); lower lr")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        window.append((float(loss.detach()), float((logits.detach().argmax(-1) == y).float().mean())))
        if step % config.log_every == 0 or step == config.steps:
            curve.append(
                {
                    "step": step,
                    "loss": sum(w[0] for w in window) / len(window),
                    "accuracy": sum(w[1] for w in window) / len(window),
                }
            )
            window = []
    record = {
        "config": asdict(config),
        "classes": family.num_classes,
        "curve": curve,
        "elapsed_s": round(time.perf_counter() - start, 1),
        "machine": machine_description(device),
        "torch": str(torch.__version__),
        "source": source_revision(),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    body = {name: p.detach() for name, p in model.named_parameters() if not name.startswith("head.")}
    return body, record


def save_pretrained(path: str | Path, body: Params, record: dict[str, Any]) -> None:
    """Write the body's parameters and the record (loads with ``torch.load(weights_only=True)``)."""
    save_checkpoint(Path(path), {"body": {k: v.cpu() for k, v in body.items()}, "record": record})


def load_pretrained(path: str | Path, device: torch.device | str = "cpu") -> tuple[Params, dict[str, Any]]:
    """The body's parameters and the record written by :func:`save_pretrained`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no pretrained network at {path}: run python -m gbml pretrain first")
    state = torch.load(path, map_location=device, weights_only=True)
    return state["body"], state["record"]


#: A fine-tuning setting: (step size, number of gradient steps).
Setting = tuple[float, int]


def finetune_grid_logits(
    body: Params, tasks: Task, *, ways: int, grid: Iterable[Setting], whole_net: bool, batched: bool = True
) -> dict[Setting, Tensor]:
    """Every task's query logits (shape (T, queries, N)) after fine-tuning with each ``(lr, steps)``
    of ``grid``: a new zero-initialised N-way head (and with ``whole_net=True`` the body too) takes
    ``steps`` gradient steps of size ``lr`` on the mean support cross-entropy.

    Settings that share a step size share their first steps (10 steps of gradient descent are 3
    steps followed by 7), and head-only fine-tuning computes the body's features once per task for
    the whole grid, so a sweep costs about as much as its longest run per step size."""
    grid = list(dict.fromkeys(grid))
    if not grid:
        raise ValueError("grid is empty: give at least one (lr, steps)")
    for lr, steps in grid:
        check_learning_rate("lr", lr)
        check_steps("steps", steps)
    # For each step size, the step counts at which to score, in order: a run continues from the last.
    stops = {lr: sorted({steps for lr_, steps in grid if lr_ == lr}) for lr, _ in grid}
    reference = next(iter(body.values()))
    model = finn_omniglot_net(ways).to(reference.device, reference.dtype)
    loss = make_loss(model, F.cross_entropy)
    body = detached(body)
    head = {
        name: torch.zeros_like(p.detach()) for name, p in model.named_parameters() if name.startswith("head.")
    }

    features = {name[len("features.") :]: p for name, p in body.items() if name.startswith("features.")}

    def embed(x: Tensor) -> Tensor:  # the body's 64 features per image (batch norm over this batch)
        return functional_call(model.features, features, (x,)).mean(dim=(2, 3))

    def linear_loss(h: Params, f: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(F.linear(f, h["head.weight"], h["head.bias"]), y)

    def one(task: Task) -> Tensor:
        if whole_net:
            start, objective, support = {**body, **head}, loss, task.x_support

            def logits(theta: Params) -> Tensor:
                return functional_call(model, theta, (task.x_query,))
        else:
            # The body is fixed, so its features are computed once: a logistic regression on them.
            start, objective, support, query = head, linear_loss, embed(task.x_support), embed(task.x_query)

            def logits(h: Params) -> Tensor:
                return F.linear(query, h["head.weight"], h["head.bias"])

        scored = {}
        for lr, counts in stops.items():
            theta, done = start, 0
            for steps in counts:
                theta = task_adapt(
                    objective, theta, support, task.y_support, lr=lr, steps=steps - done, differentiable=False
                )
                done = steps
                scored[lr, steps] = logits(theta)
        return torch.stack([scored[setting] for setting in grid])

    if batched:
        values = vmap(one, randomness="error")(tasks)
    else:
        values = torch.stack([one(tasks.task(t)) for t in range(tasks.num_tasks)])
    return {setting: values[:, i] for i, setting in enumerate(grid)}


def finetune_grid_accuracies(
    body: Params, tasks: Task, *, ways: int, grid: Iterable[Setting], whole_net: bool, batched: bool = True
) -> dict[Setting, Tensor]:
    """Query accuracy of every task (shape (T,)) after fine-tuning with each ``(lr, steps)`` of
    ``grid``, as :func:`finetune_grid_logits` fine-tunes."""
    logits = finetune_grid_logits(body, tasks, ways=ways, grid=grid, whole_net=whole_net, batched=batched)
    dtype = next(iter(body.values())).dtype
    return {
        setting: (scores.argmax(dim=-1) == tasks.y_query).to(dtype).mean(dim=-1)
        for setting, scores in logits.items()
    }


def finetune_accuracies(
    body: Params, tasks: Task, *, ways: int, lr: float, steps: int, whole_net: bool, batched: bool = True
) -> Tensor:
    """Query accuracy of every task (shape (T,)) after fine-tuning a new zero-initialised N-way
    head (and with ``whole_net=True`` the body too) by ``steps`` gradient steps of size ``lr``
    on the mean support cross-entropy: :func:`finetune_grid_accuracies` at one setting."""
    grid = finetune_grid_accuracies(
        body, tasks, ways=ways, grid=[(lr, steps)], whole_net=whole_net, batched=batched
    )
    return grid[lr, steps]


def sweep_finetuning(
    body: Params,
    family: OmniglotTasks,
    *,
    shots: int,
    queries: int,
    grid: Iterable[Setting],
    whole_net: bool,
    num_tasks: int = 600,
    seed: int = 12345,
    chunk: int = 50,
    tasks_per_call: int | None = None,
) -> dict[Setting, dict[str, Any]]:
    """Mean query accuracy ± 95% CI of fine-tuning with every ``(lr, steps)`` of ``grid`` over
    the same ``num_tasks`` tasks of ``family``, drawn as :func:`gbml.training.evaluate` draws
    them (same seed and chunk: the same tasks) and fine-tuned ``tasks_per_call`` at a time as it
    does. The grid shares work as :func:`finetune_grid_accuracies` says."""
    check_positive_integer("num_tasks", num_tasks)
    grid = list(grid)  # read once per chunk: a generator would be empty after the first
    device = next(iter(body.values())).device
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    for start in range(0, num_tasks, chunk):
        tasks = family.sample(min(chunk, num_tasks - start), shots, queries, generator, device=device)
        for group in groups_of_tasks(tasks, tasks_per_call):
            chunks.append(
                finetune_grid_accuracies(body, group, ways=family.ways, grid=grid, whole_net=whole_net)
            )
    results = {}
    for setting in chunks[0]:
        values = torch.cat([c[setting] for c in chunks])
        mean, ci = mean_and_ci95(values)
        results[setting] = {
            "metric": "accuracy",
            "mean": mean,
            "ci95": ci,
            "tasks": num_tasks,
            "per_task": values.double().tolist(),
        }
    return results


def evaluate_finetuning(
    body: Params,
    family: OmniglotTasks,
    *,
    shots: int,
    queries: int,
    lr: float,
    steps: int,
    whole_net: bool,
    num_tasks: int = 600,
    seed: int = 12345,
    chunk: int = 50,
    tasks_per_call: int | None = None,
) -> dict[str, Any]:
    """Mean query accuracy ± 95% CI of fine-tuning over ``num_tasks`` tasks of ``family``, drawn
    as :func:`gbml.training.evaluate` draws them (same seed and chunk: the same tasks):
    :func:`sweep_finetuning` at one setting."""
    results = sweep_finetuning(
        body,
        family,
        shots=shots,
        queries=queries,
        grid=[(lr, steps)],
        whole_net=whole_net,
        num_tasks=num_tasks,
        seed=seed,
        chunk=chunk,
        tasks_per_call=tasks_per_call,
    )
    return results[lr, steps]


#: The (step size, steps) grids chapter 8 searches. Head-only fine-tuning is a logistic regression
#: on fixed features (cheap); the whole net costs a forward and backward pass per step, so its grid
#: is smaller.
FINETUNING_GRIDS: dict[bool, list[Setting]] = {
    False: [(lr, steps) for lr in (0.01, 0.03, 0.1, 0.5) for steps in (3, 10, 50)],
    True: [(lr, steps) for lr in (0.03, 0.1, 0.5) for steps in (3, 10)],
}


def choose_finetuning(
    body: Params,
    data: Any,
    settings: Iterable[tuple[int, int]],
    *,
    grids: dict[bool, list[Setting]] = FINETUNING_GRIDS,
    num_tasks: int = 100,
    seed: int = 1,
) -> dict[str, Any]:
    """For each ``(ways, shots)`` of ``settings`` and each of head-only and whole-net fine-tuning,
    the ``(lr, steps)`` of ``grids[whole_net]`` with the best mean query accuracy on ``num_tasks``
    validation tasks of ``data`` (K query images per class; :func:`sweep_finetuning` with ``seed``).

    Returns a JSON-ready record: ``"choices"``, one entry per setting and kind with the chosen
    ``lr`` and ``steps`` and every grid point's ``"validation"`` mean and CI, and what made it
    (tasks, seed, code commit, machine), so that a chapter can reuse a committed choice and say
    how it was made."""
    choices = []
    for ways, shots in settings:
        family = OmniglotTasks("val", ways, data=data)
        for whole_net in (False, True):
            sweep = sweep_finetuning(
                body,
                family,
                shots=shots,
                queries=shots,
                grid=grids[whole_net],
                whole_net=whole_net,
                num_tasks=num_tasks,
                seed=seed,
            )
            lr, steps = max(sweep, key=lambda setting: sweep[setting]["mean"])
            choices.append(
                {
                    "ways": ways,
                    "shots": shots,
                    "whole_net": whole_net,
                    "lr": lr,
                    "steps": steps,
                    "validation": [
                        {"lr": lr_, "steps": steps_, "mean": r["mean"], "ci95": r["ci95"]}
                        for (lr_, steps_), r in sweep.items()
                    ],
                }
            )
    device = next(iter(body.values())).device
    return {
        "validation_tasks": num_tasks,
        "seed": seed,
        "code": source_revision(),
        "machine": machine_description(device),
        "choices": choices,
    }


def finetuning_choice(record: dict[str, Any], ways: int, shots: int, whole_net: bool) -> Setting | None:
    """The ``(lr, steps)`` that :func:`choose_finetuning`'s ``record`` chose for a setting, or None
    if it has none."""
    for choice in record["choices"]:
        if (choice["ways"], choice["shots"], choice["whole_net"]) == (ways, shots, whole_net):
            return choice["lr"], choice["steps"]
    return None
