"""The README's Python example runs as written."""

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_python_blocks_run(capsys):
    blocks = re.findall(r"^```python\n(.*?)^```$", (ROOT / "README.md").read_text(), re.M | re.S)
    assert blocks, "the README has no Python example"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    result = namespace["result"]
    assert result.info["query_loss"].shape == (4,) and torch.isfinite(result.info["query_loss"]).all()
    assert capsys.readouterr().out.startswith("tensor(")
