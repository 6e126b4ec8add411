"""How long each chapter is to read: prose words and the code lines a reader scrolls past.

    python tools/chapter_size.py            # every chapter
    python tools/chapter_size.py 05_imaml   # only these

Prose words are whitespace-separated words of the markdown cells outside math ($…$, $$…$$), code
fences and HTML tags. Code lines are the non-blank lines of code cells that the book shows; cells
folded or removed (tags hide-cell, hide-input, remove-cell, remove-input: the install cell,
plotting plumbing, exercise solutions) are counted apart as hidden. Part I's budget, held by
tests/test_book_pages.py: at most 3,000 words and 350 shown code lines per chapter.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import NamedTuple

import nbformat

ROOT = Path(__file__).resolve().parents[1]
PART_ONE = ("01_notation", "02_maml", "03_fomaml", "04_reptile", "05_imaml", "06_unified")
MAX_WORDS, MAX_CODE_LINES = 3000, 350
HIDDEN_TAGS = {"hide-cell", "hide-input", "remove-cell", "remove-input"}
_NOT_PROSE = [
    re.compile(r"\$\$.*?\$\$", re.S),
    re.compile(r"```.*?```", re.S),
    re.compile(r"\$[^$]*\$"),
    re.compile(r"<[^>]+>"),
]


class ChapterSize(NamedTuple):
    words: int
    code_lines: int
    hidden_code_lines: int


def prose_words(markdown: str) -> int:
    for pattern in _NOT_PROSE:
        markdown = pattern.sub(" ", markdown)
    return len(markdown.split())


def chapter_size(path: Path) -> ChapterSize:
    words = shown = hidden = 0
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type == "markdown":
            words += prose_words(cell.source)
        elif cell.cell_type == "code":
            lines = sum(1 for line in cell.source.splitlines() if line.strip())
            if HIDDEN_TAGS & set(cell.metadata.get("tags", [])):
                hidden += lines
            else:
                shown += lines
    return ChapterSize(words, shown, hidden)


def main(argv: list[str]) -> int:
    paths = sorted((ROOT / "book").glob("0*_*.ipynb"))
    if argv:
        paths = [p for p in paths if p.stem in argv]
    print(f"{'chapter':14s} {'words':>6s} {'code':>5s} {'hidden':>6s}")
    for path in paths:
        size = chapter_size(path)
        flag = ""
        if path.stem in PART_ONE and (size.words > MAX_WORDS or size.code_lines > MAX_CODE_LINES):
            flag = f"  over Part I's budget ({MAX_WORDS} words, {MAX_CODE_LINES} lines)"
        print(f"{path.stem:14s} {size.words:6d} {size.code_lines:5d} {size.hidden_code_lines:6d}{flag}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
