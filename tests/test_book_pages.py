"""What a course needs from every chapter: launch and download buttons, an install cell, exercises
with solutions, and a Reproducibility appendix that matches the committed notebooks."""

import html
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
REPOSITORY = "gbml-book/gbml-book"
BRANCH = "main"
CHAPTERS = sorted((ROOT / "book").glob("0*_*.ipynb"))


def load_tool(name: str):
    """A script of tools/ as a module (tools/ is not a package), importing its siblings as it
    does when run as a script."""
    if str(ROOT / "tools") not in sys.path:
        sys.path.insert(0, str(ROOT / "tools"))
    spec = importlib.util.spec_from_file_location(f"gbml_tools_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nine_chapters():
    assert [path.name[:2] for path in CHAPTERS] == [f"{i:02d}" for i in range(1, 10)]


# -- launch and download buttons ------------------------------------------------------------------


def test_chapter_pages_have_launch_and_download_buttons(built_book):
    pages = sorted((built_book / "book").glob("0*_*.html"))
    in_toc = re.findall(r"file:\s*book/(0\d_\w+)", (ROOT / "_toc.yml").read_text())
    assert in_toc and sorted(in_toc) == [page.stem for page in pages]
    for page in pages:
        links = {html.unescape(href) for href in re.findall(r'href="([^"]+)"', page.read_text())}
        notebook = f"book/{page.stem}.ipynb"
        colab = f"https://colab.research.google.com/github/{REPOSITORY}/blob/{BRANCH}/{notebook}"
        binder = f"https://mybinder.org/v2/gh/{REPOSITORY}/{BRANCH}?urlpath=tree/{notebook}"
        assert colab in links, f"{page.name}: no Colab link to {notebook}"
        assert binder in links, f"{page.name}: no Binder link to {notebook}"
        download = f"../_sources/{notebook}"
        assert download in links, f"{page.name}: no download link for {notebook}"
        assert (built_book / "_sources" / notebook).is_file(), f"{download} is missing from the build"


def test_reproducibility_page_is_built(built_book):
    page = (built_book / "book" / "reproducibility.html").read_text()
    for path in CHAPTERS:
        assert path.stem in page


# -- the chapter notebooks ------------------------------------------------------------------------


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda path: path.stem)
def test_chapter_notebook_structure(path):
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    install, parameters = code[0], code[1]

    # the first code cell installs gbml only where it is missing, folded away in the book
    assert 'find_spec("gbml")' in install.source and "pip" in install.source, install.source
    assert "hide-cell" in install.metadata.get("tags", [])
    assert install.outputs == []

    # then the papermill parameters, with the device chosen at run time
    assert "parameters" in parameters.metadata.get("tags", [])
    assert re.search(r'^device = "auto"', parameters.source, re.MULTILINE), parameters.source
    # and no second, injected one: papermill's values live in the notebook's metadata
    assert not [c for c in notebook.cells if "injected-parameters" in c.metadata.get("tags", [])]

    # exercises, with solutions folded in dropdowns and at least one solution checked by an assert
    markdown = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "markdown")
    assert markdown.count("**Exercise") >= 2
    assert markdown.count(":class: dropdown") >= 2
    solutions = [cell for cell in code[1:] if "hide-cell" in cell.metadata.get("tags", [])]
    assert any("assert" in cell.source for cell in solutions), "no hidden solution cell with an assert"


def test_install_cell_script_is_idempotent(tmp_path):
    tool = load_tool("add_install_cell")
    copy = tmp_path / CHAPTERS[0].name
    copy.write_bytes(CHAPTERS[0].read_bytes())
    assert tool.add_install_cell(copy) is False  # the committed chapter has it already
    assert copy.read_bytes() == CHAPTERS[0].read_bytes()

    notebook = nbformat.read(copy, as_version=4)
    del notebook.cells[[cell.get("id") for cell in notebook.cells].index(tool.CELL_ID)]
    nbformat.write(notebook, copy)
    assert tool.add_install_cell(copy) is True
    assert tool.add_install_cell(copy) is False
    restored = nbformat.read(copy, as_version=4).cells
    committed = nbformat.read(CHAPTERS[0], as_version=4).cells
    assert [cell.source for cell in restored] == [cell.source for cell in committed]
    assert [cell.get("outputs") for cell in restored[1:]] == [cell.get("outputs") for cell in committed[1:]]


# -- the Reproducibility appendix -----------------------------------------------------------------


