"""Sphinx extension: what a reader needs to put the book on slides.

* Under every labelled equation, a folded "LaTeX" block with the equation's source (with a
  copy button, from sphinx-copybutton) and its stable anchor.
* At the end of every numbered chapter, "Cite this chapter", folded: a plain-text citation
  and a BibTeX entry naming the book's version and the Pyro, torch and SymPy it was checked
  with. ``{cite-this-book}`` (on the references page) gives the same for the whole book.
* ``{beamer-download}`` links a ``<page>-beamer.tex`` written next to the page's HTML at the
  end of the build: one Beamer frame per labelled equation the page references (``{eq}``)
  or displays, with its number in the book and the page it comes from.

The BibTeX entries compile without a warning through bibtex + natbib (plainnat) and through
biber + biblatex (authoryear), also in Beamer (tests/test_latex.py runs both):

* the author is corporate, so it is braced twice (``{{The elbo\\_terms authors}}``): BibTeX
  would otherwise split it into first, von and last names and print "authors";
* every LaTeX special character is escaped (a bare ``_`` stops pdflatex);
* titles are braced, so that styles which change the case of titles keep "KL" and "ELBO";
* ``@incollection`` for a chapter (it has its own title) and ``@book`` for the book, each
  with the publisher and year every mainstream style requires;
* no ``url`` field: the page is a relative name, not a URL, and biblatex's ``URL:`` label asks
  Beamer's sans-serif font for small capitals it does not have (a font warning in every
  talk). The page name, the version and the versions checked go in ``note``, which every style
  prints; ``version`` is there too for tools that read it.
"""

from __future__ import annotations

import posixpath
import unicodedata
from pathlib import Path

from docutils import nodes
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)

BEAMER_SUFFIX = "-beamer.tex"

