"""The documentation cannot drift: the configuration page is the generated default run.toml,
and every relative link in the README and docs/ points at a file (and heading) that exists."""

from __future__ import annotations

import re
from pathlib import Path

from coordinator.config import default_config_text

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _anchors(text: str) -> set[str]:
    # GitHub's rule: lower case, punctuation dropped, spaces to hyphens
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", text, re.M)}


MARK = "<!-- default-config -->\n```toml\n"


def configuration_page() -> str:
    """docs/configuration.md with its TOML block made from ``default_config_text``."""
    page = (ROOT / "docs" / "configuration.md").read_text()
    head, rest = page.split(MARK, 1)
    return head + MARK + default_config_text().rstrip() + "\n" + "```" + rest.split("```", 1)[1]


def test_configuration_page_is_the_default_run_toml() -> None:
    assert (ROOT / "docs" / "configuration.md").read_text() == configuration_page(), (
        "docs/configuration.md is stale: python tests/unit/test_docs.py rewrites it")


def test_relative_links_resolve() -> None:
    broken = []
    for page in PAGES:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text()):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


if __name__ == "__main__":  # rewrite the configuration page from the defaults
    (ROOT / "docs" / "configuration.md").write_text(configuration_page())