def test_reproducibility_table_is_current():
    tool = load_tool("notebooks")
    committed = tool.TABLE.read_text(encoding="utf-8")
    assert committed == tool.reproducibility_table(), (
        "book/_generated/reproducibility_table.md is stale: run `python tools/notebooks.py page`"
    )


def test_reproducibility_record_never_invents_versions(tmp_path):
    tool = load_tool("notebooks")
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["language_info"] = {"name": "python", "version": "3.11.7"}
    notebook.metadata["papermill"] = {
        "start_time": "2026-01-02T03:04:05.000000+00:00",
        "duration": 125.4,
        "parameters": {"device": "cuda"},
        "version": "2.7.0",
    }
    line = "Outputs produced on GPU NVIDIA H100 80GB HBM3, torch 2.11.0+cu130, full run.\n"
    cell = nbformat.v4.new_code_cell("print(describe_run(device))")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="other\n" + line)]
    notebook.cells = [cell]
    path = tmp_path / "01_x.ipynb"
    nbformat.write(notebook, path)

    record = tool.chapter_record(path)
    assert record["device"] == "GPU NVIDIA H100 80GB HBM3"
    assert record["sizes"] == "full run"
    assert record["parameters"] == '`device="cuda"`'
    assert record["started"] == "2026-01-02 03:04 UTC"
    assert record["run_time"] == "2 min 05 s"
    assert (record["python"], record["torch"], record["papermill"]) == (
        "`3.11.7`",
        "`2.11.0+cu130`",
        "`2.7.0`",
    )
    for key in ("numpy", "matplotlib", "gbml", "platform", "cuda_device", "source"):
        assert record[key] == tool.NOT_RECORDED

    notebook.metadata["gbml_environment"] = {"numpy": "2.4.6", "cuda_device": None}
    nbformat.write(notebook, path)
    record = tool.chapter_record(path)
    assert record["numpy"] == "`2.4.6`" and record["cuda_device"] == "`none`"
    assert record["python"] == "`3.11.7`" and record["torch"] == "`2.11.0+cu130`"
    assert record["gbml"] == tool.NOT_RECORDED  # a key missing from the stamp is not made up either


def test_source_revision_names_the_commit_and_flags_uncommitted_source(tmp_path, monkeypatch):
    tool = load_tool("notebooks")

    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "m.py").write_text("x = 1\n")
    (tmp_path / "notes.md").write_text("a\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    commit = git("rev-parse", "--short=12", "HEAD").strip()
    monkeypatch.setattr(tool, "ROOT", tmp_path)
    monkeypatch.delenv("GBML_SOURCE_REVISION", raising=False)

    assert tool.source_revision() == commit
    (tmp_path / "notes.md").write_text("b\n")  # outside src/: not the code a chapter runs
    assert tool.source_revision() == commit
    (tmp_path / "src" / "m.py").write_text("x = 2\n")
    assert tool.source_revision() == f"{commit} + uncommitted changes to src/"
    monkeypatch.setattr(tool, "ROOT", tmp_path / "src" / "missing")  # not a checkout at all
    assert tool.source_revision() is None
    monkeypatch.setenv("GBML_SOURCE_REVISION", "abc123def456")  # a copy told its commit
    assert tool.source_revision() == "abc123def456"


# -- Part I is read, not scrolled -----------------------------------------------------------------


def test_chapter_size_counts_prose_and_shown_code(tmp_path):
    tool = load_tool("chapter_size")
    assert tool.prose_words("Two words $\\alpha + \\beta$ and $$x = y$$ `code` <b>bold</b>") == 5
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_markdown_cell("one two three"),
        nbformat.v4.new_code_cell("a = 1\n\nb = 2"),
        nbformat.v4.new_code_cell("c = 3", metadata={"tags": ["hide-input"]}),
    ]
    path = tmp_path / "01_x.ipynb"
    nbformat.write(notebook, path)
    assert tool.chapter_size(path) == (3, 2, 1)


@pytest.mark.parametrize(
    "stem", ["01_notation", "02_maml", "03_fomaml", "04_reptile", "05_imaml", "06_unified"]
)
def test_part_one_chapters_stay_within_their_budget(stem):
    tool = load_tool("chapter_size")
    assert stem in tool.PART_ONE
    size = tool.chapter_size(ROOT / "book" / f"{stem}.ipynb")
    assert size.words <= tool.MAX_WORDS, f"{stem}: {size.words} words of prose (budget {tool.MAX_WORDS})"
    assert size.code_lines <= tool.MAX_CODE_LINES, (
        f"{stem}: {size.code_lines} shown code lines (budget {tool.MAX_CODE_LINES}); "
        "fold plumbing or move it to src/"
    )
