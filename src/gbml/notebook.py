"""Small helpers shared by the book's notebooks: device choice, smoke mode, run description,
and the meters that measure memory, compute and time.

Every chapter starts with a papermill ``parameters`` cell holding ``device = "auto"`` and its
run sizes, then calls these so that ``SMOKE_TEST=1`` (set by the test suite) shrinks the run and
the output says which device and versions produced it.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from gbml.errors import check_positive_integer

T = TypeVar("T")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → the first CUDA GPU if there is one, else the CPU; anything else as given.

    Raises ``ValueError`` for a CUDA device when none is available, rather than failing later.
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda'") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but PyTorch sees no CUDA GPU; use 'auto' or 'cpu'")
    return resolved


def smoke_test() -> bool:
    """Whether the ``SMOKE_TEST`` environment variable asks for a tiny run (``1``/``true``/``yes``)."""
    return os.environ.get("SMOKE_TEST", "").strip().lower() in {"1", "true", "yes"}


def pick(full, smoke):
    """``smoke`` when running in smoke-test mode, otherwise ``full``."""
    return smoke if smoke_test() else full


def describe_run(device: torch.device) -> str:
    """One line naming the device and versions that produced a notebook's outputs."""
    if device.type == "cuda":
        where = f"GPU {torch.cuda.get_device_name(device)}"
    else:
        where = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    mode = "smoke test (reduced sizes)" if smoke_test() else "full run"
    return f"Outputs produced on {where}, torch {torch.__version__}, {mode}."


_RUN_DESCRIPTION = re.compile(
    r"^Outputs produced on (?P<device>.+), torch (?P<torch>\S+), (?P<mode>[^,]+)\.$"
)


def parse_run_description(line: str) -> dict[str, str] | None:
    """The parts of a :func:`describe_run` line (``device``, ``torch``, ``mode``), or None if
    ``line`` is not one; the reproducibility appendix reads committed notebooks with it."""
    match = _RUN_DESCRIPTION.match(line.strip())
    return match.groupdict() if match else None


def machine_description(device: torch.device) -> str:
    """The processor a run used, e.g. ``"GPU NVIDIA H200"`` or ``"CPU AMD EPYC, 1 thread"``."""
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            name = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = torch.get_num_threads()
    return f"CPU {name}, {threads} thread{'s' if threads > 1 else ''}"


def tf32_enabled() -> bool:
    """Whether float32 matrix products or convolutions may run in TF32 on a CUDA GPU (10-bit
    mantissa inputs, ~1e-3 relative error): PyTorch allows it for cuDNN convolutions by default."""
    return bool(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)


@contextmanager
def exact_float32() -> Iterator[None]:
    """Within the block, float32 matrix products and convolutions run in full float32 on CUDA
    GPUs (TF32 off); the previous settings come back after it. Training and evaluation use it so
    that a GPU run computes what the float32 checks check. (On a CPU the settings change nothing.)"""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


SOURCE_REVISION_ENV = "GBML_SOURCE_REVISION"


def source_revision(root: str | os.PathLike[str] | None = None) -> str | None:
    """The commit checked out at ``root`` (default: this package's checkout), flagged when
    ``src/`` differs from it: the code a run executes. None outside a git checkout.

    A copy of the tree without its git history (the lent GPU machine gets one) is told the commit
    by the environment variable ``GBML_SOURCE_REVISION``, set where the history is.
    """
    if os.environ.get(SOURCE_REVISION_ENV):
        return os.environ[SOURCE_REVISION_ENV]
    root = Path(root) if root is not None else Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=root)
        return result.stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        changes = git("status", "--porcelain", "--", "src")
    except (OSError, subprocess.CalledProcessError):  # not a git checkout
        return None
    return f"{commit} + uncommitted changes to src/" if changes else commit


# -- meters: memory, compute, time -------------------------------------------------------------


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storage allocated inside the ``with`` block and alive at once.

    Every operator's outputs are counted when created and uncounted when their storage is freed,
    so the peak covers everything a computation holds at its worst moment: iterates, activations
    saved for backward, CG's vectors. Inputs created before the block are not counted. It measures
    the same on every device (no allocator caching), which makes it the book's memory figure.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = id(storage)
                if key not in self._live:
                    self._live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.current)
        return out


class SavedTensorMeter:
    """Peak bytes of tensors that autograd holds for the backward pass (a ``with`` block).

    Counts what ``torch.autograd`` (not ``torch.func``) saves: each saved tensor from when the
    forward pass stores it until the graph releases it. A tensor saved twice counts twice.
    """

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0
        self._hooks = saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor) -> _Saved:
        nbytes = tensor.numel() * tensor.element_size()
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        box = _Saved(tensor)
        weakref.finalize(box, self._release, nbytes)  # runs when autograd drops the saved tensor
        return box

    @staticmethod
    def _unpack(box: _Saved) -> torch.Tensor:
        return box.tensor

    def _release(self, nbytes: int) -> None:
        self.current -= nbytes

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


class _Saved:
    __slots__ = ("__weakref__", "tensor")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def peak_memory(fn: Callable[[], T]) -> tuple[int, T]:
    """``(peak bytes, fn())``: :class:`PeakTensorMemory` of one call of ``fn``."""
    with PeakTensorMemory() as meter:
        result = fn()
    return meter.peak, result


def flop_count(fn: Callable[[], Any]) -> int:
    """Floating-point operations of one call of ``fn``, as PyTorch's FLOP counter counts them
    (matrix products and convolutions; elementwise operations count zero)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the GPU's queued work when ``device`` is a CUDA device (before reading a clock);
    nothing otherwise."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed_calls(
    fn: Callable[[], Any], *, repeats: int, device: torch.device | str | None = None
) -> list[float]:
    """The wall time of each of ``repeats`` calls of ``fn``, in seconds.

    The GPU (when ``device`` is one) is synchronised before each clock reading, so each time covers
    the work, not its launch. Time a warmed-up ``fn``: the first call may include compilation or
    allocation.
    """
    check_positive_integer("repeats", repeats)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def best_time(fn: Callable[[], Any], *, repeats: int = 5, device: torch.device | str | None = None) -> float:
    """The fastest of ``repeats`` :func:`timed_calls` of ``fn``, in seconds: the run least
    disturbed by other work on the machine."""
    return min(timed_calls(fn, repeats=repeats, device=device))
