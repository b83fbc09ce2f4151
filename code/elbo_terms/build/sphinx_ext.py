"""Sphinx extension: the ledger of identities, checked claims and source checks.

While the chapters execute, :func:`elbo_terms.build.book.verify` glues one record per check
(myst-nb writes them to ``<outdir>/<docname>.glue.json``). Once every page is read this
extension

* checks the records: each was verified in the chapter the registry names, backs an
  equation label that exists on that page, and passed; every registered check of a
  chapter in the build was verified there exactly once. Anything else is a warning,
  which ``-W`` turns into a failed build naming the check;
* fills the ledger page: ``{identity-ledger}`` with ``:kind:`` ``identity``, ``claim`` or
  ``source`` is the table of that kind of record; ``{pyro-versions}`` is the matrix of checks
  against Pyro releases, read from ``book/_data/pyro-versions.json`` (written by
  ``nox -s versions``);
* renders counts computed from the ledger, never typed: the directive ``{ledger-summary}``
  (one sentence: how many identities, proved how, how many claims and source checks), the
  directive ``{pyro-versions-summary}`` (one sentence: the Pyro releases every check holds
  for) and the role ``{ledger}`key``` (one number or range; keys in :data:`ROLE_KEYS`);
* writes ``ledger.json`` next to the HTML, with the records in three lists
  (``identities``, ``claims``, ``source_checks``), and copies the version record beside it.

:func:`ledger_counts` gives the counts to other code (the build log's summary line).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective, SphinxRole

from .book import LEDGER_PREFIX
from .identity import NUMERIC_FIELDS

logger = logging.getLogger(__name__)

#: record kind -> (key of its list in ledger.json, section label on the ledger page, name in prose)
SECTIONS = {
    "identity": ("identities", "ledger-identities", "identities"),
    "claim": ("claims", "ledger-claims", "checked claims"),
    "source": ("source_checks", "ledger-source-checks", "source checks"),
}
#: the keys of one record in ledger.json, in order
RECORD_FIELDS = ("id", "kind", "chapter", "label", "statement", "symbolic", "numeric", "passed", "code")
#: where the Pyro version record lives, relative to the book's source folder
VERSIONS_RECORD = Path("_data") / "pyro-versions.json"
VERSIONS_SECTION = "ledger-pyro-versions"


class ledger_placeholder(nodes.General, nodes.Element):
    """Stands for something computed from the ledger; replaced when the page is written."""


class ledger_inline(nodes.Inline, nodes.TextElement):
    """Inline placeholder for the ``{ledger}`` role."""


def _note_page(env):
    """Remember that the current page shows ledger data (it is re-rendered on every build)."""
    if not hasattr(env, "elbo_ledger_users"):
        env.elbo_ledger_users = set()
    env.elbo_ledger_users.add(env.docname)


class IdentityLedgerDirective(SphinxDirective):
    """``{identity-ledger}``: the table of every record of one kind (``:kind:``, default ``identity``)."""

    has_content = False
    option_spec = {"kind": lambda arg: directives.choice(arg, tuple(SECTIONS))}

    def run(self):
        if not hasattr(self.env, "elbo_ledger_pages"):
            self.env.elbo_ledger_pages = {}
        self.env.elbo_ledger_pages[self.env.docname] = True
        _note_page(self.env)
        return [ledger_placeholder(what="table", kind=self.options.get("kind", "identity"))]


def _simple_directive(what: str):
    class _Directive(SphinxDirective):
        has_content = False

        def run(self):
            _note_page(self.env)
            return [ledger_placeholder(what=what)]

    _Directive.__name__ = f"{what.title().replace('-', '')}Directive"
    return _Directive


LedgerSummaryDirective = _simple_directive("summary")
PyroVersionsDirective = _simple_directive("versions")
PyroVersionsSummaryDirective = _simple_directive("versions-summary")

#: keys of the ``{ledger}`` role: ``{ledger}`identities``` renders the number of identities, ...
ROLE_KEYS = (
    "identities",
    "proved",
    "proved-only",
    "numeric-only",
    "claims",
    "source-checks",
    "failed",
    "pyro-range",
    "pyro-tested",
)


class LedgerRole(SphinxRole):
    """``{ledger}`key```: one number (or the Pyro range) computed from the ledger at build time."""

    def run(self):
        key = self.text.strip()
        if key not in ROLE_KEYS:
            msg = self.inliner.reporter.error(
                f"{{ledger}} role: unknown key {key!r}; known: {', '.join(ROLE_KEYS)}", line=self.lineno
            )
            return [self.inliner.problematic(self.rawtext, self.rawtext, msg)], [msg]
        _note_page(self.env)
        return [ledger_inline(key=key)], []


# ------------------------------------------------------------------ the records
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
            rec.setdefault("kind", "identity")
            rec["_docname"] = docname
            records.append(rec)
    return records


def check_records(app, env):
    from .identity import registered

    records = collect_records(app, env)
    equations = env.get_domain("math").data.get("objects", {})
    seen = {}
    for rec in records:
        rid, doc = rec["id"], rec["_docname"]
        where = f"{rec['kind']} '{rid}' (verified in '{doc}')"
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
    for rid, ident in registered(getattr(app.config, "nb_execution_cache_path", None)).items():
        kind, chapter = ident["kind"], ident["chapter"]
        if chapter in notebooks and rid not in seen:
            logger.warning(
                f"{kind} '{rid}' is registered for chapter '{chapter}' but that chapter never verifies it",
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
    env.elbo_ledger = records
    return []


def _records(app) -> list[dict]:
    records = getattr(app.env, "elbo_ledger", None)
    if records is None:
        records = collect_records(app, app.env)
        app.env.elbo_ledger = records
    return records


def counts_of(records: list[dict]) -> dict:
    """How many records of each kind, and how the identities were checked."""
    idents = [r for r in records if r["kind"] == "identity"]
    return {
        "identities": len(idents),
        "proved": sum(1 for r in idents if r["symbolic"] is True and r["numeric"] is not None),
        "proved_only": sum(1 for r in idents if r["symbolic"] is True and r["numeric"] is None),
        "numeric_only": sum(1 for r in idents if r["symbolic"] is None and r["numeric"] is not None),
        "claims": sum(1 for r in records if r["kind"] == "claim"),
        "source_checks": sum(1 for r in records if r["kind"] == "source"),
        "passed": sum(1 for r in records if r["passed"]),
        "failed": sum(1 for r in records if not r["passed"]),
    }


def ledger_counts(env) -> dict:
    """The ledger's counts for this build (for the build log's summary line).

    Keys: ``identities`` (records of kind identity), ``proved`` (of them: proved with SymPy
    and checked numerically), ``proved_only`` (SymPy only), ``numeric_only`` (checked
    numerically only), ``claims``, ``source_checks``, ``passed`` and ``failed`` (records of
    every kind). Available once the environment is consistent (from the
    ``env-check-consistency`` event on, e.g. at ``build-finished``); before that, or in a
    build without the ledger's records, every count is 0.
    """
    return counts_of(getattr(env, "elbo_ledger", None) or [])


def _ledger_doc(env):
    """The page that holds the ``{identity-ledger}`` directive."""
    docs = sorted(d for d, meta in getattr(env, "elbo_ledger_pages", {}).items() if meta)
    return docs[0] if docs else None


def _displayed_latex(env, docname, label):
    """The LaTeX of the equation labelled ``label`` on page ``docname``, as the page shows it."""
    for node in env.get_doctree(docname).findall(nodes.math_block):
        if node.get("label") == label:
            return node.astext().strip()
    return None


# ------------------------------------------------------------------ the tables
def _fmt(x) -> str:
    if x is None:
        return "–"
    return f"{x:.6g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.3e}"


def _para(*children, text=None, classes=()):
    para = nodes.paragraph(classes=list(classes))
    if text is not None:
        para += nodes.Text(text)
    for child in children:
        para += child
    return para


def _entry(*children, classes=()):
    entry = nodes.entry(classes=list(classes))
    for child in children:
        entry += child
    return entry


def _header_table(headers, widths, classes):
    table = nodes.table(classes=["identity-ledger", "colwidths-given", *classes])
    tgroup = nodes.tgroup(cols=len(headers))
    table += tgroup
    for width in widths:
        tgroup += nodes.colspec(colwidth=width)
    thead = nodes.thead()
    row = nodes.row()
    for h in headers:
        row += _entry(_para(text=h))
    thead += row
    tgroup += thead
    tbody = nodes.tbody()
    tgroup += tbody
    return table, tbody


def _where(app, fromdocname, rec):
    """The record's id and a link to where the book states it."""
    uri = app.builder.get_relative_uri(fromdocname, rec["_docname"])
    if rec.get("label"):
        uri += f"#equation-{rec['label']}"
    link = nodes.reference("", env_title(app, rec["_docname"]), refuri=uri, internal=True)
    return _entry(_para(nodes.literal(text=rec["id"])), _para(link))


