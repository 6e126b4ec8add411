"""What the benchmark scripts share: the Omniglot-sized setting, random tasks, timing."""

from __future__ import annotations

import json
import platform
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import gbml
from gbml.notebook import synchronize, timed_calls

ALGORITHM_NAMES = ("maml", "fomaml", "reptile", "imaml")


@dataclass(frozen=True)
class Setting:
    """N-way K-shot classification of 28×28×1 images with Q query images per class.

    ``network="max_pool"`` is ``gbml.ConvNet`` (the miniImageNet-style conv4); ``"stride"`` is
    Finn et al.'s Omniglot network, ``gbml.finn_omniglot_net`` (about 3.7× fewer FLOPs per image).
    """

    ways: int = 5
    shots: int = 1
    queries: int = 15
    meta_batch: int = 32
    hidden: int = 64
    network: str = "max_pool"


def make_algorithm(name: str, steps: int) -> gbml.MetaAlgorithm:
    """The four algorithms with the MAML paper's Omniglot inner step size (α = 0.4)."""
    if name == "maml":
        return gbml.MAML(inner_lr=0.4, inner_steps=steps)
    if name == "fomaml":
        return gbml.FOMAML(inner_lr=0.4, inner_steps=steps)
    if name == "reptile":
        return gbml.Reptile(inner_lr=0.4, inner_steps=steps)
    if name == "imaml":
        # 5 CG steps as in the iMAML paper, all of them taken (cg_tol=0, so the timing does not
        # depend on when a solve converges), with warnings instead of errors for the residual.
        # At a random initialisation the conv net's Hessian has eigenvalues down to about −124
        # (Chapter 5), so λ = 200 keeps the proximal problem convex and I + H/λ positive
        # definite (then the higher baseline's plain CG computes the same Δ as gbml's), and the
        # step 1/(λ + 400) keeps gradient descent on it stable for any number of steps.
        lam = 200.0
        return gbml.IMAML(
            inner_lr=1 / (lam + 400), lam=lam, inner_steps=steps, cg_steps=5, cg_tol=0.0, on_cg_failure="warn"
        )
    raise ValueError(f"unknown algorithm {name!r}; choose from {ALGORITHM_NAMES}")


def make_model(setting: Setting, device: torch.device, dtype=torch.float32, conv: str = "native", seed=0):
    torch.manual_seed(seed)
    if setting.network == "stride":
        model = gbml.finn_omniglot_net(ways=setting.ways, hidden=setting.hidden, conv=conv)
    else:
        model = gbml.ConvNet(ways=setting.ways, hidden=setting.hidden, conv=conv)
    model = model.to(device=device, dtype=dtype)
    return model, gbml.make_loss(model, F.cross_entropy)


def make_tasks(setting: Setting, device: torch.device, dtype=torch.float32, seed: int = 0) -> gbml.Task:
    """Random images with balanced labels: the speed of a meta-step does not depend on the pixels."""
    g = torch.Generator().manual_seed(seed)
    t, n_support, n_query = setting.meta_batch, setting.ways * setting.shots, setting.ways * setting.queries

    def images(n):
        return torch.randn(t, n, 1, 28, 28, generator=g)

    def labels(n, per_class):
        return torch.arange(setting.ways).repeat_interleave(per_class).expand(t, n).clone()

    task = gbml.Task(
        images(n_support), labels(n_support, setting.shots), images(n_query), labels(n_query, setting.queries)
    )
    return gbml.Task(
        task.x_support.to(device, dtype),
        task.y_support.to(device),
        task.x_query.to(device, dtype),
        task.y_query.to(device),
    )


def configure(device: torch.device) -> None:
    """Settings every path is timed under: cuDNN picks the fastest algorithm for each shape
    (shapes are fixed), and float32 matrix products may use TF32 tensor cores, as cuDNN's
    convolutions already do by PyTorch's default."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")


def time_step(step, device: torch.device, iterations: int, warmup: int) -> dict:
    """Median wall time of ``step()`` over ``iterations`` after ``warmup`` calls, with the GPU
    synchronised before every clock read, and the peak GPU memory the step reached."""
    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = timed_calls(step, repeats=iterations, device=device)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "median_ms": 1000 * statistics.median(times),
        "min_ms": 1000 * min(times),
        "max_ms": 1000 * max(times),
        "iterations": iterations,
        "peak_memory_mib": peak,
    }


def time_steps_interleaved(steps: dict, device: torch.device, iterations: int, warmup: int) -> dict:
    """Like :func:`time_step` for several paths at once, alternating them call by call (in a
    rotating order) so that a drift in the machine's speed affects every path alike. Used to
    compare paths whose times are close; it reports no memory."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times = {name: [] for name in names}
    for i in range(iterations):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            times[name] += timed_calls(steps[name], repeats=1, device=device)
    return {
        name: {
            "median_ms": 1000 * statistics.median(t),
            "min_ms": 1000 * min(t),
            "max_ms": 1000 * max(t),
            "iterations": iterations,
            "peak_memory_mib": None,
            "interleaved": True,
        }
        for name, t in times.items()
    }


def machine_description(device: torch.device) -> dict:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cudnn"] = torch.backends.cudnn.version()
        info["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        info["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
        info["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    return info


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(
        json.dumps(
            payload, indent=2, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o)
        )
    )
    tmp.replace(path)


def result_grids(results: dict, skip_algorithms=()) -> list[tuple[str, list[str], list[tuple]]]:
    """The tables that the console and the book both show, as ``(title, paths, rows)`` with rows
    ``(algorithm, L, cells)`` of formatted strings: ms per meta-iteration, speed-ups over the
    loop and over higher, and peak GPU memory where it was measured."""
    rows = [r for r in results["rows"] if "error" not in r and r["algorithm"] not in skip_algorithms]
    paths = list(dict.fromkeys(r["path"] for r in rows))
    by_key: dict[tuple, dict] = {}
    for r in rows:
        by_key.setdefault((r["algorithm"], r["inner_steps"]), {})[r["path"]] = r

    def grid(columns, cell):
        return [
            (a, steps, [cell(c, p) if p in c else "–" for p in columns]) for (a, steps), c in by_key.items()
        ]

    grids = [("ms per meta-iteration (median)", paths, grid(paths, lambda c, p: f"{c[p]['median_ms']:.1f}"))]
    for baseline in ("loop", "higher"):
        if baseline in paths:
            others = [p for p in paths if p != baseline]
            speedups = [
                row
                for row in grid(
                    others, lambda c, p, b=baseline: f"{c[b]['median_ms'] / c[p]['median_ms']:.2f}×"
                )
                if baseline in by_key[(row[0], row[1])]
            ]
            grids.append((f"speed-up over {baseline} (its time / the path's)", others, speedups))
    if any("relative_difference_to_loop" in r for r in rows):
        # float32 paths differ from the loop by rounding (and TF32 on a GPU); a bug shows as ~1.
        grids.append(
            (
                "first meta-gradient against the loop's (relative difference)",
                paths,
                grid(paths, lambda c, p: f"{c[p].get('relative_difference_to_loop', float('nan')):.1e}"),
            )
        )
    if any(r.get("peak_memory_mib") is not None for r in rows):
        grids.append(
            ("peak GPU memory (MiB)", paths, grid(paths, lambda c, p: f"{c[p]['peak_memory_mib']:.0f}"))
        )
    return grids
