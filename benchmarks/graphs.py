"""The whole meta-step captured once as a CUDA graph and replayed (a benchmark baseline).

This was part of the library until the compiled step (:class:`gbml.compiled.CompiledMetaStep`,
``mode="reduce-overhead"``) covered it faster with PyTorch's own machinery; it stays here, outside
``gbml``, for the Performance appendix's comparisons.

After batching tasks with ``vmap`` a meta-step of the conv net is a few hundred small kernels;
launching them one by one from Python costs as much as running them. A CUDA graph records the
kernels of one step (the batched Δ_t, their mean, the optimizer update) and replays them with a
single launch. The price is fixed shapes: every batch must have the example batch's shapes.

**Checked on a GPU.** Run eagerly (``capture=False``) this class matches :func:`gbml.meta_step`
to 1e-10 in the CPU test suite. Captured on an H100 (torch 2.11, float64), every replay's
meta-gradient matched the eager step's at the same φ to 1e-15, on the capture batch and on new
ones, and the SGD update it applied was exact to 1e-17 (``benchmarks/check_gpu.py``, bisection).

**Adam inside a graph is PyTorch's capturable Adam, which is not quite eager Adam.** With
``capturable=True`` the step count t is a float32 tensor, so the bias corrections 1 − β^t are
computed in float32: 1 − 0.999 comes out 1.3e-5 too small, and the first steps are that much
longer than eager Adam's (which uses Python floats). Over three steps of a small float64 check this
moved the meta-gradients away from the loop's by up to 2.9e-1, because that check's meta-gradient
is not smooth at such changes; an eager run with float32 bias corrections reproduces those
figures on the CPU to three digits (``benchmarks/capturable_adam.py``). This is a property of the
optimizer, not of the capture: with SGD, or when comparing against capturable Adam, the graph is
exact. :class:`gbml.compiled.CompiledMetaStep` with ``mode="reduce-overhead"`` reaches CUDA graphs
by PyTorch's own machinery, steps the optimizer eagerly, and was faster on the H100.

Safety is kept otherwise: each replay also copies φ and the optimizer state into backup buffers
before updating them, so that if the step produced a NaN (or iMAML's solve missed its
tolerance) the update is undone and the same error as :func:`gbml.meta_step` is raised.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from gbml.adapt import LossFn
from gbml.algorithms.base import MetaAlgorithm
from gbml.errors import raise_if_not_finite
from gbml.meta import MetaStepResult, choose_batched, mean_delta_unchecked
from gbml.params import detached
from gbml.tasks import Task, check_task


class GraphedMetaStep:
    """A callable ``step(tasks) -> MetaStepResult`` equivalent to :func:`gbml.meta_step` with
    ``batched=True``, captured as a CUDA graph on first construction.

    Args:
        algorithm, loss: as for :func:`gbml.meta_step`.
        params: the leaf tensors the optimizer updates (all on one CUDA device).
        optimizer: any optimizer whose step makes no host synchronisation; Adam and AdamW must be
            built with ``capturable=True``.
        example_tasks: a batch with the shapes and dtypes every later batch will have.
        warmup_steps: eager steps before capture (they initialise lazily created state); their
            effect on φ and on the optimizer state is undone.
        capture: record a CUDA graph. With ``False`` (the default) the same step runs eagerly,
            which is how the CPU test suite checks this class.
    """

    def __init__(
        self,
        algorithm: MetaAlgorithm,
        loss: LossFn,
        params: Mapping[str, Tensor],
        optimizer: torch.optim.Optimizer,
        example_tasks: Task,
        *,
        warmup_steps: int = 3,
        capture: bool = False,
    ) -> None:
        check_task(example_tasks, batched=True)
        devices = {p.device for p in params.values()}
        if len(devices) != 1:
            raise ValueError(f"all parameters must be on one device, found {sorted(map(str, devices))}")
        device = devices.pop()
        self.capture = capture
        if capture and device.type != "cuda":
            raise ValueError("capture=True needs the parameters on a CUDA device")
        for group in optimizer.param_groups:
            if self.capture and group.get("capturable") is False:
                raise ValueError(
                    f"{type(optimizer).__name__} must be constructed with capturable=True to be "
                    "captured in a CUDA graph"
                )
        choose_batched(loss, params, True)  # refuses models with torch.nn batch norm
        self.algorithm, self.loss, self.params, self.optimizer = algorithm, loss, dict(params), optimizer
        self.tasks = Task(*(t.detach().clone() for t in example_tasks.to(device)))
        for p in self.params.values():
            if p.grad is None:
                p.grad = torch.zeros_like(p)

        initial = self._state_tensors()
        snapshot = {key: t.clone() for key, t in initial.items()}
        if self.capture:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(warmup_steps):
                    self._update()
            torch.cuda.current_stream(device).wait_stream(side)
        else:
            for _ in range(warmup_steps):
                self._update()
        self._backup = {key: t.clone() for key, t in self._state_tensors().items()}
        if self.capture:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._outputs = self._backed_up_update()
        # Undo the warm-up: state that existed is restored, state the warm-up created is zeroed
        # (a fresh Adam/AdamW/SGD state is all zeros).
        with torch.no_grad():
            for key, tensor in self._state_tensors().items():
                if key in snapshot:
                    tensor.copy_(snapshot[key])
                else:
                    tensor.zero_()

    def __call__(self, tasks: Task) -> MetaStepResult:
        for name, new, static in zip(Task._fields, tasks, self.tasks):
            if new.shape != static.shape or new.dtype != static.dtype:
                raise ValueError(
                    f"task.{name} is {tuple(new.shape)} {new.dtype}, but this graph was captured for "
                    f"{tuple(static.shape)} {static.dtype}"
                )
        for static, new in zip(self.tasks, tasks):
            static.copy_(new)
        if self.capture:
            self.graph.replay()
            mean, info, bad = self._outputs
        else:
            mean, info, bad = self._backed_up_update()
        try:
            raise_if_not_finite(mean, info, bad_count=bad)
            self.algorithm.diagnose(info)
        except Exception:
            self._restore_backup()
            raise
        return MetaStepResult(
            {k: v.clone() for k, v in mean.items()}, {k: v.clone() for k, v in info.items()}
        )

    def _state_tensors(self) -> dict[tuple, Tensor]:
        """φ and every tensor of the optimizer's state, keyed stably."""
        tensors: dict[tuple, Tensor] = {("param", name): p for name, p in self.params.items()}
        for name, p in self.params.items():
            for key, value in self.optimizer.state.get(p, {}).items():
                if isinstance(value, Tensor):
                    tensors[("state", name, key)] = value
        return tensors

    def _update(self):
        mean, info, bad = mean_delta_unchecked(self.algorithm, self.loss, detached(self.params), self.tasks)
        with torch.no_grad():
            for name, p in self.params.items():
                p.grad.copy_(mean[name])  # in place: the graph keeps the .grad tensors' addresses
        self.optimizer.step()
        return mean, info, bad

    def _backed_up_update(self):
        with torch.no_grad():
            for key, tensor in self._state_tensors().items():
                self._backup[key].copy_(tensor)
        return self._update()

    def _restore_backup(self) -> None:
        with torch.no_grad():
            for key, tensor in self._state_tensors().items():
                tensor.copy_(self._backup[key])
