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
