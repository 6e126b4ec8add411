"""Small helpers shared by the book's notebooks: device choice, smoke mode, run description.

Every chapter starts with a papermill ``parameters`` cell holding ``device = "auto"`` and its
run sizes, then calls these so that ``SMOKE_TEST=1`` (set by the test suite) shrinks the run and
the output says which device and versions produced it.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path

import torch


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