def _code_and_tests(rec):
    texts = [rec["code"].removeprefix("elbo_terms.")] + [t.removeprefix("tests/") for t in rec.get("tests", [])]
    return [_para(nodes.literal(text=t)) for t in texts]


def _side(num, side: str) -> str:
    """``value ± se (what it is)`` for one side of a numeric check."""
    text = _fmt(num[side])
    se = num.get(f"{side}_se")
    if se:
        text += f" ± {_fmt(se)}"
    elif se == 0 and num["kind"] in ("inequality", "interval", "monte-carlo"):
        text += " (exact)"
    what = num.get(f"{side}_is")
    return f"{text} — {what}" if what else text


def _identity_row(app, fromdocname, rec):
    row = nodes.row(ids=[f"identity-{rec['id']}"])
    row += _entry(_para(text="✔" if rec["passed"] else "✘"))
    row += _where(app, fromdocname, rec)
    row += _entry(nodes.math(rec["statement"], rec["statement"]))
    cell = []
    sym = rec["symbolic"]
    if sym is not None:
        cell.append(_para(text="SymPy: " + ("proved" if sym else "not proved")))
    num = rec["numeric"]
    if num is not None:
        kind = "same draw" if num["kind"] == "exact" else f"Monte Carlo, n = {num.get('n')}"
        cell.append(_para(text=f"{kind}: |Δ| = {num['abs_error']:.1e} ≤ {num['tolerance']:.1e}"))
        cell.append(_para(text=f"left {_side(num, 'lhs')}; right {_side(num, 'rhs')}"))
    row += _entry(*cell, *_code_and_tests(rec), classes=["ledger-check"])
    return row


