"""Issue 27: the README and docs/ stay navigable: every relative link resolves, every `make`
target they name exists, and the README stays short with the two set-up commands first."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _targets() -> set:
    text = (REPO / "Makefile").read_text()
    return {m.group(1) for m in re.finditer(r"^([A-Za-z0-9_-]+):", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    bad = []
    for url in LINK.findall(page.read_text()):
        if re.match(r"(https?:|mailto:|#)", url):
            continue
        target = (page.parent / url.split("#")[0]).resolve()
        if not target.exists():
            bad.append(url)
    assert not bad, f"{page.relative_to(REPO)}: broken links {bad}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_make_target_named_exists(page):
    named = set(re.findall(r"`make ([A-Za-z0-9_-]+)", page.read_text()))
    named |= set(re.findall(r"^make ([A-Za-z0-9_-]+)", page.read_text(), re.M))
    missing = sorted(named - _targets())
    assert not missing, f"{page.relative_to(REPO)} names make targets that do not exist: {missing}"


def test_readme_is_short_and_starts_with_the_two_commands():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    first_block = text.split("```bash", 1)[1].split("```", 1)[0]
    assert "make run" in first_block and "make test" in first_block
    for page in sorted((REPO / "docs").glob("*.md")):  # the map names every page
        if page.name != "README.md":
            assert f"docs/{page.name}" in text, page.name
