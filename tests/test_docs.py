"""Docs that cannot go stale silently: every relative link, every repository path and every test cited
in a Markdown file of the repository exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Folders never scanned: outputs, environments, vendored trees.
SKIP = {".git", "runs", "demo", "wheelhouse", "build", "dist", ".venv", ".pytest_cache", ".hypothesis", "node_modules"}
#: A backticked word starting with one of these is a repository path.
TOP = ("src/", "scripts/", "docs/", "tests/", "container/", "bench/", "weights/", ".ci/")
TOP_FILES = ("README.md", "BENCHMARKS.md", "RELIABILITY.md", "CHANGELOG.md", "Dockerfile", "entrypoint.sh",
             "requirements.txt", "requirements-dev.txt", "requirements-crosscheck.txt", "pyproject.toml")
#: Paths that a build makes (git-ignored): cited as what the build writes, absent on a fresh clone.
BUILT = ("container/wheelhouse",)
#: Short names of test files used in tables (``rel::test_x``).
ALIASES = {"rel": "tests/test_reliability.py"}

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`\n]+)`")
TEST = re.compile(r"^(?:(?P<alias>[a-z]+)|(?P<file>(?:tests/)?test_\w+\.py))::(?P<name>\w+)")


def markdown_files(root: Path = REPO) -> list[Path]:
    found = []
    for path in root.rglob("*.md"):
        parts = path.relative_to(root).parts
        if not any(part in SKIP or part.endswith(".egg-info") for part in parts):
            found.append(path)
    return sorted(found)


def references(path: Path) -> list[tuple[int, str, str]]:
    """``(line, kind, target)`` of every link, repository path and test that ``path`` cites."""
    found = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        for target in LINK.findall(line):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):
                found.append((number, "link", target))
        for code in CODE.findall(line):
            for word in code.split():
                word = word.strip("\"'(),;")
                if "…" in word or "<" in word or "*" in word:
                    continue  # an abbreviation or a pattern, not a path
                if TEST.match(word):
                    found.append((number, "test", word))
                elif word.startswith(TOP) or word in TOP_FILES:
                    found.append((number, "path", word))
    return found


def broken(path: Path, root: Path = REPO) -> list[str]:
    """What ``path`` cites that does not exist, one line each."""
    problems = []
    for number, kind, target in references(path):
        where = f"{path.relative_to(root)}:{number}"
        if kind == "link":
            file_part, _, anchor = target.partition("#")
            linked = path.parent / file_part if file_part else path
            if not linked.exists():
                problems.append(f"{where}: link {target} leads nowhere")
            elif anchor and broken_anchor(linked, anchor):
                problems.append(f"{where}: link {target}: no heading #{anchor} there")
        elif kind == "path":
            file_part, _, anchor = target.split("::", 1)[0].rstrip(".:").partition("#")
            if anchor and broken_anchor(root / file_part, anchor):
                problems.append(f"{where}: {target}: no heading #{anchor} there")
            if "{" in file_part:  # docs/x.{md,json}: every alternative must exist
                stem, alternatives = file_part.split("{", 1)
                alternatives, rest = alternatives.split("}", 1)
                candidates = [stem + choice + rest for choice in alternatives.split(",")]
            else:
                candidates = [file_part]
            for candidate in candidates:
                if not (root / candidate).exists() and not candidate.rstrip("/").startswith(BUILT):
                    problems.append(f"{where}: path {candidate} does not exist")
        else:
            match = TEST.match(target)
            file = ALIASES.get(match["alias"]) if match["alias"] else match["file"]
            if file is None:
                continue  # not one of our aliases: some other `x::y` notation
            file = file if file.startswith("tests/") else f"tests/{file}"
            test_file = root / file
            if not test_file.is_file():
                problems.append(f"{where}: test file {file} does not exist")
            elif not re.search(rf"^(?:async )?def {match['name']}\b", test_file.read_text(), re.M):
                problems.append(f"{where}: {file} has no test {match['name']}")
    return problems


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings, as GitHub makes them."""
    found = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        heading = re.match(r"^#{1,6}\s+(.*)$", line)
        if heading:
            found.add(re.sub(r"[^\w\- ]", "", heading[1].strip().lower()).replace(" ", "-"))
    return found


def broken_anchor(target: Path, anchor: str) -> bool:
    return target.suffix == ".md" and target.is_file() and anchor not in anchors(target)


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_path_and_test_cited_exists(path):
    assert broken(path) == []


def test_every_design_anchor_cited_in_the_code_exists():
    cited = {}
    for source in sorted((REPO / "src").rglob("*.py")) + sorted((REPO / "scripts").rglob("*.py")):
        for match in re.finditer(r"docs/([\w-]+\.md)#([\w-]+)", source.read_text(encoding="utf-8")):
            cited.setdefault((match[1], match[2]), source.relative_to(REPO))
    assert cited, "no docstring links to the design notes"
    missing = [f"{source}: docs/{page}#{anchor}" for (page, anchor), source in cited.items()
               if not (REPO / "docs" / page).is_file() or anchor not in anchors(REPO / "docs" / page)]
    assert missing == []


def test_the_checker_finds_a_broken_link_path_and_test(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_a.py").write_text("def test_there():\n    pass\n")
    (tmp_path / "docs").mkdir()
    page = tmp_path / "page.md"
    (tmp_path / "docs" / "real.md").write_text("# Real page\n## A heading, with punctuation\n")
    page.write_text("[ok](docs/real.md#a-heading-with-punctuation) [gone](docs/gone.md#x) [web](https://example.org) "
                    "[lost](docs/real.md#nowhere) [here](#top)\n# Top\n"
                    "`docs/real.md` `python scripts/missing.py --flag` `tests/test_a.py::test_there`\n"
                    "`tests/test_a.py::test_not_there` `test_a.py::test_there` `docs/real.{md,json}` `docs/real.md#top`\n")
    assert broken(page, tmp_path) == [
        "page.md:1: link docs/gone.md#x leads nowhere",
        "page.md:1: link docs/real.md#nowhere: no heading #nowhere there",
        "page.md:3: path scripts/missing.py does not exist",
        "page.md:4: tests/test_a.py has no test test_not_there",
        "page.md:4: path docs/real.json does not exist",
        "page.md:4: docs/real.md#top: no heading #top there",
    ]


def test_the_readme_results_table_is_the_one_the_phantom_table_made():
    """The README's results block is exactly what ``scripts/phantom_table.py`` renders from
    ``docs/phantom_results.json``: a new table without the README (or a hand edit) fails here."""
    import json
    import sys

    sys.path.insert(0, str(REPO / "scripts"))
    import phantom_table

    payload = json.loads((REPO / "docs" / "phantom_results.json").read_text())
    start, end = phantom_table.README_MARKERS
    block = (REPO / "README.md").read_text().split(start, 1)[1].split(end, 1)[0]
    assert block == phantom_table.readme_block(payload)
    assert payload["flips"] == 8 and payload["synth_version"] == phantom_table.SYNTH_VERSION
