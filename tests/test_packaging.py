"""The package declares exactly the third-party modules that ``src/gbml`` imports."""

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTION = {"PIL": "pillow"}  # import name -> distribution name, where they differ


def third_party_imports() -> set[str]:
    """Top-level modules imported anywhere in src/gbml (also inside functions), minus the
    standard library and gbml itself."""
    found = set()
    for path in (ROOT / "src" / "gbml").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {name for name in found if name not in sys.stdlib_module_names and name != "gbml"}


def declared_dependencies() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[\n(.*?)^\]", text, re.M | re.S)
    assert block, "no dependencies list in pyproject.toml"
    return {
        re.match(r'\s*"([A-Za-z0-9_.-]+)', line).group(1).lower()
        for line in re.findall(r'^\s*".*', block.group(1), re.M)
    }


def test_runtime_dependencies_are_what_the_library_imports():
    imported = {DISTRIBUTION.get(name, name).lower() for name in third_party_imports()}
    assert imported == {"torch", "tqdm", "pillow"}  # a new import must be declared, and vice versa
    assert declared_dependencies() == imported


def test_the_sdist_builds_a_wheel_that_installs_and_runs(tmp_path):
    """``python -m build`` makes an sdist and, from it, a wheel; the wheel installs into a fresh
    virtual environment, where ``import gbml`` finds the installed copy and ``python -m gbml
    --help`` runs. Offline: the build uses this environment's setuptools (--no-isolation), and the
    new environment borrows this one's torch, tqdm and Pillow instead of downloading them."""
    import site
    import subprocess
    import venv

    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (sdist,), (wheel,) = sorted(dist.glob("gbml-*.tar.gz")), sorted(dist.glob("gbml-*.whl"))
    assert sdist.stat().st_size > 0

    env = tmp_path / "env"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(purelib) / "borrowed.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    probe = (
        "import gbml, importlib.metadata as m; print(gbml.__file__); "
        "print(sorted(r.split('>')[0].split(';')[0].strip().lower() "
        "for r in m.requires('gbml') if 'extra' not in r))"
    )
    shown = subprocess.run([str(python), "-c", probe], check=True, capture_output=True, text=True).stdout
    location, requires = shown.splitlines()
    assert location.startswith(str(env)), location  # the installed copy, not the source tree
    assert requires == str(["pillow", "torch", "tqdm"])
    helped = subprocess.run([str(python), "-m", "gbml", "--help"], check=True, capture_output=True, text=True)
    assert "meta-train and meta-test" in helped.stdout
    # The Omniglot miniature is package data: the installed copy reads it from the wheel's files.
    mini = "import gbml; print(gbml.load_omniglot_miniature())"
    loaded = subprocess.run([str(python), "-c", mini], check=True, capture_output=True, text=True).stdout
    assert loaded.strip() == "Omniglot(50 characters × 20 drawings, 28×28 uint8)"


def gbml_imports() -> dict[str, set[str]]:
    """Module -> the gbml modules it imports (module level or inside functions)."""
    package = ROOT / "src" / "gbml"
    graph = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and (node.module or "").startswith("gbml")
            ):
                targets.add(node.module)
                targets |= {f"{node.module}.{alias.name}" for alias in node.names}  # submodules
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name.startswith("gbml")}
        graph[module] = targets
    return {module: {t for t in targets if t in graph and t != module} for module, targets in graph.items()}


def test_no_import_cycle_and_no_private_cross_module_imports():
    graph = gbml_imports()
    graph["gbml"] = set()  # the package's __init__ re-exports; submodules importing it is the cycle risk
    state: dict[str, str] = {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph[module]):
            assert state.get(target) != "open", "import cycle: " + " -> ".join([*path, module, target])
            if target not in state:
                visit(target, [*path, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    private = []
    for path in (ROOT / "src" / "gbml").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gbml"):
                private += [
                    f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")
                ]
    assert not private, private
