"""Errors raised instead of returning a silently wrong answer, and the checks that raise them."""

from __future__ import annotations

import torch
from torch import Tensor


class DivergenceError(FloatingPointError):
    """A loss or meta-gradient became NaN or infinite during meta-training."""


class ConvergenceError(RuntimeError):
    """An iterative solve (iMAML's conjugate gradient) stopped short of its tolerance."""


class MissingDataError(FileNotFoundError):
    """A data set's files are neither on disk nor downloadable; the message says how to get them."""


class CorruptDataError(ValueError):
    """A data set's files are present but their content is not what it should be."""


def non_finite_entries(deltas: dict[str, Tensor], info: dict[str, Tensor]) -> Tensor:
    """How many of the Δ tensors and floating-point diagnostics hold a NaN or an infinity
    (a 0-d tensor; computed without synchronising with the host)."""
    checks = [*deltas.values(), *(v for v in info.values() if v.is_floating_point())]
    return torch.stack([~torch.isfinite(v).all() for v in checks]).sum()


def raise_if_not_finite(
    deltas: dict[str, Tensor], info: dict[str, Tensor], bad_count: Tensor | None = None
) -> None:
    """Raise :class:`DivergenceError` if any Δ or loss is NaN or infinite."""
    if bad_count is None:
        bad_count = non_finite_entries(deltas, info)
    if int(bad_count) == 0:
        return
    bad = [f"Δ[{name}]" for name, d in deltas.items() if not bool(torch.isfinite(d).all())]
    bad += [key for key, v in info.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    losses = info["query_loss"].reshape(-1)
    raise DivergenceError(
        f"meta-training diverged: {', '.join(bad) or 'another process'} contain NaN or infinite values "
        f"(query losses of the batch: {losses.tolist()[:8]}{' …' if losses.numel() > 8 else ''}). "
        "The learning rates are probably too large; φ was left unchanged."
    )


def check_positive_integer(name: str, value: object) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an ``int`` ≥ 1 (``True`` is not a count)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
