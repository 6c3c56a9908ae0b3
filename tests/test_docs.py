"""The README and docs/ point only at files in this repository, so a reader of a clone can follow every link."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target)


def local_targets(text: str) -> list[str]:
    """Link targets that are paths (not web addresses or in-page anchors), without their #fragment."""
    return [t.split("#")[0] for t in LINK.findall(text) if not re.match(r"[a-z]+:|#", t)]


def test_the_docs_exist_and_the_readme_links_them():
    targets = set(local_targets((ROOT / "README.md").read_text()))
    assert {"docs/architecture.md", "docs/performance.md"} <= targets


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_resolve_inside_the_repository(doc):
    text = doc.read_text()
    assert "../" + "shared" not in text  # the agents' notes outside the repository
    for target in local_targets(text):
        path = (doc.parent / target).resolve()
        assert path.is_relative_to(ROOT) and path.exists(), f"{doc.name} links {target}"


def test_the_link_finder_sees_relative_paths():
    text = "[a](docs/x.md) [b](https://example.org/y) [c](#part) [d](../outside/DESIGN.md#top)"
    assert local_targets(text) == ["docs/x.md", "../outside/DESIGN.md"]
