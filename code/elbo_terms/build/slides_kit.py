"""Sphinx extension: what a reader needs to put the book on slides.

* Under every labelled equation, a folded "LaTeX" block with the equation's source (with a
  copy button, from sphinx-copybutton) and its stable anchor.
* At the end of every numbered chapter, "Cite this chapter": a plain-text citation and a
  BibTeX entry naming the book's version and the Pyro, torch and SymPy it was checked with.
"""

from __future__ import annotations

from docutils import nodes

BOOK_URL_NOTE = "HTML book built from the elbo_terms repository"


def _versions() -> str:
    import pyro
    import sympy
    import torch

    return f"Pyro {pyro.__version__}, torch {torch.__version__}, SymPy {sympy.__version__}"


def _chapter_number(env, docname):
    secnum = env.toc_secnumbers.get(docname, {}).get("")
    return ".".join(map(str, secnum)) if secnum else None


def add_latex_blocks(app, doctree, docname):
    if app.builder.format != "html":
        return
    for block in list(doctree.findall(nodes.math_block)):
        label = block.get("label")
        if not label:
            continue
        number = block.get("number")
        prefix = _chapter_number(app.env, docname)
        shown = f"({prefix}.{number})" if prefix and number else (f"({number})" if number else label)
        latex = block.astext().strip()
        opening = nodes.raw(
            "",
            f'<details class="eq-latex"><summary>LaTeX of {shown} &middot; anchor '
            f"<code>{docname}.html#equation-{label}</code></summary>",
            format="html",
        )
        code = nodes.literal_block(latex, latex, language="latex")
        closing = nodes.raw("", "</details>", format="html")
        parent = block.parent
        index = parent.index(block)
        parent[index + 1 : index + 1] = [opening, code, closing]


def add_citation(app, doctree, docname):
    if app.builder.format != "html":
        return
    number = _chapter_number(app.env, docname)
    if number is None:
        return
    cfg = app.config
    title = app.env.titles[docname].astext()
    year = cfg.copyright.split(",")[0].strip()
    plain = (
        f"{cfg.author} ({year}). \u201c{title}.\u201d Chapter {number} of {cfg.project}, "
        f"version {cfg.release} ({docname}.html). Checked against {_versions()}."
    )
    key = "elbo_terms_" + docname.replace("-", "_").replace("/", "_")
    booktitle = cfg.project.replace("_", "{\\_}")
    bibtex = (
        f"@incollection{{{key},\n"
        f"  title     = {{{title}}},\n"
        f"  booktitle = {{{booktitle}}},\n"
        f"  author    = {{{cfg.author}}},\n"
        f"  chapter   = {{{number}}},\n"
        f"  year      = {{{year}}},\n"
        f"  edition   = {{version {cfg.release}}},\n"
        f"  note      = {{{docname}.html; checked against {_versions()}}}\n"
        f"}}"
    )
    section = nodes.container(classes=["cite-this-chapter"])
    section += nodes.rubric(text="Cite this chapter")
    section += nodes.paragraph(text=plain)
    section += nodes.literal_block(bibtex, bibtex, language="bibtex")
    doctree += section


def setup(app):
    app.connect("doctree-resolved", add_latex_blocks)
    app.connect("doctree-resolved", add_citation)
    return {"version": "0.1", "parallel_read_safe": True, "parallel_write_safe": True}
