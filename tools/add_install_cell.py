"""Give chapter notebooks a first code cell that installs gbml where it is missing (e.g. on Colab).

    python tools/add_install_cell.py                         # every chapter, book/[0-9][0-9]_*.ipynb
    python tools/add_install_cell.py book/07_sinusoid.ipynb  # only these notebooks

The cell goes before the first code cell (the papermill ``parameters`` cell), tagged ``hide-cell``
so the book shows it folded, with no outputs. A notebook whose first code cell already is the
install cell is left alone, so the script can be re-run after papermill rewrites a chapter.
Everything else in the notebook (outputs, metadata, whether the file ends with a newline) is kept;
``ruff format`` runs on the notebooks that changed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from notebooks import chapters, ruff_format  # tools/ is on sys.path when run as a script

MARKER = 'find_spec("gbml")'  # the install cell is the first code cell containing this
CELL_ID = "install-gbml"
SOURCE = """\
# Colab and other fresh environments lack gbml: install it from the book's repository (no-op here).
import importlib.util
import subprocess
import sys

if importlib.util.find_spec("gbml") is None:
    package = "gbml @ git+https://github.com/gbml-book/gbml-book"
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", package])"""


def install_cell() -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(SOURCE, metadata={"tags": ["hide-cell"]})
    cell.id = CELL_ID
    return cell


def add_install_cell(path: Path) -> bool:
    """Insert the install cell into the notebook at ``path``; False if it was already there."""
    raw = path.read_text(encoding="utf-8")
    notebook = nbformat.reads(raw, as_version=4)
    code = [i for i, cell in enumerate(notebook.cells) if cell.cell_type == "code"]
    if not code:
        raise SystemExit(f"{path}: no code cell")
    first = notebook.cells[code[0]]
    if MARKER in first.source:
        return False
    if "parameters" not in first.metadata.get("tags", []):
        raise SystemExit(f"{path}: the first code cell is not the papermill `parameters` cell")
    if any(cell.get("id") == CELL_ID for cell in notebook.cells):
        raise SystemExit(f"{path}: a cell with id {CELL_ID!r} exists but is not the first code cell")
    notebook.cells.insert(code[0], install_cell())
    nbformat.validate(notebook)
    text = nbformat.writes(notebook)
    # nbformat.write would always end the file with a newline; keep the file's own ending.
    path.write_text(text + "\n" if raw.endswith("\n") else text, encoding="utf-8")
    return True


def main(argv: list[str]) -> None:
    paths = [Path(arg).resolve() for arg in argv] or chapters()
    changed = [path for path in paths if add_install_cell(path)]
    for path in paths:
        print(f"{path}: {'install cell added' if path in changed else 'already has the install cell'}")
    if changed:
        ruff_format(changed)


if __name__ == "__main__":
    main(sys.argv[1:])
