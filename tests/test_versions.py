"""The Pyro version record (book/_data/pyro-versions.json, written by ``nox -s versions``) agrees
with this build for the pinned Pyro: the same checks, with the same results.

If this fails after a check was added, renamed or changed, run ``nox -s versions`` (or, to
refresh only the pinned release, ``nox -s versions -- 1.9.2``) and commit the record.
"""

import json

import pytest
from conftest import ROOT


@pytest.mark.book
def test_the_version_record_agrees_with_the_ledger_for_the_pinned_pyro(built_book):
    record = json.loads((ROOT / "book" / "_data" / "pyro-versions.json").read_text())
    ledger = built_book.ledger()
    assert record["pinned"] == ledger["pyro"], "the record was made for another pinned Pyro: run nox -s versions"
    same_torch = record["torch"].split("+")[0] == ledger["torch"].split("+")[0]
    assert same_torch, "the record was made with another torch: run nox -s versions"
    row = next(r for r in record["versions"] if r["pyro"] == record["pinned"])
    assert row["status"] == "ok", row.get("error")
    lists = ("identities", "claims", "source_checks")
    built = {r["id"]: (r["kind"], r["passed"]) for key in lists for r in ledger[key]}
    recorded = {iid: (c["kind"], c["passed"]) for iid, c in row["checks"].items()}
    stale = "the version record is stale: run nox -s versions -- " + record["pinned"]
    assert sorted(recorded) == sorted(built), f"{stale}; differing ids: {sorted(set(recorded) ^ set(built))}"
    assert recorded == built, f"{stale}; differing: {[i for i in built if recorded[i] != built[i]]}"
    failures = {iid: c["message"] for iid, c in row["checks"].items() if not c["passed"]}
    assert not failures, failures


@pytest.mark.book
def test_the_ledger_page_shows_the_version_matrix(built_book):
    record = json.loads((ROOT / "book" / "_data" / "pyro-versions.json").read_text())
    page = (built_book.html / "ledger.html").read_text()
    assert 'class="pyro-versions' in page
    for row in record["versions"]:  # a column per release that ran; the others named (in runs) below the matrix
        if row["status"] == "ok":
            assert f"<p>{row['pyro']}</p>" in page, row["pyro"]
    if any(row["status"] != "ok" for row in record["versions"]):
        assert "Releases that could not be checked" in page
    copied = (built_book.html / "pyro-versions.json").read_bytes()
    assert copied == (ROOT / "book" / "_data" / "pyro-versions.json").read_bytes()
