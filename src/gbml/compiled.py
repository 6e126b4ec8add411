"""The batched meta-step compiled with :func:`torch.compile`.

:func:`gbml.meta_step` with ``batched=True`` runs one ``vmap`` call, which PyTorch executes op by
op: a few hundred small kernels per meta-iteration for the conv net, each launched from Python.
:class:`CompiledMetaStep` hands the same function, :func:`gbml.meta.per_task_deltas` followed by
the mean over tasks, to :func:`torch.compile`. TorchDynamo traces it once (inner loop, meta-gradient
and all: every derivative is taken inside the function, so the traced program is a plain forward
computation) and TorchInductor fuses its elementwise work, such as the batch norms. With
``mode="reduce-overhead"`` on a CUDA device, PyTorch also records the compiled program as CUDA
graphs and replays them with one launch per step, copying new inputs into place first: this is
PyTorch's own, tested route to what ``GraphedMetaStep`` (``benchmarks/graphs.py``) does by hand.

The price is compilation: 1 to 1.5 minutes for the conv net's MAML step on a 2-core CPU (a few
seconds when TorchInductor's on-disk cache already holds the program), paid at the first call and
again for every new shape of tasks. The outer optimizer runs eagerly, as in
:func:`gbml.meta_step` (on a GPU, ``torch.optim.Adam(..., fused=True)`` updates all parameters
in one kernel).

The test suite checks the compiled step against the per-task loop in float64 on the CPU, and
``benchmarks/check_gpu.py`` did the same on an H100 (2.2e-15, and 2.5e-15 with CUDA graphs, over
three steps). For MAML at one inner step it was 1.3× faster than the loop on a 2-core CPU at a
meta-batch of 4, and 52× faster than ``higher`` on the H100 at a meta-batch of 32 (55× with CUDA
graphs; the book's Performance appendix).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from gbml.adapt import LossFn
from gbml.algorithms.base import MetaAlgorithm, TaskInfo
from gbml.errors import raise_if_not_finite
from gbml.meta import MetaStepResult, apply_meta_gradient, choose_batched, mean_delta_unchecked
from gbml.params import Params, detached
from gbml.tasks import Task, check_task

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _own_copy(fn: Callable) -> Callable:
    """``fn`` with a code object of its own.

    TorchDynamo keeps its compiled programs on the code object of the function it compiles, and
    after a few different programs for one code object (8 by default) it stops compiling and
    runs the function eagerly. Every :class:`CompiledMetaStep` (another algorithm, another
    model) needs its own program, so each compiles its own copy of :func:`gbml.meta.mean_delta_unchecked`.
    """
    return types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )


class CompiledMetaStep:
    """``step(tasks) -> MetaStepResult``: :func:`gbml.meta_step` with ``batched=True``, compiled.

    Args:
        algorithm, loss: as for :func:`gbml.meta_step`.
        params: the leaf tensors the optimizer updates (e.g. ``gbml.parameters_of(model)``).
        optimizer: any ``torch.optim`` optimizer over ``params``.
        mode: :func:`torch.compile`'s mode. ``"reduce-overhead"`` adds CUDA graphs on a GPU (and
            is the same as ``"default"`` on a CPU).

    Calls check the tasks, raise :class:`~gbml.errors.DivergenceError` on NaN or infinite
    values and let iMAML report its conjugate-gradient solves, exactly as :func:`gbml.meta_step`
    does, and leave φ and the optimizer untouched when they raise. Models with a ``torch.nn``
    batch norm are refused, as for the vmap path.
    """

    def __init__(
        self,
        algorithm: MetaAlgorithm,
        loss: LossFn,
        params: Mapping[str, Tensor],
        optimizer: torch.optim.Optimizer,
        *,
        mode: str = "default",
    ) -> None:
        if mode not in COMPILE_MODES:
            raise ValueError(f"mode must be one of {COMPILE_MODES}, got {mode!r}")
        if not params:
            raise ValueError("params holds no parameters")
        choose_batched(loss, params, True)  # refuses models with torch.nn batch norm
        self.algorithm, self.loss, self.params, self.optimizer = algorithm, loss, dict(params), optimizer
        self.mode = mode
        self._compiled = torch.compile(
            _own_copy(mean_delta_unchecked), mode=mode, fullgraph=True, dynamic=False
        )

    def meta_gradient(self, tasks: Task) -> tuple[Params, TaskInfo]:
        """The mean Δ over the batch and the per-task diagnostics, as :func:`gbml.meta_gradient`."""
        check_task(tasks, batched=True)
        if self.mode in ("reduce-overhead", "max-autotune"):
            # A new step for PyTorch's CUDA graphs: their outputs from the last call may be reused.
            torch.compiler.cudagraph_mark_step_begin()
        mean, info, bad = self._compiled(self.algorithm, self.loss, detached(self.params), tasks)
        # Copies: outputs that live in a CUDA graph's memory are overwritten by the next replay.
        mean = {name: d.clone() for name, d in mean.items()}
        info = {key: v.clone() for key, v in info.items()}
        raise_if_not_finite(mean, info, bad_count=bad)
        self.algorithm.diagnose(info)
        return mean, info

    def __call__(self, tasks: Task) -> MetaStepResult:
        delta, info = self.meta_gradient(tasks)
        return apply_meta_gradient(self.params, delta, info, self.optimizer)
