"""The user-facing documents: README.md, docs/, CHANGELOG.md, results/README.md and every
committed summary.md. Their relative links and images resolve (and a README anchor names one of
its headings), the README stays a five-minute read that starts with its two commands and tells
no development history, every committed sweep is in the results index, and every committed
parallel-coordinates page finds the plotly.js it loads."""

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "CHANGELOG.md", REPO / "results" / "README.md",
        *sorted((REPO / "docs").glob("*.md"))]
SUMMARIES = sorted((REPO / "results").rglob("summary.md"))
README_MAX_LINES = 300
# [text](target) and ![alt](target); a target ends at whitespace or ')'
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def links(path):
    text = path.read_text()
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold commands, not links
    return LINK.findall(text)


def anchor(heading):
    """GitHub's anchor for a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def dead_links(path):
    """The relative links and images of a markdown file that resolve to nothing (a file, or a
    heading of a markdown file for a #fragment)."""
    dead = []
    for target in links(path):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
            continue
        file_part, _, fragment = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            dead.append(target)
        elif fragment and resolved.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", resolved.read_text(), flags=re.M)
            if fragment not in {anchor(h) for h in headings}:
                dead.append(target)
    return dead


@pytest.mark.parametrize("path", DOCS + SUMMARIES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_image_resolves(path):
    assert path.is_file(), f"{path.relative_to(REPO)} is missing"
    assert not dead_links(path), f"{path.relative_to(REPO)}: dead links {dead_links(path)}"


def test_link_checker_finds_a_dead_link_and_a_dead_anchor(tmp_path):
    (tmp_path / "there.md").write_text("## A Heading, with commas\n")
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [gone](missing.md) ![img](pic.png) "
                    "[bad anchor](#nowhere) [web](https://example.org) "
                    "[other](there.md#a-heading-with-commas) [other bad](there.md#b)\n"
                    "```\n[not a link](in-code.md)\n```\n")
    assert dead_links(page) == ["missing.md", "pic.png", "#nowhere", "there.md#b"]


def test_readme_is_short_and_starts_with_its_two_commands():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES
    first_block = re.search(r"```bash\n(.*?)```", "\n".join(lines), re.S)[1]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()]
    assert commands == ["make demo", "make test"]
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)  # CI runs the README's test command


def _commit(token):
    out = subprocess.run(["git", "-C", str(REPO), "cat-file", "-t", token],
                         capture_output=True, text=True)
    return out.returncode == 0 and out.stdout.strip() == "commit"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_documents_tell_no_development_history(path):
    text = path.read_text()
    history = re.findall(r"\bissues? #?\d+|\b(?:this|last|earlier|previous|later|next|one) "
                         r"sessions?\b|\bfresh clone\b|\bseed 00\d\b", text, flags=re.I)
    assert not history, f"{path.relative_to(REPO)}: {sorted(set(history))}"
    if (REPO / ".git").exists():
        hashes = [t for t in set(re.findall(r"\b[0-9a-f]{7,40}\b", text))
                  if re.search(r"[a-f]", t) and re.search(r"\d", t) and _commit(t)]
        assert not hashes, f"{path.relative_to(REPO)} names commits {hashes}"


def test_results_index_links_every_committed_sweep_and_spread():
    index = REPO / "results" / "README.md"
    linked = {(index.parent / t.partition("#")[0]).resolve() for t in links(index)}
    folders = {p.parent for name in ("runs.csv", "spread.md")
               for p in (REPO / "results").rglob(name)}
    assert folders, "no committed sweep found"
    missing = sorted(str(f.relative_to(REPO)) for f in folders if f.resolve() not in linked)
    assert not missing, f"results/README.md does not link {missing}"


def test_every_committed_page_finds_the_plotly_js_it_loads():
    pages = sorted((REPO / "results").rglob("parallel_coordinates.html"))
    assert pages
    for page in pages:
        head = page.read_text()[:20_000]
        sources = re.findall(r'<script[^>]*\bsrc="([^"]+)"', head)
        assert sources, f"{page} loads no plotly.js file (each page shares one copy)"
        assert page.stat().st_size < 200_000, f"{page} embeds plotly.js"
        for src in sources:
            assert not re.match(r"[a-z]+:", src), f"{page}: {src} is fetched from the network"
            assert (page.parent / src).is_file(), f"{page}: {src} is missing"
