"""Sphinx extension: the ledger of identities.

While the chapters execute, :func:`elbo_terms.book.verify` glues one record per identity
(myst-nb writes them to ``<outdir>/<docname>.glue.json``). Once every page is read this
extension

* checks the records: each was verified in the chapter the registry names, backs an
  equation label that exists on that page, and passed; every registered identity of a
  chapter in the build was verified there exactly once. Anything else is a warning,
  which ``-W`` turns into a failed build naming the identity;
* fills the ``{identity-ledger}`` directive (the Ledger page) with the table;
* writes ``ledger.json`` next to the HTML.
"""

from __future__ import annotations

import json
from pathlib import Path

from docutils import nodes
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

from .book import LEDGER_PREFIX

logger = logging.getLogger(__name__)


class ledger_placeholder(nodes.General, nodes.Element):
    pass


class IdentityLedgerDirective(SphinxDirective):
    """``{identity-ledger}``: the table of every identity, its check and its result."""

    has_content = False

    def run(self):
        if not hasattr(self.env, "elbo_ledger_pages"):
            self.env.elbo_ledger_pages = {}
        self.env.elbo_ledger_pages[self.env.docname] = True
        return [ledger_placeholder()]


def doc_order(env) -> list[str]:
    """Docnames in the order of the table of contents (then any others, sorted)."""
    order, stack = [], [env.config.root_doc]
    while stack:
        doc = stack.pop(0)
        if doc in order:
            continue
        order.append(doc)
        stack[:0] = env.toctree_includes.get(doc, [])
    return order + sorted(set(env.found_docs) - set(order))


def collect_records(app, env) -> list[dict]:
    """The ledger records of every document, in book order, read from glue files."""
    records = []
    meta = getattr(env, "nb_metadata", {})
    for docname in doc_order(env):
        keys = [k for k in meta.get(docname, {}).get("glue", []) if k.startswith(LEDGER_PREFIX)]
        if not keys:
            continue
        # myst-nb writes glue data beside the executed notebooks, in <outdir>/../jupyter_execute
        path = Path(app.outdir).parent.joinpath("jupyter_execute", *(docname + ".glue.json").split("/"))
        data = json.loads(path.read_text(encoding="utf8"))
        for key in keys:
            rec = json.loads(data[key]["data"]["text/plain"])
            rec["_docname"] = docname
            records.append(rec)
    return records


def check_records(app, env):
    from .. import chapters  # noqa: F401  (registers every identity)
    from .identity import IDENTITIES

    records = collect_records(app, env)
    equations = env.get_domain("math").data.get("objects", {})
    seen = {}
    for rec in records:
        rid, doc = rec["id"], rec["_docname"]
        where = f"identity '{rid}' (verified in '{doc}')"
        if rid in seen:
            logger.warning(f"{where}: verified twice, also in '{seen[rid]}'", type="elbo_terms", subtype="ledger")
        seen[rid] = doc
        if rec["chapter"] != doc:
            logger.warning(
                f"{where}: the registry places it in chapter '{rec['chapter']}'", type="elbo_terms", subtype="ledger"
            )
        label = rec.get("label")
        if label is not None:
            found = equations.get(label)
            if found is None or found[0] != doc:
                logger.warning(
                    f"{where}: equation label '{label}' is not on page '{doc}'", type="elbo_terms", subtype="ledger"
                )
            else:  # the ledger states the identity exactly as the page displays it
                rec["statement"] = _displayed_latex(env, doc, label) or rec["statement"]
        if not rec["passed"]:
            logger.warning(f"{where}: FAILED", type="elbo_terms", subtype="ledger")
    # chapters executed as notebooks must verify every identity registered for them
    notebooks = {d for d in env.found_docs if "kernelspec" in env.metadata.get(d, {})}
    for rid, ident in IDENTITIES.items():
        if ident.chapter in notebooks and rid not in seen:
            logger.warning(
                f"identity '{rid}' is registered for chapter '{ident.chapter}' but that chapter never verifies it",
                type="elbo_terms",
                subtype="ledger",
            )
    # each row of the ledger is a reference target: {ref}`identity-<id>` from any page
    std = env.get_domain("std")
    ledger_doc = _ledger_doc(env)
    if ledger_doc is not None:
        for rec in records:
            name = f"identity-{rec['id']}"
            std.labels[name] = (ledger_doc, name, f"ledger: {rec['id']}")
            std.anonlabels[name] = (ledger_doc, name)
    app.env.elbo_ledger = records
    return []


