"""Sphinx extension: the book's parts, numbered as one sequence, and a reading time per chapter.

* **Continuous chapter numbers.** The landing page has one numbered toctree per part (each with
  its caption, which the sidebar shows). Plain Sphinx restarts the numbers at 1 in every numbered
  toctree; here the chapters of the root document's numbered toctrees are numbered on, in order
  (Part II starts after Part I's last chapter). Sphinx's own numbering runs first and is then
  shifted, before figure and equation numbers are assigned from it, so "(7.2)" and "Figure 7.1"
  follow the chapter.
* **Reading time.** Under the title of every numbered chapter, a line "About N min of reading
  (W words of prose)", counted at build time from the chapter's own text: code cells, their
  outputs, folded blocks (dropdowns, toggles, ``<details>``), display math and the citation
  block are not counted. :func:`prose_words` is the count; ``WORDS_PER_MINUTE`` the pace.
"""

from __future__ import annotations

import math

from docutils import nodes
from sphinx import addnodes
from sphinx.environment.collectors.toctree import TocTreeCollector

WORDS_PER_MINUTE = 200
#: classes of containers whose words a reader does not read on the first pass
SKIPPED_CLASSES = {"cell_input", "cell_output", "toggle", "dropdown", "cite-this-chapter", "reading-time"}

_sphinx_assign = TocTreeCollector.assign_section_numbers


def _shift(node_or_number, offset):
    return [node_or_number[0] + offset, *node_or_number[1:]]


def assign_section_numbers(self, env) -> list[str]:
    """Sphinx's numbering, then the chapters of later numbered toctrees of the root document shifted on."""
    old = env.toc_secnumbers
    _sphinx_assign(self, env)  # its own list of changed documents is recomputed below
    root = env.config.root_doc
    if root in env.numbered_toctrees:
        offset = 0
        for toctree in env.get_doctree(root).findall(addnodes.toctree):
            if not toctree.get("numbered"):
                continue
            chapters = [ref for _title, ref in toctree["entries"] if ref in env.toc_secnumbers]
            if offset:
                for ref in chapters:
                    env.toc_secnumbers[ref] = {
                        anchor: tuple(_shift(num, offset)) if num else num
                        for anchor, num in env.toc_secnumbers[ref].items()
                    }
                    for ref_node in env.tocs[ref].findall(nodes.reference):
                        if ref_node.get("secnumber"):
                            ref_node["secnumber"] = _shift(ref_node["secnumber"], offset)
                    title = env.titles.get(ref)
                    if title is not None and title.get("secnumber"):
                        title["secnumber"] = _shift(title["secnumber"], offset)
            offset += len(chapters)
    return [doc for doc, nums in env.toc_secnumbers.items() if nums != old.get(doc)]


def _skipped(node) -> bool:
    if isinstance(node, (nodes.math_block, nodes.literal_block, nodes.raw, nodes.comment, nodes.title)):
        return True
    if isinstance(node, nodes.Element):
        classes = set(node.get("classes", []))
        if classes & SKIPPED_CLASSES:
            return True
        if node.get("nb_element") in ("cell_code_source", "cell_code_output"):
            return True
    return False


def prose_words(doctree) -> int:
    """Words of the text a reader reads: not code, outputs, folded blocks, display math or titles."""
    count = 0
    stack = [doctree]
    while stack:
        node = stack.pop()
        if _skipped(node):
            continue
        if isinstance(node, nodes.Text):
            count += len(node.astext().split())
        elif isinstance(node, nodes.Node):
            stack.extend(node.children)
    return count


def reading_minutes(words: int) -> int:
    return max(1, math.ceil(words / WORDS_PER_MINUTE))


def add_reading_time(app, doctree, docname):
    if app.builder.format != "html" or not app.env.toc_secnumbers.get(docname):
        return
    words = prose_words(doctree)
    line = nodes.paragraph(classes=["reading-time"])
    line += nodes.emphasis(text=f"About {reading_minutes(words)} min of reading ({words:,} words of prose).")
    section = next(iter(doctree.findall(nodes.section)), None)
    if section is None:
        return
    title = next((i for i, child in enumerate(section.children) if isinstance(child, nodes.title)), None)
    section.insert(0 if title is None else title + 1, line)


def setup(app):
    TocTreeCollector.assign_section_numbers = assign_section_numbers
    # after slides_kit's folded LaTeX blocks and citation are added, which are not counted anyway
    app.connect("doctree-resolved", add_reading_time, priority=900)
    return {"version": "0.1", "parallel_read_safe": True, "parallel_write_safe": True}
