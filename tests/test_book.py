"""The book builds to HTML with Sphinx warnings treated as errors."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_book_builds_without_warnings(tmp_path):
    jupyter_book = shutil.which("jupyter-book", path=str(Path(sys.executable).parent))
    assert jupyter_book, "jupyter-book is not installed: run `make test`, which installs the book extras"
    result = subprocess.run(
        [
            jupyter_book,
            "build",
            str(ROOT),
            "--path-output",
            str(tmp_path),
            "--warningiserror",
            "--keep-going",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    html = tmp_path / "_build" / "html"
    assert (html / "book" / "intro.html").is_file()
    api = (html / "book" / "api.html").read_text()
    assert "conjugate_gradient" in api and "Δ_t" in api  # docstrings made it into the reference
