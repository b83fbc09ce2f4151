"""Two clean builds give byte-identical ledger.json.

The checks seed their own random streams and compute in float64, so building the book twice
from scratch must record exactly the same numbers. To keep the test cheap it builds a small
throwaway book twice -- the real conf.py, an index, the first chapter (``elbo``), the ledger and
the references -- each time into a new folder with a new, empty execution cache.
"""

import difflib
import shutil

import pytest
from conftest import ROOT, sphinx_build

CHAPTER = "elbo"
INDEX = f"""# Determinism check

```{{toctree}}
:numbered:

{CHAPTER}
```

```{{toctree}}

ledger
references
```
"""


@pytest.mark.book
def test_two_clean_builds_write_the_same_ledger(tmp_path):
    src = tmp_path / "book"
    src.mkdir()
    for page in (CHAPTER, "ledger", "references"):
        shutil.copy(ROOT / "book" / f"{page}.md", src / f"{page}.md")
    (src / "index.md").write_text(INDEX)

    ledgers = []
    for run in ("first", "second"):
        build = sphinx_build(src, tmp_path / run)  # fresh doctrees (-E) and an empty cache in tmp_path/run
        assert build.returncode == 0, f"the {run} build failed:\n{build.log[-4000:]}"
        assert "Executed notebook" in build.log, f"the {run} build did not execute {CHAPTER}"
        ledgers.append((build.html / "ledger.json").read_bytes())

    first, second = ledgers
    assert b'"chapter": "elbo"' in first, "the ledger records no identity of the chapter"
    a, b = first.decode().splitlines(), second.decode().splitlines()
    diff = difflib.unified_diff(a, b, "first/ledger.json", "second/ledger.json", lineterm="")
    assert first == second, "two clean builds wrote different ledgers:\n" + "\n".join(list(diff)[:60])