_SPECIALS = {
    "\\": r"\textbackslash{}",
    "{": r"\{",
    "}": r"\}",
    "_": r"\_",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    """``text`` as LaTeX text for pdflatex: specials escaped, Greek letters as math."""
    out = []
    for ch in text:
        if ch in _SPECIALS:
            out.append(_SPECIALS[ch])
        elif ord(ch) > 127 and unicodedata.name(ch, "").startswith("GREEK SMALL LETTER "):
            out.append("\\ensuremath{\\" + unicodedata.name(ch).split()[-1].lower() + "}")
        else:
            out.append(ch)
    return "".join(out)


def latex_of(node: nodes.Node) -> str:
    """The LaTeX of a title node: its text escaped, its inline math as math."""
    if isinstance(node, nodes.math):
        return r"\ensuremath{" + node.astext() + "}"
    if isinstance(node, nodes.Text):
        return latex_escape(node.astext())
    return "".join(latex_of(child) for child in node.children)


def _versions() -> str:
    from importlib.metadata import version  # the installed versions, without importing torch

    return f"Pyro {version('pyro-ppl')}, torch {version('torch')} and SymPy {version('sympy')}"


def _chapter_number(env, docname):
    secnum = env.toc_secnumbers.get(docname, {}).get("")
    return ".".join(map(str, secnum)) if secnum else None


def _key(docname: str | None) -> str:
    return "elbo_terms" + ("_" + docname.replace("-", "_").replace("/", "_") if docname else "")


def _bibtex(entry_type: str, key: str, fields: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in fields)
    body = ",\n".join(f"  {name:<{width}} = {{{value}}}" for name, value in fields)
    return f"@{entry_type}{{{key},\n{body}\n}}"


def _common_fields(cfg, page: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(fields before the entry's own, fields after) shared by the book's and the chapters' entries."""
    author = "{" + latex_escape(cfg.author) + "}"  # corporate: braced twice
    year = cfg.copyright.split(",")[0].strip()
    note = latex_escape(f"Version {cfg.release}, page {page}. Checked against {_versions()}")
    return [("author", author)], [
        ("publisher", author),
        ("year", year),
        ("version", latex_escape(cfg.release)),
        ("note", note),
    ]


def book_bibtex(cfg) -> str:
    """The BibTeX entry of the whole book (``@book``)."""
    before, after = _common_fields(cfg, "index.html")
    return _bibtex("book", _key(None), before + [("title", "{" + latex_escape(cfg.project) + "}")] + after)


def chapter_bibtex(cfg, docname: str, title_latex: str, number: str) -> str:
    """The BibTeX entry of one chapter (``@incollection``)."""
    before, after = _common_fields(cfg, f"{docname}.html")
    own = [
        ("title", "{" + title_latex + "}"),
        ("booktitle", "{" + latex_escape(cfg.project) + "}"),
        ("chapter", number),
    ]
    return _bibtex("incollection", _key(docname), before + own + after)


def _citation_block(summary: str, plain: str, bibtex: str, classes: str, open_: bool = False) -> list[nodes.Node]:
    """A folded block (``<details>``): the plain-text citation, then the BibTeX with a copy button."""
    opening = f'<details class="{classes}"{" open" if open_ else ""}><summary>{summary}</summary>'
    return [
        nodes.raw("", opening, format="html"),
        nodes.paragraph(text=plain),
        nodes.literal_block(bibtex, bibtex, language="bibtex"),
        nodes.raw("", "</details>", format="html"),
    ]


# ---- LaTeX of every labelled equation


def add_latex_blocks(app, doctree, docname):
    if app.builder.format != "html":
        return
    for block in list(doctree.findall(nodes.math_block)):
        label = block.get("label")
        if not label:
            continue
        shown = f"({_eqno(app.env, docname, label)})" if block.get("number") else label
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


# ---- "Cite this chapter" and the whole book's entry


def add_citation(app, doctree, docname):
    if app.builder.format != "html":
        return
    number = _chapter_number(app.env, docname)
    if number is None:
        return
    cfg = app.config
    title_node = app.env.titles[docname]
    title = title_node.astext()
    year = cfg.copyright.split(",")[0].strip()
    plain = (
        f"{cfg.author} ({year}). \u201c{title}.\u201d Chapter {number} of {cfg.project}, "
        f"version {cfg.release} ({docname}.html). Checked against {_versions()}."
    )
    bibtex = chapter_bibtex(cfg, docname, latex_of(title_node), number)
    doctree.extend(_citation_block("Cite this chapter", plain, bibtex, "cite-this-chapter"))


class cite_book_placeholder(nodes.General, nodes.Element):
    pass


class CiteThisBookDirective(SphinxDirective):
    """``{cite-this-book}``: the plain-text citation and the BibTeX entry of the whole book."""

    has_content = False

    def run(self):
        return [cite_book_placeholder()]


def fill_cite_book(app, doctree, docname):
    for node in list(doctree.findall(cite_book_placeholder)):
        cfg = app.config
        year = cfg.copyright.split(",")[0].strip()
        plain = f"{cfg.author} ({year}). {cfg.project}, version {cfg.release}. Checked against {_versions()}."
        if app.builder.format != "html":
            node.replace_self(nodes.paragraph(text=plain))
            continue
        node.replace_self(_citation_block("Cite this book", plain, book_bibtex(cfg), "cite-this-book", open_=True))


# ---- the Beamer frames of a page's equations


class beamer_placeholder(nodes.General, nodes.Element):
    pass


class BeamerDownloadDirective(SphinxDirective):
    """``{beamer-download}``: a link to ``<page>-beamer.tex``, one Beamer frame per equation of the page."""

    has_content = False

    def run(self):
        if not hasattr(self.env, "elbo_beamer_pages"):
            self.env.elbo_beamer_pages = set()
        self.env.elbo_beamer_pages.add(self.env.docname)
        return [beamer_placeholder()]


def fill_beamer_link(app, doctree, docname):
    for node in list(doctree.findall(beamer_placeholder)):
        name = posixpath.basename(docname) + BEAMER_SUFFIX
        count = len(page_equations(app.env, docname))
        para = nodes.paragraph(classes=["beamer-download"])
        para += nodes.Text("The equations of this page as Beamer frames (one a frame, with its number and page): ")
        ref = nodes.reference("", "", refuri=name, classes=["beamer-download-link"])
        ref += nodes.literal(text=name)
        para += ref
        para += nodes.Text(f" ({count} frames; pdflatex, amsmath and amssymb).")
        node.replace_self(para)


def purge(app, env, docname):
    getattr(env, "elbo_beamer_pages", set()).discard(docname)


def merge(app, env, docnames, other):
    if not hasattr(env, "elbo_beamer_pages"):
        env.elbo_beamer_pages = set()
    env.elbo_beamer_pages |= getattr(other, "elbo_beamer_pages", set()) & set(docnames)


def _eqno(env, docname: str, label: str) -> str:
    """The equation's number as {eq} prints it, without parentheses: "3.2" (the label if unnumbered)."""
    numbers = env.toc_fignumbers.get(docname, {}).get("displaymath", {}).get(f"equation-{label}", ())
    if not numbers:
        return label
    eqno = ".".join(map(str, numbers))
    return env.config.math_numsep.join(eqno.rsplit(".", 1))


def page_equations(env, docname: str) -> list[str]:
    """Labels of the equations ``docname`` displays or references with {eq}, in page order, once each."""
    labels = []
    for node in env.get_doctree(docname).findall(nodes.Element):
        if isinstance(node, nodes.math_block):
            label = node.get("label")
        elif node.get("refdomain") == "math" and node.get("reftype") in {"eq", "numref"}:
            label = node.get("reftarget")
        else:
            continue
        if label and label not in labels:
            labels.append(label)
    return labels


def _identities(env) -> dict[str, dict]:
    from .identity import registered

    return registered(getattr(env.config, "nb_execution_cache_path", None))


def beamer_frames(env, docname: str) -> str:
    """A Beamer document: one frame per equation of ``docname`` (see :func:`page_equations`)."""
    cfg = env.config
    equations = env.get_domain("math").equations
    doctrees: dict[str, nodes.document] = {}
    checked = {  # (page, label) -> where the ledger shows its check
        (i["chapter"], i["label"]): "; checked: " + latex_escape(f"ledger.html#identity-{iid}")
        for iid, i in _identities(env).items()
        if i["label"]
    }
    frames = []
    for label in page_equations(env, docname):
        if label not in equations:
            continue  # Sphinx already warned about the dangling reference
        source = equations[label][0]
        if source not in doctrees:
            doctrees[source] = env.get_doctree(source)
        block = next(b for b in doctrees[source].findall(nodes.math_block) if b.get("label") == label)
        latex = block.astext().strip()
        number = _eqno(env, source, label)
        title = latex_of(env.titles[source])
        anchor = latex_escape(f"{source}.html#equation-{label}")
        frames.append(
            f"% ({number}) {label}\n"
            "\\begin{frame}\n"
            f"  \\frametitle{{Equation ({latex_escape(number)})}}\n"
            f"  \\framesubtitle{{{title}}}\n"
            "  \\[\n"
            "  \\resizebox{\\ifdim\\width>\\linewidth\\linewidth\\else\\width\\fi}{!}{$\\displaystyle\n"
            f"  {latex}\n"
            "  $}\n"
            "  \\]\n"
            "  \\vfill\n"
            f"  {{\\footnotesize Eq.~({latex_escape(number)}) of \\emph{{{title}}}, "
            f"page \\texttt{{{anchor}}}{checked.get((source, label), '')}.\\par}}\n"
            "\\end{frame}\n"
        )
    header = (
        f"% The equations of \u201c{env.titles[docname].astext()}\u201d in {cfg.project}, "
        f"version {cfg.release}, as Beamer frames:\n"
        "% one frame per equation, titled with its number in the book; the footline names the page it comes from.\n"
        "% Compile with pdflatex, or copy the frames you need into your own talk (they need amsmath and amssymb;\n"
        "% \\resizebox, from graphicx, which Beamer loads, shrinks an equation wider than the frame).\n"
    )
    return (
        header + "\\documentclass{beamer}\n\\usepackage{amsmath,amssymb}\n"
        f"\\title{{{latex_of(env.titles[docname])}}}\n\\subtitle{{{latex_escape(cfg.project)}, version "
        f"{latex_escape(cfg.release)}}}\n\\date{{}}\n\\begin{{document}}\n\\begin{{frame}}\n  \\titlepage\n"
        "\\end{frame}\n\n" + "\n".join(frames) + "\n\\end{document}\n"
    )


def write_beamer_files(app, exception):
    if exception is not None or app.builder.format != "html":
        return
    for docname in sorted(getattr(app.env, "elbo_beamer_pages", set())):
        path = Path(app.outdir, *(docname + BEAMER_SUFFIX).split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(beamer_frames(app.env, docname), encoding="utf8")


def setup(app):
    app.add_node(cite_book_placeholder)
    app.add_node(beamer_placeholder)
    app.add_directive("cite-this-book", CiteThisBookDirective)
    app.add_directive("beamer-download", BeamerDownloadDirective)
    app.connect("env-purge-doc", purge)
    app.connect("env-merge-info", merge)
    app.connect("doctree-resolved", add_latex_blocks)
    app.connect("doctree-resolved", add_citation)
    app.connect("doctree-resolved", fill_cite_book)
    app.connect("doctree-resolved", fill_beamer_link)
    app.connect("build-finished", write_beamer_files)
    return {"version": "0.2", "parallel_read_safe": True, "parallel_write_safe": True}