def _claim_row(app, fromdocname, rec):
    num = rec["numeric"]
    row = nodes.row(ids=[f"identity-{rec['id']}"])
    row += _entry(_para(text="✔" if rec["passed"] else "✘"))
    row += _where(app, fromdocname, rec)
    row += _entry(nodes.math(rec["statement"], rec["statement"]))
    if num is None:  # a claim proved with SymPy only
        row += _entry(_para(text="SymPy: " + ("proved" if rec["symbolic"] else "not proved")), classes=["ledger-check"])
    else:
        rel = "in" if num["relation"] == "in" else num["relation"]
        cell = [_para(text=f"left {_side(num, 'lhs')}")]
        if num["relation"] == "in":
            cell.append(_para(text=f"{rel} ({_fmt(num['lo'])}, {_fmt(num['hi'])})"))
        else:
            cell.append(_para(text=f"{rel} right {_side(num, 'rhs')}"))
        margin = f"{num['k']:g} × {_fmt(num['stderr'])}" if num.get("k") is not None else "0"
        cell.append(_para(text=f"gap {_fmt(num['gap'])} vs margin {margin} = {_fmt(num['tolerance'])}"))
        row += _entry(*cell, classes=["ledger-check"])
    row += _entry(*_code_and_tests(rec), classes=["ledger-check"])
    return row


def _source_row(app, fromdocname, rec):
    num = rec["numeric"]
    row = nodes.row(ids=[f"identity-{rec['id']}"])
    row += _entry(_para(text="✔" if rec["passed"] else "✘"))
    row += _where(app, fromdocname, rec)
    cell = []
    if num is not None:
        cell.append(_para(text=f"{num['lhs']:g} of {num['rhs']:g} quoted lines found in the installed Pyro"))
        for line in num.get("missing") or []:
            cell.append(_para(nodes.literal(text=line), text="missing: "))
    row += _entry(*cell)
    row += _entry(*_code_and_tests(rec), classes=["ledger-check"])
    return row


def _table(app, fromdocname, records, kind="identity"):
    """The records of one kind, one row each, in book order."""
    records = [r for r in records if r["kind"] == kind]
    if kind == "identity":
        table, body = _header_table(["", "identity", "statement", "check"], (3, 17, 56, 24), ["ledger-identities"])
        rows = [_identity_row(app, fromdocname, r) for r in records]
    elif kind == "claim":
        table, body = _header_table(
            ["", "claim", "statement", "the two sides and the margin", "code and tests"],
            (3, 15, 34, 30, 18),
            ["ledger-claims"],
        )
        rows = [_claim_row(app, fromdocname, r) for r in records]
    else:
        table, body = _header_table(
            ["", "source check", "result", "code and tests"], (3, 22, 45, 30), ["ledger-source-checks"]
        )
        rows = [_source_row(app, fromdocname, r) for r in records]
    if not rows:
        return _para(text=f"This build has no {SECTIONS[kind][2]}.")
    for row in rows:
        body += row
    return table


