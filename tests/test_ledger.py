"""The ledger: three kinds of record, counts computed from them, every ledger.json field documented.

The build test makes a throwaway book (the real conf.py, code/ and ledger page) with one chapter
that verifies one identity, one claim and one source check, and a made-up Pyro version record.
"""

import json
import re
import shutil
from pathlib import Path

from conftest import ROOT, sphinx_build
from elbo_terms.build.identity import NUMERIC_FIELDS
from elbo_terms.build.sphinx_ext import RECORD_FIELDS, SECTIONS, counts_of

FRONT = (ROOT / "book" / "elbo.md").read_text().split("---\n", 2)[1]

CHAPTER = f"""---
{FRONT}---
# Three kinds of check

$$
a - a = 0
$$ (a-minus-a)

```{{code-cell}} ipython3
import sympy as sp
from elbo_terms.build.book import verify
from elbo_terms.build.identity import Identity, exact, inequality

a = sp.Symbol("a")
verify(Identity(id="a-minus-a", chapter="chapter", label="a-minus-a", statement="a - a = 0",
                symbolic=lambda v: a - a, numeric=lambda v: exact(0.0, 0.0), wrong=("none",)))
```

Two is more than one.

```{{code-cell}} ipython3
verify(Identity(id="two-exceeds-one", kind="claim", chapter="chapter", statement="2 > 1",
                numeric=lambda v: inequality(2.0, 1.0, ">", lhs_se=0.01, lhs_is="two, measured"),
                wrong=("none",)))
verify(Identity(id="quoted-lines-found", kind="source", chapter="chapter", statement="3 = 3",
                numeric=lambda v: exact(3.0, 3.0), wrong=("none",)))
```
"""

INDEX = """# Throwaway

```{ledger-summary}
```

There are {ledger}`claims` claims; every check holds for Pyro {ledger}`pyro-range`.

```{pyro-versions-summary}
```

```{toctree}
:numbered:

chapter
```

```{toctree}

ledger
refs
```
"""


def _record(version, status="ok", failures=()):
    ids = {"a-minus-a": "identity", "two-exceeds-one": "claim", "quoted-lines-found": "source"}
    if status != "ok":
        return {"pyro": version, "status": status, "error": "ImportError: too old", "checks": {}}
    checks = {
        iid: {"kind": kind, "passed": iid not in failures, "message": "line not found" if iid in failures else None}
        for iid, kind in ids.items()
    }
    return {"pyro": version, "status": "ok", "error": None, "checks": checks}


VERSIONS = {
    "command": "nox -s versions",
    "date": "2026-01-01",
    "torch": "2.13.0+cpu",
    "pinned": "1.9.2",
    "versions": [
        _record("1.9.2"),
        _record("1.8.0", status="import-failed"),
        _record("1.8.6", failures=("quoted-lines-found",)),
        _record("1.9.0"),
    ],
}


def _text(html: str) -> str:
    return " ".join(re.sub(r"<[^>]+>", "", html).split())


