"""Re-execute the book's chapters and keep its Reproducibility appendix in step with them.

    python tools/notebooks.py run                    # every chapter (this is `make notebooks`)
    python tools/notebooks.py run 02_maml 08         # only these chapters
    python tools/notebooks.py run 08 -p budget paper # with more papermill parameters
    python tools/notebooks.py page                   # only regenerate the appendix's tables

``run`` executes each chapter with papermill in the repository root, with ``-p device auto`` (the
first CUDA GPU, else the CPU) and the full run sizes (``SMOKE_TEST=0``), then records the versions
of the kernel's Python, torch, NumPy, Matplotlib, gbml, papermill, the platform and the CUDA
device, and the commit of the code (``source``), in the notebook's
``metadata.gbml_environment``, runs ``ruff format`` on it, and regenerates the tables. A chapter
that fails is not written over its committed version; its partial output is kept in a temporary
folder and named at the end.

``page`` reads the committed notebooks only: the device from the chapter's ``Outputs produced on
...`` line, the date, run time and injected parameters from papermill's metadata, and the
versions from ``gbml_environment``. Where a chapter was run without this script, only what the
notebook records is shown (torch from that line, Python from the kernel's ``language_info``,
papermill from its own metadata) and the other versions read "not recorded".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import nbformat
import yaml

from gbml.notebook import parse_run_description
from gbml.notebook import source_revision as gbml_source_revision
from gbml.protocols import committed_runs

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
RESULTS = ROOT / "results" / "omniglot"
TABLE = BOOK / "_generated" / "reproducibility_table.md"
NOT_RECORDED = "not recorded"
VERSIONS = {  # gbml_environment key: column title
    "python": "Python",
    "torch": "torch",
    "numpy": "NumPy",
    "matplotlib": "Matplotlib",
    "gbml": "gbml",
    "papermill": "papermill",
    "platform": "platform",
    "cuda_device": "CUDA device",
    "source": "gbml source",
}

# Run with the kernel's Python after a chapter has executed: the versions the chapter ran with.
ENVIRONMENT_SCRIPT = """
import importlib.metadata, json, platform

def version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None

env = {"python": platform.python_version(), "platform": platform.platform()}
env.update({name: version(name) for name in ("torch", "numpy", "matplotlib", "gbml")})
try:
    import torch
except ImportError:
    env["cuda_device"] = None