def env_title(app, docname):
    title = app.env.titles.get(docname)
    return title.astext() if title is not None else docname


# ------------------------------------------------------------------ sentences
def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _section_link(app, fromdocname, kind_or_label: str, text: str):
    ledger = _ledger_doc(app.env)
    if ledger is None:
        return nodes.Text(text)
    label = SECTIONS[kind_or_label][1] if kind_or_label in SECTIONS else kind_or_label
    uri = app.builder.get_relative_uri(fromdocname, ledger) + f"#{label}"
    return nodes.reference("", text, refuri=uri, internal=True)


def summary_paragraph(app, fromdocname, records):
    """One sentence: N identities -- how checked -- C checked claims and R source checks, all passing."""
    c = counts_of(records)
    how = []
    if c["proved"]:
        how.append(f"{c['proved']} proved with SymPy and checked numerically")
    if c["proved_only"]:
        how.append(f"{c['proved_only']} proved with SymPy only")
    if c["numeric_only"]:
        how.append(f"{c['numeric_only']} checked numerically only")
    para = nodes.paragraph(classes=["ledger-summary"])
    para += _section_link(app, fromdocname, "identity", _plural(c["identities"], "identity", "identities"))
    if how:
        para += nodes.Text(" — " + ", ".join(how) + " — ")
    else:
        para += nodes.Text(", ")
    para += _section_link(app, fromdocname, "claim", _plural(c["claims"], "checked claim", "checked claims"))
    para += nodes.Text(", and ")
    para += _section_link(app, fromdocname, "source", _plural(c["source_checks"], "source check", "source checks"))
    total = c["passed"] + c["failed"]
    if c["failed"] == 0:
        para += nodes.Text(", all passing in this build." if total > 1 else ", passing in this build.")
    else:
        para += nodes.Text(f"; {c['failed']} of them FAIL in this build.")
    return para


# ------------------------------------------------------------------ Pyro versions
def _version_key(v: str):
    parts = []
    for p in v.split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _versions_path(app) -> Path | None:
    """The book's version record; a partial or throwaway copy of the book uses the project's."""
    for path in (Path(app.srcdir) / VERSIONS_RECORD, Path(app.confdir) / "book" / VERSIONS_RECORD):
        if path.is_file():
            return path
    return None


def load_versions(app) -> dict | None:
    """The record ``nox -s versions`` wrote (``book/_data/pyro-versions.json``), or None."""
    path = _versions_path(app)
    if path is None:
        return None
    data = json.loads(path.read_text(encoding="utf8"))
    data["versions"] = sorted(data.get("versions", []), key=lambda row: _version_key(row["pyro"]))
    return data


def _tested(data) -> list[dict]:
    return [row for row in data["versions"] if row["status"] == "ok"]


def _holds(row) -> bool:
    return row["status"] == "ok" and bool(row["checks"]) and all(c["passed"] for c in row["checks"].values())


def _range(versions: list[str]) -> str:
    if not versions:
        return "none"
    return versions[0] if len(versions) == 1 else f"{versions[0]}–{versions[-1]}"


def _runs(tested: list[str], subset: list[str]) -> str:
    """``subset`` of the tested releases as runs of consecutive tested releases: ``1.8.1, 1.8.3–1.9.2``."""
    runs, current = [], []
    for v in tested:
        if v in subset:
            current.append(v)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return ", ".join(_range(run) for run in runs) if runs else "none"


def versions_summary(data) -> dict:
    """What the record says: the tested releases every check holds for, those where some fail, the rest."""
    tested = _tested(data)
    names = [row["pyro"] for row in tested]
    holding = [row["pyro"] for row in tested if _holds(row)]
    failing = [row for row in tested if not _holds(row)]
    untested = [row for row in data["versions"] if row["status"] != "ok"]
    return {
        "holding": holding,
        "holding_text": _runs(names, holding),
        "failing": failing,
        "failing_text": _runs(names, [row["pyro"] for row in failing]),
        "untested": untested,
        "tested": tested,
        "tested_text": _range(names),
    }