def test_the_ledger_separates_the_kinds_and_counts_them(tmp_path):
    shutil.copy(ROOT / "conf.py", tmp_path / "conf.py")
    shutil.copytree(ROOT / "code", tmp_path / "code", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    book = tmp_path / "book"
    shutil.copytree(ROOT / "book" / "_static", book / "_static")
    shutil.copy(ROOT / "book" / "references.bib", book / "references.bib")
    shutil.copy(ROOT / "book" / "ledger.md", book / "ledger.md")
    (book / "refs.md").write_text("# References\n\n```{bibliography}\n:all:\n```\n")
    (book / "index.md").write_text(INDEX)
    (book / "chapter.md").write_text(CHAPTER)
    (book / "_data").mkdir()
    (book / "_data" / "pyro-versions.json").write_text(json.dumps(VERSIONS))

    build = sphinx_build(book, tmp_path / "_build", confdir=tmp_path)
    assert build.returncode == 0, build.log[-4000:]

    ledger = build.ledger()
    assert set(ledger) == {"pyro", "torch", "sympy", "counts", "identities", "claims", "source_checks"}
    assert [r["id"] for r in ledger["identities"]] == ["a-minus-a"]
    assert [r["id"] for r in ledger["claims"]] == ["two-exceeds-one"]
    assert [r["id"] for r in ledger["source_checks"]] == ["quoted-lines-found"]
    for key, _, _ in SECTIONS.values():
        for rec in ledger[key]:
            assert tuple(rec) == RECORD_FIELDS
            assert tuple(rec["numeric"]) == NUMERIC_FIELDS
    claim = ledger["claims"][0]["numeric"]
    assert (claim["lhs"], claim["rhs"], claim["lhs_se"], claim["rhs_se"], claim["k"]) == (2.0, 1.0, 0.01, 0.0, 5.0)
    assert claim["gap"] == 1.0 and claim["lhs_is"] == "two, measured" and claim["relation"] == ">"
    assert ledger["counts"] == {
        "identities": 1,
        "proved": 1,
        "proved_only": 0,
        "numeric_only": 0,
        "claims": 1,
        "source_checks": 1,
        "passed": 3,
        "failed": 0,
    }

    index = _text((build.html / "index.html").read_text())
    assert (
        "1 identity — 1 proved with SymPy and checked numerically — 1 checked claim, "
        "and 1 source check, all passing in this build." in index
    ), index
    assert "There are 1 claims; every check holds for Pyro 1.9.0–1.9.2." in index
    assert (
        "Every identity, claim and source check holds for Pyro 1.9.0–1.9.2 (with torch 2.13.0, checked 2026-01-01); "
        "on 1.8.6, 1 check fails; 1.8.0 cannot be installed or imported with this torch." in index
    ), index

    page = (build.html / "ledger.html").read_text()
    for iid in ("a-minus-a", "two-exceeds-one", "quoted-lines-found"):
        assert f'id="identity-{iid}"' in page, iid
    # the matrix: releases that ran as columns, a failure's reason on hover and in a note
    assert 'title="line not found"' in page
    assert 'id="pyro-versions-note-1"' in page
    text = _text(page)
    assert "quoted-lines-found with Pyro 1.8.6: line not found" in text
    assert "1.8.0 (import-failed: ImportError: too old)" in text
    assert (build.html / "pyro-versions.json").is_file()


def test_the_ledger_page_documents_every_field_of_ledger_json():
    page = (ROOT / "book" / "ledger.md").read_text()
    lines = page.splitlines()
    # the terms of the definition lists: a line of `names` followed by a line ": definition"
    names = {
        n for i, ln in enumerate(lines[:-1]) if lines[i + 1].startswith(": ") for n in re.findall(r"`([^`]+)`", ln)
    }
    fields = {"pyro", "torch", "sympy", "counts"} | {key for key, _, _ in SECTIONS.values()}
    fields |= set(RECORD_FIELDS) | set(NUMERIC_FIELDS)
    assert not fields - names, f"ledger.md does not document: {sorted(fields - names)}"
    for key in counts_of([]):
        assert f"`{key}`" in page, f"ledger.md does not explain counts.{key}"


def test_counts_tell_identities_claims_and_source_checks_apart():
    def rec(kind, symbolic, numeric=True, passed=True):
        return {"kind": kind, "symbolic": symbolic, "numeric": {} if numeric else None, "passed": passed}

    records = [rec("identity", True), rec("identity", None), rec("identity", True, numeric=False)]
    records += [rec("claim", None), rec("source", None, passed=False)]
    assert counts_of(records) == {
        "identities": 3,
        "proved": 1,
        "proved_only": 1,
        "numeric_only": 1,
        "claims": 1,
        "source_checks": 1,
        "passed": 4,
        "failed": 1,
    }


def test_the_version_record_is_committed_and_well_formed():
    record = json.loads((ROOT / "book" / "_data" / "pyro-versions.json").read_text())
    assert {"command", "date", "torch", "pinned", "versions"} <= record.keys()
    pinned = [row for row in record["versions"] if row["pyro"] == record["pinned"]]
    assert len(pinned) == 1 and pinned[0]["status"] == "ok", "the pinned Pyro must be in the record, checked"
    assert Path(ROOT / "requirements.txt").read_text().count(f"pyro-ppl=={record['pinned']}") == 1
