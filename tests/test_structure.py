"""The book's shape (issue 16): three parts in the sidebar, Part I short, figures that are figures.

Prose words of a page: the visible words of the built article, without code cells, outputs,
folded blocks (``<details>``, toggles, dropdowns), display math, the citation block, the
reading-time line and tables of contents. Part I is the first toctree of ``book/index.md``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from bs4 import BeautifulSoup

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / ".ci"))
import build_chapters  # noqa: E402

pytestmark = pytest.mark.book

PART_I_TOTAL = 10_000  # landing page + Part I
PAGE_MAX = 3_000  # any Part I page
PART_CAPTIONS = ("Part I", "Part II", "Part III")
#: page names people cite in slides (issue 16): they must keep resolving
OLD_PAGES = (
    "index elbo inside-trace-elbo reconstruction-and-kl likelihoods-as-losses gradients vae-bridge decompose"
    " cheatsheet notation ledger references"
).split()
NOT_PROSE = (
    ".cell_input, .cell_output, details, .toggle, .dropdown, .toggle-hidden, div.math, .math-wrapper,"
    " .cite-this-chapter, .reading-time, .headerlink, .toctree-wrapper, script, style"
)


def part_one() -> list[str]:
    return build_chapters.toctrees()[0]["docs"]


def article(html: Path) -> BeautifulSoup:
    soup = BeautifulSoup(html.read_text(), "html.parser")
    node = soup.select_one("article.bd-article") or soup.select_one("article") or soup
    return node


def prose_words(html: Path) -> int:
    """The count rule of the book's structure (see the module docstring)."""
    node = article(html)
    for skipped in node.select(NOT_PROSE):
        skipped.decompose()
    return len(node.get_text(" ").split())


def test_part_one_comes_from_the_first_toctree():
    trees = build_chapters.toctrees()
    assert trees[0]["caption"].startswith("Part I ") and trees[0]["numbered"]
    assert "elbo" in part_one()


def test_part_one_is_short(built_book):
    words = {doc: prose_words(built_book.html / f"{doc}.html") for doc in ["index", *part_one()]}
    too_long = {doc: n for doc, n in words.items() if doc != "index" and n > PAGE_MAX}
    assert not too_long, f"Part I pages over {PAGE_MAX} prose words: {too_long}"
    assert sum(words.values()) <= PART_I_TOTAL, f"landing page + Part I: {sum(words.values())} words {words}"


def test_sidebar_shows_the_three_parts(built_book):
    soup = BeautifulSoup((built_book.html / "index.html").read_text(), "html.parser")
    captions = [c.get_text(" ", strip=True) for c in soup.select("nav.bd-links p.caption")]
    for part in PART_CAPTIONS:
        assert any(c.startswith(part + " ") for c in captions), f"no sidebar caption {part!r} in {captions}"


def test_chapter_numbers_continue_into_part_two(built_book):
    numbered = build_chapters.chapters()
    soup = BeautifulSoup((built_book.html / "index.html").read_text(), "html.parser")
    links = [a.get_text(" ", strip=True) for a in soup.select("nav.bd-links li.toctree-l1 > a")]
    shown = [int(m.group(1)) for t in links if (m := re.match(r"(\d+)\. ", t))]
    assert shown == list(range(1, len(numbered) + 1)), links


def test_every_figure_has_a_caption_and_alt_text(built_book):
    problems = []
    for html in sorted(built_book.html.glob("*.html")):
        soup = BeautifulSoup(html.read_text(), "html.parser")
        art = soup.select_one("article.bd-article")
        if art is None:
            continue
        for img in art.select("img"):
            alt = (img.get("alt") or "").strip()
            if not alt or re.search(r"\.(png|svg|jpe?g)$", alt) or "_images/" in alt:
                problems.append(f"{html.name}: {img.get('src')} has alt text {alt!r}")
            fig = img.find_parent("figure")
            if fig is None or not fig.select_one("figcaption .caption-number"):
                problems.append(f"{html.name}: {img.get('src')} is not a numbered figure with a caption")
    assert not problems, "\n".join(problems)


def test_reading_time_on_every_chapter(built_book):
    for doc in build_chapters.chapters():
        soup = BeautifulSoup((built_book.html / f"{doc}.html").read_text(), "html.parser")
        line = soup.select_one("article .reading-time")
        assert line is not None and re.search(r"About \d+ min", line.get_text()), doc


@pytest.mark.parametrize("page", OLD_PAGES)
def test_old_page_names_resolve(built_book, page):
    assert (built_book.html / f"{page}.html").is_file()