def versions_sentence(app, fromdocname, data, records):
    """One sentence: the Pyro releases every check holds for, computed from the record."""
    para = nodes.paragraph(classes=["pyro-versions-summary"])
    if data is None:
        para += nodes.Text("No Pyro version record in this build (run nox -s versions).")
        return para
    s = versions_summary(data)
    para += nodes.Text("Every identity, claim and source check holds for ")
    para += _section_link(app, fromdocname, VERSIONS_SECTION, f"Pyro {s['holding_text']}")
    para += nodes.Text(f" (with torch {data['torch'].split('+')[0]}, checked {data['date']})")
    if s["failing"]:
        n = {iid for row in s["failing"] for iid, c in row["checks"].items() if not c["passed"]}
        para += nodes.Text(f"; on {s['failing_text']}, {_plural(len(n), 'check fails', 'checks fail')}")
    if s["untested"]:
        every = [row["pyro"] for row in data["versions"]]
        untested = _runs(every, [row["pyro"] for row in s["untested"]])
        para += nodes.Text(f"; {untested} cannot be installed or imported with this torch")
    stale = _stale(data, records)
    if stale:
        para += nodes.Text(f" ({_plural(len(stale), 'check', 'checks')} of this build are not in the record yet)")
    para += nodes.Text(".")
    return para


def _stale(data, records) -> list[str]:
    """Ids in this build's ledger that the version record does not have for the pinned release."""
    pinned = next((row for row in data["versions"] if row["pyro"] == data.get("pinned")), None)
    known = set(pinned["checks"]) if pinned else set()
    return sorted({r["id"] for r in records} - known) if records else []


def versions_matrix(app, fromdocname, data, records):
    """Checks x Pyro releases; a failure shows its reason (hover, and a numbered note below)."""
    if data is None:
        return [_para(text="No Pyro version record in this build: run nox -s versions.")]
    tested = _tested(data)
    ledger = _ledger_doc(app.env)
    base = app.builder.get_relative_uri(fromdocname, ledger) if ledger else ""
    ids = {}
    for row in tested:
        for iid, check in row["checks"].items():
            ids.setdefault(iid, check["kind"])
    for rec in records:
        ids.setdefault(rec["id"], rec["kind"])
    order = {kind: i for i, kind in enumerate(SECTIONS)}
    book_order = {rec["id"]: i for i, rec in enumerate(records)}
    rows = sorted(ids, key=lambda iid: (order.get(ids[iid], 9), book_order.get(iid, len(book_order)), iid))
    headers = ["check"] + [row["pyro"] for row in tested]
    table, body = _header_table(headers, (28,) + (6,) * len(tested), ["pyro-versions"])
    notes = []
    current = None
    for iid in rows:
        if ids[iid] != current:
            current = ids[iid]
            row = nodes.row(classes=["pyro-versions-group"])
            row += _entry(_para(nodes.strong(text=SECTIONS.get(current, (None, None, current))[2].capitalize())))
            for _ in tested:
                row += _entry()
            body += row
        row = nodes.row()
        row += _entry(_para(nodes.reference("", "", nodes.literal(text=iid), refuri=f"{base}#identity-{iid}")))
        for version in tested:
            check = version["checks"].get(iid)
            if check is None:
                row += _entry(_para(nodes.abbreviation("–", "–", explanation="not in the record for this release")))
            elif check["passed"]:
                row += _entry(_para(text="✔"))
            else:
                notes.append((iid, version["pyro"], check["message"] or "failed"))
                ref = nodes.reference("", f"✘ {len(notes)}", refid=f"pyro-versions-note-{len(notes)}")
                row += _entry(_para(nodes.abbreviation("", "", ref, explanation=notes[-1][2])))
        body += row
    out = [table]
    if notes:
        items = nodes.enumerated_list(classes=["pyro-versions-notes"])
        for n, (iid, version, message) in enumerate(notes, start=1):
            item = nodes.list_item(ids=[f"pyro-versions-note-{n}"])
            item += _para(nodes.literal(text=iid), nodes.Text(f" with Pyro {version}: "), nodes.literal(text=message))
            items += item
        out.append(_para(text="Why a check fails, by the number in its cell:"))
        out.append(items)
    every = [row["pyro"] for row in data["versions"]]
    reasons = {}  # releases that could not be checked, grouped by the reason
    for row in data["versions"]:
        if row["status"] != "ok":
            reasons.setdefault((row["status"], row.get("error") or ""), []).append(row["pyro"])
    if reasons:
        para = _para(text="Releases that could not be checked: ")
        for i, ((status, error), releases) in enumerate(reasons.items()):
            para += nodes.Text(("; " if i else "") + f"{_runs(every, releases)} ({status}: ")
            para += nodes.literal(text=error)
            para += nodes.Text(")")
        out.append(para)
    stale = _stale(data, records)
    if stale:
        out.append(
            _para(
                text=f"Not in the record yet (added after it was made; run nox -s versions): {', '.join(stale)}.",
                classes=["pyro-versions-stale"],
            )
        )
    return out


