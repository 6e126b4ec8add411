import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gbml

ROOT = Path(__file__).resolve().parents[1]


def make_classification_task(generator, ways=3, shots=2, queries=3, image_size=28, num_tasks=None):
    """Random images and labels in float64, one task or a batch of ``num_tasks``."""
    lead = () if num_tasks is None else (num_tasks,)

    def images(n):
        return torch.randn(*lead, n, 1, image_size, image_size, generator=generator, dtype=torch.float64)

    def labels(n):
        return torch.arange(n).remainder(ways).expand(*lead, n).clone()

    return gbml.Task(
        images(ways * shots), labels(ways * shots), images(ways * queries), labels(ways * queries)
    )


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def conv_setup():
    """A narrow ConvNet (same architecture, 8 filters) in float64 with its cross-entropy loss."""
    torch.manual_seed(0)
    model = gbml.ConvNet(ways=3, hidden=8).double()
    return model, F.cross_entropy


@pytest.fixture
def mlp_setup():
    torch.manual_seed(0)
    model = gbml.SinusoidMLP().double()
    return model, F.mse_loss


@pytest.fixture(scope="session")
def built_book(tmp_path_factory) -> Path:
    """The book built with Sphinx warnings as errors; returns the folder of its HTML pages."""
    jupyter_book = shutil.which("jupyter-book", path=str(Path(sys.executable).parent))
    assert jupyter_book, "jupyter-book is not installed: run `make test`, which installs the book extras"
    output = tmp_path_factory.mktemp("book")
    result = subprocess.run(
        [jupyter_book, "build", str(ROOT), "--path-output", str(output), "--warningiserror", "--keep-going"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return output / "_build" / "html"
