"""Parameters as plain ``dict[str, Tensor]`` and the few operations the algorithms need on them.

Every algorithm in ``gbml`` treats a network's weights as a dictionary from parameter name to
tensor, applied through :func:`torch.func.functional_call`. Keeping them in a dictionary (rather
than inside an ``nn.Module``) is what lets one function serve both a single task and a batch of
tasks under :func:`torch.func.vmap`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

Params = dict[str, Tensor]
"""A network's parameters: name -> tensor, as returned by ``dict(model.named_parameters())``."""


def parameters_of(model: nn.Module) -> Params:
    """Return the model's trainable parameters as a name -> tensor dictionary (not copied)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def detached(params: Mapping[str, Tensor]) -> Params:
    """The same values, cut from any autograd graph (a stop-gradient)."""
    return {name: value.detach() for name, value in params.items()}


def tree_map(fn: Callable[..., Tensor], first: Mapping[str, Tensor], *rest: Mapping[str, Tensor]) -> Params:
    """Apply ``fn`` name by name: ``tree_map(f, a, b)[k] == f(a[k], b[k])``."""
    return {name: fn(value, *(other[name] for other in rest)) for name, value in first.items()}


def squared_distance(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """``‖a − b‖²`` summed over every parameter tensor."""
    return sum(((a[name] - b[name]) ** 2).sum() for name in a)


def flatten(params: Mapping[str, Tensor]) -> Tensor:
    """Concatenate every tensor into one vector (in the dictionary's order)."""
    return torch.cat([value.reshape(-1) for value in params.values()])


def unflatten(vector: Tensor, like: Mapping[str, Tensor]) -> Params:
    """Inverse of :func:`flatten`: cut ``vector`` into tensors shaped like ``like``'s."""
    out, start = {}, 0
    for name, value in like.items():
        out[name] = vector[start : start + value.numel()].reshape(value.shape)
        start += value.numel()
    if start != vector.numel():
        raise ValueError(f"vector has {vector.numel()} entries but the parameters hold {start}")
    return out
