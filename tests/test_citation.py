"""The citation file is valid CFF 1.2.0, and every place that states the version or the citation
agrees with it."""

import json
import re
from pathlib import Path

import jsonschema
import yaml

import gbml

ROOT = Path(__file__).resolve().parents[1]
# The official schema of the Citation File Format 1.2.0 (https://citation-file-format.github.io/),
# as shipped in cffconvert 2.0.0: kept here so that the check needs neither network nor cffconvert,
# whose pinned jsonschema<4 conflicts with the book's dependencies.
SCHEMA = ROOT / "tests" / "data" / "citation-file-format-1.2.0.schema.json"


def citation() -> dict:
    # yaml.safe_load would turn the unquoted date into a datetime.date; CFF's schema wants a string.
    return yaml.load((ROOT / "CITATION.cff").read_text(), Loader=yaml.BaseLoader)


def test_citation_file_validates_against_the_cff_schema():
    data = citation()
    jsonschema.validate(data, json.loads(SCHEMA.read_text()))
    assert data["cff-version"] == "1.2.0"
    for field in ("title", "authors", "version", "date-released", "license", "repository-code"):
        assert data.get(field), f"CITATION.cff lacks {field}"
    assert set(data["license"]) == {"MIT", "CC-BY-4.0"}


def test_schema_check_can_fail():
    broken = {**citation(), "date-released": "26 November 2026"}
    try:
        jsonschema.validate(broken, json.loads(SCHEMA.read_text()))
    except jsonschema.ValidationError:
        return
    raise AssertionError("an invalid date passed the CFF schema check")


def test_one_version_everywhere():
    version = citation()["version"]
    pyproject = re.search(
        r'^\[project\]\n(?:.*\n)*?version = "(.*)"', (ROOT / "pyproject.toml").read_text(), re.M
    )
    assert pyproject and pyproject.group(1) == version
    assert gbml.__version__ == version
    newest = re.search(
        r"^## \[(\d+\.\d+\.\d+)\] - (\d{4}-\d{2}-\d{2})", (ROOT / "CHANGELOG.md").read_text(), re.M
    )
    assert newest, "CHANGELOG.md has no '## [x.y.z] - YYYY-MM-DD' entry"
    assert newest.groups() == (version, citation()["date-released"])


def bibtex_fields(page: str) -> dict[str, str]:
    entry = re.search(r"```bibtex\n(@\w+\{\w+,\n.*?\n\})\n```", page, re.S)
    assert entry, "the how-to-cite page has no ```bibtex block"
    fields = dict(re.findall(r"^\s+(\w+)\s*=\s*\{(.*)\},?$", entry.group(1), re.M))
    return {key: value.strip("{}") for key, value in fields.items()}


def test_how_to_cite_page_matches_citation_file():
    data = citation()
    page = (ROOT / "book" / "cite.md").read_text()
    fields = bibtex_fields(page)
    assert fields["author"] == data["authors"][0]["name"]
    assert fields["title"] == data["title"]
    assert fields["version"] == data["version"]
    assert (fields["year"], fields["month"]) == (data["date-released"][:4], data["date-released"][5:7])
    assert fields["url"] == data["repository-code"]
    text_citation = re.search(
        r"^> The gbml-book authors \((\d{4})\)\. \*(.*?)\*\s*\(version (.*?)\)", page, re.M | re.S
    )
    assert text_citation, "the how-to-cite page has no text citation"
    year, title, version = text_citation.groups()
    assert (year, " ".join(title.replace(">", " ").split()), version) == (
        data["date-released"][:4],
        data["title"],
        data["version"],
    )


def test_licences_are_stated():
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    assert "Attribution 4.0 International" in (ROOT / "LICENSE-CC-BY-4.0.txt").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "MIT" in readme and "CC-BY-4.0" in readme


def test_every_page_states_both_licences(built_book):
    pages = [
        page
        for page in built_book.rglob("*.html")
        if not page.relative_to(built_book).parts[0].startswith("_")
    ]
    pages = [page for page in pages if page.name != "index.html"]  # index.html only redirects
    assert len(pages) > 10
    for page in pages:
        footer = page.read_text().split('class="licence"', 1)
        assert len(footer) == 2, f"{page.relative_to(built_book)} has no licence footer"
        assert "CC-BY-4.0" in footer[1][:400] and "MIT" in footer[1][:400], page.name
