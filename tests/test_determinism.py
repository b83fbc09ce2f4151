"""Two clean builds give byte-identical ledger.json.

The checks seed their own random streams and compute in float64, so building the book twice
from scratch must record exactly the same numbers. To keep the test cheap it builds the first
chapter (``elbo``) alone twice with ``.ci/build_chapters.py`` (the real conf.py; the other pages
stubbed to their titles, labels and tables of contents), each time into a new folder with a new,
empty execution cache.
"""

import difflib
import subprocess
import sys

import pytest
from conftest import ROOT

CHAPTER = "elbo"


@pytest.mark.book
def test_two_clean_builds_write_the_same_ledger(tmp_path):
    ledgers = []
    for run in ("first", "second"):
        out = tmp_path / run
        cmd = [sys.executable, str(ROOT / ".ci" / "build_chapters.py"), CHAPTER, "--out", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"the {run} build failed:\n{log[-4000:]}"
        assert "Executed notebook" in log, f"the {run} build did not execute {CHAPTER}"
        ledgers.append((out / "html" / "ledger.json").read_bytes())

    first, second = ledgers
    assert b'"chapter": "elbo"' in first, "the ledger records no identity of the chapter"
    a, b = first.decode().splitlines(), second.decode().splitlines()
    diff = difflib.unified_diff(a, b, "first/ledger.json", "second/ledger.json", lineterm="")
    assert first == second, "two clean builds wrote different ledgers:\n" + "\n".join(list(diff)[:60])