# ------------------------------------------------------------------ rendering
def _role_text(app, key, records) -> str:
    c = counts_of(records)
    if key.startswith("pyro-"):
        data = load_versions(app)
        if data is None:
            return "(no version record)"
        s = versions_summary(data)
        return s["holding_text"] if key == "pyro-range" else s["tested_text"]
    return str(c[key.replace("-", "_")])


def fill_ledger(app, doctree, fromdocname):
    placeholders = list(doctree.findall(ledger_placeholder))
    inlines = list(doctree.findall(ledger_inline))
    if not placeholders and not inlines:
        return
    records = _records(app)
    for node in inlines:
        node.replace_self(nodes.Text(_role_text(app, node["key"], records)))
    for node in placeholders:
        what = node["what"]
        if what == "table":
            node.replace_self(_table(app, fromdocname, records, node["kind"]))
        elif what == "summary":
            node.replace_self(summary_paragraph(app, fromdocname, records))
        elif what == "versions":
            node.replace_self(versions_matrix(app, fromdocname, load_versions(app), records))
        elif what == "versions-summary":
            node.replace_self(versions_sentence(app, fromdocname, load_versions(app), records))


def _json_record(rec: dict) -> dict:
    """One record with the fields of :data:`RECORD_FIELDS` (and its numeric part's keys) in their order."""
    out = {k: rec.get(k) for k in RECORD_FIELDS}
    if out["numeric"] is not None:
        out["numeric"] = {k: out["numeric"].get(k) for k in NUMERIC_FIELDS}
    return out


def ledger_json(records, versions: dict) -> dict:
    """The content of ``ledger.json``: versions, counts, and the records in three lists."""
    out = dict(versions)
    out["counts"] = counts_of(records)
    for kind, (key, _, _) in SECTIONS.items():
        out[key] = [_json_record(rec) for rec in records if rec["kind"] == kind]
    return out


def write_json(app, exception):
    if exception is not None or app.builder.format != "html":
        return
    from importlib.metadata import version  # the installed versions, without importing torch

    versions = {"pyro": version("pyro-ppl"), "torch": version("torch"), "sympy": version("sympy")}
    out = ledger_json(_records(app), versions)
    Path(app.outdir, "ledger.json").write_text(json.dumps(out, indent=2, sort_keys=False) + "\n", encoding="utf8")
    record = _versions_path(app)
    if record is not None:
        shutil.copyfile(record, Path(app.outdir) / record.name)


def outdated(app, env, added, changed, removed):
    """Pages that show ledger data are re-read on every build: the data comes from other pages."""
    return sorted(getattr(env, "elbo_ledger_users", set()) - set(removed))


def purge(app, env, docname):
    getattr(env, "elbo_ledger_pages", {}).pop(docname, None)
    getattr(env, "elbo_ledger_users", set()).discard(docname)


def merge(app, env, docnames, other):
    if not hasattr(env, "elbo_ledger_pages"):
        env.elbo_ledger_pages = {}
    env.elbo_ledger_pages.update(getattr(other, "elbo_ledger_pages", {}))
    if not hasattr(env, "elbo_ledger_users"):
        env.elbo_ledger_users = set()
    env.elbo_ledger_users |= getattr(other, "elbo_ledger_users", set())


def setup(app):
    app.add_node(ledger_placeholder)
    app.add_node(ledger_inline)
    app.connect("env-purge-doc", purge)
    app.connect("env-merge-info", merge)
    app.connect("env-get-outdated", outdated)
    app.add_directive("identity-ledger", IdentityLedgerDirective)
    app.add_directive("ledger-summary", LedgerSummaryDirective)
    app.add_directive("pyro-versions", PyroVersionsDirective)
    app.add_directive("pyro-versions-summary", PyroVersionsSummaryDirective)
    app.add_role("ledger", LedgerRole())
    app.connect("env-check-consistency", lambda app, env: check_records(app, env))
    app.connect("doctree-resolved", fill_ledger)
    app.connect("build-finished", write_json)
    return {"version": "0.2", "parallel_read_safe": True, "parallel_write_safe": True}
