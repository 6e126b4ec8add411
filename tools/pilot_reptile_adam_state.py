"""Pilot: does Reptile's inner Adam need its state carried from task to task?

Nichol et al.'s code keeps one Adam optimiser (β₁ = 0) for the fast weights of every task, so its
second-moment estimate v averages squared gradients over thousands of steps and tasks.
``gbml.Reptile(inner_optimizer="adam")`` starts v afresh for every task, so that Δ_t depends on
φ and the task alone; then the first step is exactly lr · sign(g) and the next four are close to
it, whatever a weight's gradient scale. This script trains Reptile on 5-way 1-shot Omniglot with
the protocol of ``gbml.protocols.nichol_protocol`` both ways, from the same φ₀ on the same task
stream, sequentially (one task after another, as their code does), and validates on the same
200 tasks:

* ``fresh``: v reset for every task, at training and at test (``gbml.Reptile``'s rule; the first
  task's θ is checked against ``gbml.Reptile`` itself);
* ``carried``: one v for all training tasks; at test each task starts from the training v (their
  code evaluates with the optimiser state of the moment). Validated also with fresh test moments,
  to separate what the state does in training from what it does at test.

    GBML_DATA_DIR=... python tools/pilot_reptile_adam_state.py --iterations 2000 \\
        --out results/omniglot/pilots/reptile-adam-state.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from torch.func import grad

from gbml.algorithms.reptile import interleaved_by_class
from gbml.notebook import machine_description, source_revision
from gbml.params import detached, parameters_of
from gbml.protocols import nichol_protocol
from gbml.training import evaluate, make_problem, mean_and_ci95

BETA2, EPS = 0.999, 1e-8


class InnerAdam:
    """Adam with β₁ = 0 on a dict of tensors: the step is lr · g / (√v̂ + eps)."""

    def __init__(self, like: dict, lr: float) -> None:
        self.lr = lr
        self.v = {name: torch.zeros_like(p) for name, p in like.items()}
        self.t = 0

    def copy(self) -> InnerAdam:
        twin = InnerAdam(self.v, self.lr)
        twin.v = {name: v.clone() for name, v in self.v.items()}
        twin.t = self.t
        return twin

    def step(self, theta: dict, g: dict) -> dict:
        self.t += 1
        correction = 1 - BETA2**self.t
        stepped = {}
        for name in theta:
            self.v[name] = BETA2 * self.v[name] + (1 - BETA2) * g[name] ** 2
            stepped[name] = theta[name] - self.lr * g[name] / ((self.v[name] / correction).sqrt() + EPS)
        return stepped


def adapt(loss, phi, x, y, optimizer: InnerAdam, steps: int, batch: int | None) -> dict:
    """``steps`` Adam steps from φ on consecutive minibatches of the class-interleaved order."""
    if batch is not None:
        x, y = interleaved_by_class(x, y)
    gradient = grad(loss)
    theta = detached(phi)
    for step in range(steps):
        if batch is None:
            g = gradient(theta, x, y)
        else:
            block = [(step * batch + i) % len(x) for i in range(batch)]
            g = gradient(theta, x[block], y[block])
        theta = detached(optimizer.step(theta, g))
    return theta


def validate_with_state(config, problem, phi, state: InnerAdam, num_tasks: int, seed: int) -> dict:
    """Accuracy on the validation tasks that :func:`gbml.training.evaluate` draws (same seed, chunks
    of 50), each task adapted from a copy of ``state``."""
    generator = torch.Generator().manual_seed(seed)
    values = []
    for start in range(0, num_tasks, 50):
        tasks = problem.tasks["val"].sample(
            min(50, num_tasks - start), config.shots, config.evaluation_queries, generator
        )
        for t in range(tasks.num_tasks):
            task = tasks.task(t)
            theta = adapt(problem.loss, phi, *task.support, state.copy(), config.test_inner_steps, None)
            values.append(problem.metric(theta, *task.query))
    mean, ci = mean_and_ci95(torch.stack(values))
    return {"mean": mean, "ci95": ci, "tasks": num_tasks}


def train(variant: str, config, problem, phi0: dict, iterations: int, validate_every: int) -> list[dict]:
    phi = detached(phi0)
    generator = torch.Generator().manual_seed(config.seed)  # the committed run's task stream
    carried = InnerAdam(phi, config.inner_lr)
    curve, clock = [], time.perf_counter()
    for iteration in range(iterations):
        epsilon = config.outer_lr_at(iteration)  # annealed over the protocol's 100,000 iterations
        tasks = problem.tasks["train"].sample(config.meta_batch, config.shots, config.queries, generator)
        thetas = []
        for t in range(tasks.num_tasks):
            x, y = tasks.task(t).joined()
            optimizer = carried if variant == "carried" else InnerAdam(phi, config.inner_lr)
            theta = adapt(problem.loss, phi, x, y, optimizer, config.inner_steps, config.inner_batch)
            if iteration == 0 and t == 0 and variant == "fresh":
                reference = config.make_algorithm()._inner_loop(
                    problem.loss, phi, x, y, batch=config.inner_batch
                )[0]
                # Batch norm cancels a convolution's bias, so its gradient is rounding noise, which
                # Adam's normalisation turns into full-size steps: compare everything else.
                cancelled = {
                    f"{name}.bias" for name, m in problem.model.named_modules() if isinstance(m, nn.Conv2d)
                }
                error = max(float((theta[n] - reference[n]).abs().max()) for n in theta if n not in cancelled)
                assert error < 1e-5, f"the fresh variant differs from gbml.Reptile by {error}"
            thetas.append(theta)
        phi = {n: phi[n] + epsilon * (torch.stack([th[n] for th in thetas]).mean(0) - phi[n]) for n in phi}
        if (iteration + 1) % validate_every == 0:
            entry = {"iteration": iteration + 1, "elapsed_s": round(time.perf_counter() - clock, 1)}
            fresh_test = evaluate(
                config, phi, problem, split="val", num_tasks=config.validation_tasks, seed=config.seed + 1
            )
            entry["val_fresh_test_moments"] = {k: fresh_test[k] for k in ("mean", "ci95", "tasks")}
            if variant == "carried":
                entry["val_carried_test_moments"] = validate_with_state(
                    config, problem, phi, carried, config.validation_tasks, config.seed + 1
                )
            curve.append(entry)
            print(variant, json.dumps(entry), flush=True)
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--validate-every", type=int, default=1000)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    # Both variants are written out here; the config supplies the hyperparameters and, with a
    # fresh inner state, the check against gbml.Reptile and the fresh-moment validation.
    config = replace(nichol_protocol(5, 1), inner_state="fresh")
    device = torch.device("cpu")
    problem = make_problem(config, device)  # seeds torch with config.seed: the committed run's φ₀
    phi0 = detached(parameters_of(problem.model))
    record = {
        "what": "Reptile 5-way 1-shot, Nichol et al.'s protocol, inner Adam state fresh per task vs carried",
        "command": f"python tools/pilot_reptile_adam_state.py --iterations {args.iterations} "
        f"--validate-every {args.validate_every} --out {args.out}",
        "machine": machine_description(device),
        "source": source_revision(),
        "torch": torch.__version__,
    }
    for variant in ("fresh", "carried"):
        record[variant] = train(variant, config, problem, phi0, args.iterations, args.validate_every)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