else:
    env["torch"] = torch.__version__
    env["cuda_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
print(json.dumps(env))
"""


def chapters() -> list[Path]:
    return sorted(BOOK.glob("[0-9][0-9]_*.ipynb"))


def find_chapter(name: str) -> Path:
    """``02``, ``02_maml``, ``02_maml.ipynb`` or ``book/02_maml.ipynb`` → the chapter's path."""
    stem = Path(name).name.removesuffix(".ipynb")
    matches = [path for path in chapters() if path.stem == stem or path.stem.split("_")[0] == stem]
    if len(matches) != 1:
        known = ", ".join(path.stem for path in chapters())
        raise SystemExit(f"no single chapter matches {name!r}; the chapters are {known}")
    return matches[0]


# ---------------------------------------------------------------------------------------------
# page


def toc_documents() -> set[str]:
    """The documents listed in _toc.yml, as paths from the repository root without suffix."""
    found = set()

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in {"file", "root"} and isinstance(value, str):
                    found.add(value.removesuffix(".ipynb").removesuffix(".md"))
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8")))
    return found


def run_line(notebook) -> dict[str, str] | None:
    """The first ``Outputs produced on ...`` line of ``gbml.notebook.describe_run``, parsed."""
    for cell in notebook.cells:
        streams = [out for out in cell.get("outputs", []) if out.get("output_type") == "stream"]
        for output in streams:
            for line in output.get("text", "").splitlines():
                if line.startswith("Outputs produced on"):
                    return parse_run_description(line)
    return None


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_start(start: str | None) -> str:
    if not start:
        return NOT_RECORDED
    when = datetime.fromisoformat(start)
    if when.tzinfo is not None:
        when = when.astimezone(timezone.utc)
    return when.strftime("%Y-%m-%d %H:%M") + " UTC"


def format_parameters(parameters: dict | None) -> str:
    if parameters is None:
        return NOT_RECORDED
    if not parameters:
        return "none"
    return "<br>".join(f"`{name}={json.dumps(value)}`" for name, value in parameters.items())


def chapter_record(path: Path) -> dict[str, str]:
    """What the notebook at ``path`` records about the run that produced its outputs."""
    notebook = nbformat.read(path, as_version=4)
    meta = notebook.metadata
    papermill = meta.get("papermill", {})
    line = run_line(notebook)
    # What every executed notebook records; `run` adds the rest in gbml_environment.
    versions = {
        "python": meta.get("language_info", {}).get("version"),
        "torch": line["torch"] if line else None,
        "papermill": papermill.get("version"),
    }
    env = meta.get("gbml_environment", {})
    versions.update({key: value for key, value in env.items() if key in VERSIONS and value})
    if "cuda_device" in env and not env["cuda_device"]:
        versions["cuda_device"] = "none"
    duration = papermill.get("duration")
    if duration is None:
        run_time = "did not finish" if papermill.get("start_time") else NOT_RECORDED
    else:
        run_time = format_duration(duration)
        if papermill.get("exception"):
            run_time = f"failed after {run_time}"
    return {
        "device": line["device"] if line else NOT_RECORDED,
        "sizes": line["mode"] if line else NOT_RECORDED,
        "parameters": format_parameters(papermill.get("parameters")),
        "started": format_start(papermill.get("start_time")),
        "run_time": run_time,
        **{key: f"`{versions[key]}`" if versions.get(key) else NOT_RECORDED for key in VERSIONS},
    }


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def reproducibility_table() -> str:
    """The Markdown of book/_generated/reproducibility_table.md, from the chapter notebooks."""
    in_toc = toc_documents()
    rows, outside = [], []
    for path in chapters():
        if f"book/{path.stem}" in in_toc:
            label = f"{{doc}}`{path.stem} <{path.stem}>`"
        else:
            label = f"`{path.stem}`†"
            outside.append(path.stem)
        rows.append((label, chapter_record(path)))
    runs = markdown_table(
        ["chapter", "device", "sizes", "parameters injected", "started", "run time"],
        [[label, r["device"], r["sizes"], r["parameters"], r["started"], r["run_time"]] for label, r in rows],
    )
    versions = markdown_table(
        ["chapter", *VERSIONS.values()], [[label, *(r[key] for key in VERSIONS)] for label, r in rows]
    )
    text = (
        "% Generated by `python tools/notebooks.py page` from the chapter notebooks; do not edit.\n\n"
        "How each chapter's outputs were produced:\n\n"
        f"{runs}\n"
        "The versions each chapter ran with:\n\n"
        f"{versions}"
    )
    if outside:
        text += f"\n† Not in the book's table of contents: {', '.join(outside)}.\n"
    training = training_runs_table()
    if training:
        text += (
            "\nThe meta-training runs whose results Chapter 8 meta-tests (`results/omniglot/*/run.json`, and"
            " `results/omniglot/gpu/*/run.json` for the runs only a GPU trains),"
            " one row per session of a run:\n\n" + training
        )
    return text


def training_runs_table() -> str:
    """Every committed run's sessions: machine, torch, code commit, meta-iterations, wall time;
    and the run's total, tasks seen and recorded test accuracy."""

    def training_path(run: dict, session: dict) -> str:
        # Sessions of carried-state runs recorded before the label existed say "true" (the
        # evaluation's vmap); their training took the tasks in turn all the same.
        if run["config"].get("inner_state") == "carried":
            return "in turn (carried state)"
        return session.get("batched", "–")

    runs = {
        name: json.loads((folder / "run.json").read_text())
        for name, folder in committed_runs(RESULTS).items()
    }
    rows = []
    for name, run in runs.items():
        test = run.get("test")
        accuracy = (
            f"{100 * test['mean']:.1f} ± {100 * test['ci95']:.1f}% ({test['tasks']} tasks)" if test else "–"
        )
        if run.get("trained_by"):  # meta-tested from another run's training: its sessions are that run's
            training = f"the meta-training of `{run['trained_by']}`"
            total = f"{run['iterations']:,} / {run['tasks_seen']:,}"
            rows.append([f"`{name}`", training, "", "", "", "", "", total, accuracy])
            continue
        for i, session in enumerate(run["sessions"]):
            first = i == 0
            rows.append(
                [
                    f"`{name}`" if first else "",
                    session["machine"],
                    f"`{training_path(run, session)}`",
                    f"`{session['torch']}`",
                    f"`{session['source']}`",
                    f"{session['from_iteration']:,}–{session['to_iteration']:,}",
                    format_duration(session["elapsed_s"]),
                    f"{run['iterations']:,} / {run['tasks_seen']:,}" if first else "",
                    accuracy if first else "",
                ]
            )
    if not rows:
        return ""
    header = [
        "run",
        "machine",
        "tasks batched",
        "torch",
        "gbml source",
        "meta-iterations",
        "wall time",
        "total iterations / tasks seen",
        "test accuracy",
    ]
    commands = "\n".join(f"- `{name}`: `{run['command']}`" for name, run in runs.items())
    return (
        markdown_table(header, rows)
        + "\nThe command that continues each run (for a run meta-tested from another's training: the one"
        " that exports it again, after that run has been continued and exported):\n\n" + commands + "\n"
    )


def write_page() -> None:
    TABLE.parent.mkdir(parents=True, exist_ok=True)
    TABLE.write_text(reproducibility_table(), encoding="utf-8")
    print(f"wrote {TABLE.relative_to(ROOT)}")


# ---------------------------------------------------------------------------------------------
# run


def kernel_environment(kernel_name: str) -> dict:
    """The versions seen by the Python of the Jupyter kernel ``kernel_name``."""
    from jupyter_client.kernelspec import KernelSpecManager

    executable = KernelSpecManager().get_kernel_spec(kernel_name).argv[0]
    if executable in {"python", f"python{sys.version_info[0]}", "python{}.{}".format(*sys.version_info[:2])}:
        executable = sys.executable  # as jupyter_client itself launches such kernels
    result = subprocess.run(
        [executable, "-c", ENVIRONMENT_SCRIPT], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def source_revision() -> str | None:
    """The commit of the code a chapter runs (see :func:`gbml.notebook.source_revision`)."""
    return gbml_source_revision(ROOT)


def ruff_format(paths: list[Path]) -> None:
    """Format notebooks the way the repository's `ruff format --check` expects them."""
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        print("ruff not found: run `ruff format` on the notebooks yourself", file=sys.stderr)
        return
    subprocess.run([ruff, "format", "--quiet", *map(str, paths)], check=True, cwd=ROOT)


def parameter_value(text: str):
    """A ``-p NAME VALUE`` value typed as papermill's command line does: number, bool, None or str."""
    value = yaml.safe_load(text)
    return value if isinstance(value, int | float | bool) or value is None else text


def run(names: list[str], device: str, extra: list[list[str]], out: Path | None, smoke: bool) -> int:
    import papermill

    if smoke and out is None:
        raise SystemExit("--smoke needs --out: a smoke run must not replace a committed chapter")
    os.chdir(ROOT)  # papermill records input paths relative to the repository root
    os.environ["SMOKE_TEST"] = "1" if smoke else "0"  # the kernel inherits this environment
    shared_data = ROOT.parent / "shared" / "data"  # as the test suite's conftest.py
    if "GBML_DATA_DIR" not in os.environ and (shared_data / "omniglot").is_dir():
        os.environ["GBML_DATA_DIR"] = str(shared_data)
    parameters = {"device": device, **{name: parameter_value(value) for name, value in extra}}
    paths = [find_chapter(name) for name in names] or chapters()
    failed_dir = Path(tempfile.mkdtemp(prefix="gbml-notebooks-"))
    failures = []
    revision = source_revision()  # read before running: a chapter takes minutes to hours
    for path in paths:
        source = path.relative_to(ROOT)
        target = (out / path.name) if out else path
        partial = failed_dir / path.name
        kernel = nbformat.read(path, as_version=4).metadata.get("kernelspec", {}).get("name", "python3")
        print(f"running {source} with {parameters}, SMOKE_TEST={os.environ['SMOKE_TEST']}", flush=True)
        try:
            papermill.execute_notebook(str(source), str(partial), parameters=parameters, kernel_name=kernel)
        except Exception as error:
            print(f"{source} failed ({type(error).__name__}); its partial output: {partial}", file=sys.stderr)
            failures.append(partial)
            continue
        notebook = nbformat.read(partial, as_version=4)
        # papermill's injected "# Parameters" cell would show as a stray second parameters cell;
        # the values it set stay in notebook.metadata.papermill.parameters (and the appendix).
        notebook.cells = [
            c for c in notebook.cells if "injected-parameters" not in c.metadata.get("tags", [])
        ]
        notebook.metadata.papermill["output_path"] = str(target.relative_to(ROOT) if not out else target)
        environment = kernel_environment(kernel)
        environment["papermill"] = papermill.__version__
        environment["source"] = revision
        notebook.metadata["gbml_environment"] = environment
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook, target)
        partial.unlink()
        ruff_format([target])
        print(f"wrote {target}", flush=True)
    if out is None:
        write_page()
    if failures:
        print("failed: " + ", ".join(map(str, failures)), file=sys.stderr)
        return 1
    failed_dir.rmdir()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="re-execute chapters, record versions, regenerate the page")
    run_parser.add_argument("chapters", nargs="*", help="chapters to run (default: all), e.g. 02_maml or 02")
    run_parser.add_argument("--device", default="auto", help="the papermill `device` parameter (auto)")
    run_parser.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="another papermill parameter, e.g. -p budget paper",
    )
    run_parser.add_argument(
        "--out", type=Path, help="write the executed notebooks here, not over the chapters"
    )
    run_parser.add_argument("--smoke", action="store_true", help="SMOKE_TEST=1 sizes (only with --out)")
    commands.add_parser("page", help="regenerate book/_generated/reproducibility_table.md")
    args = parser.parse_args(argv)
    if args.command == "page":
        write_page()
        return 0
    out = args.out.resolve() if args.out else None
    return run(args.chapters, args.device, args.parameter, out, args.smoke)


if __name__ == "__main__":
    sys.exit(main())