def _ledger_doc(env):
    """The page that holds the ``{identity-ledger}`` directive."""
    docs = [d for d, meta in getattr(env, "elbo_ledger_pages", {}).items() if meta]
    return docs[0] if docs else None


def _displayed_latex(env, docname, label):
    """The LaTeX of the equation labelled ``label`` on page ``docname``, as the page shows it."""
    for node in env.get_doctree(docname).findall(nodes.math_block):
        if node.get("label") == label:
            return node.astext().strip()
    return None


def _text_cell(text, literal=False):
    entry = nodes.entry()
    para = nodes.paragraph()
    para += nodes.literal(text=text) if literal else nodes.Text(text)
    entry += para
    return entry


def _table(app, fromdocname, records):
    """Four columns: verdict; id and where it is shown; the statement; how it was checked, by what code."""
    headers = ["", "identity", "statement", "check"]
    table = nodes.table(classes=["identity-ledger", "colwidths-given"])
    tgroup = nodes.tgroup(cols=len(headers))
    table += tgroup
    for width in (3, 17, 56, 24):
        tgroup += nodes.colspec(colwidth=width)
    thead = nodes.thead()
    row = nodes.row()
    for h in headers:
        row += _text_cell(h)
    thead += row
    tgroup += thead
    tbody = nodes.tbody()
    for rec in records:
        row = nodes.row(ids=[f"identity-{rec['id']}"])
        row += _text_cell("✔" if rec["passed"] else "✘")
        entry = nodes.entry()
        para = nodes.paragraph()
        para += nodes.literal(text=rec["id"])
        entry += para
        para = nodes.paragraph()
        uri = app.builder.get_relative_uri(fromdocname, rec["_docname"])
        if rec.get("label"):
            uri += f"#equation-{rec['label']}"
        para += nodes.reference("", env_title(app, rec["_docname"]), refuri=uri, internal=True)
        entry += para
        row += entry
        entry = nodes.entry()
        entry += nodes.math(rec["statement"], rec["statement"])
        row += entry
        entry = nodes.entry(classes=["ledger-check"])
        sym = rec["symbolic"]
        if sym is not None:
            entry += nodes.paragraph(text="SymPy: " + ("proved" if sym else "not proved"))
        num = rec["numeric"]
        if num is not None:
            kind = "same draw" if num["kind"] == "exact" else "Monte Carlo"
            entry += nodes.paragraph(text=f"{kind}: |Δ| = {num['abs_error']:.1e} ≤ {num['tolerance']:.1e}")
        for text in [rec["code"].removeprefix("elbo_terms.")] + [t.removeprefix("tests/") for t in rec["tests"]]:
            para = nodes.paragraph()
            para += nodes.literal(text=text)
            entry += para
        row += entry
        tbody += row
    tgroup += tbody
    return table


def env_title(app, docname):
    title = app.env.titles.get(docname)
    return title.astext() if title is not None else docname


def fill_ledger(app, doctree, fromdocname):
    records = getattr(app.env, "elbo_ledger", None)
    for node in list(doctree.findall(ledger_placeholder)):
        if records is None:
            records = collect_records(app, app.env)
        node.replace_self(_table(app, fromdocname, records))


def write_json(app, exception):
    if exception is not None or app.builder.format != "html":
        return
    import pyro
    import sympy
    import torch

    records = getattr(app.env, "elbo_ledger", None)
    if records is None:
        records = collect_records(app, app.env)
    keys = ["id", "chapter", "label", "statement", "symbolic", "numeric", "passed"]
    out = {
        "pyro": pyro.__version__,
        "torch": torch.__version__,
        "sympy": sympy.__version__,
        "identities": [{k: rec[k] for k in keys} for rec in records],
    }
    Path(app.outdir, "ledger.json").write_text(json.dumps(out, indent=2, sort_keys=False) + "\n", encoding="utf8")


def purge(app, env, docname):
    getattr(env, "elbo_ledger_pages", {}).pop(docname, None)


def merge(app, env, docnames, other):
    if not hasattr(env, "elbo_ledger_pages"):
        env.elbo_ledger_pages = {}
    env.elbo_ledger_pages.update(getattr(other, "elbo_ledger_pages", {}))


def setup(app):
    app.add_node(ledger_placeholder)
    app.connect("env-purge-doc", purge)
    app.connect("env-merge-info", merge)
    app.add_directive("identity-ledger", IdentityLedgerDirective)
    app.connect("env-check-consistency", lambda app, env: check_records(app, env))
    app.connect("doctree-resolved", fill_ledger)
    app.connect("build-finished", write_json)
    return {"version": "0.1", "parallel_read_safe": True, "parallel_write_safe": True}
