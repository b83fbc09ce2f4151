"""The build as a maintainer relies on it: strict, ledger complete, failures loud, never stale."""

import shutil
from pathlib import Path

import elbo_terms.chapters  # noqa: F401  (registers every identity)
import pytest
from conftest import ROOT, sphinx_build
from elbo_terms.build.identity import IDENTITIES

FRONT = (ROOT / "book" / "elbo.md").read_text().split("---\n", 2)[1]
HEADER = f"---\n{FRONT}---\n"


@pytest.mark.book
def test_the_book_builds_strictly_and_every_identity_passed(built_book):
    from elbo_terms.build.identity import NUMERIC_FIELDS
    from elbo_terms.build.sphinx_ext import RECORD_FIELDS

    ledger = built_book.ledger()
    lists = {"identities": "identity", "claims": "claim", "source_checks": "source"}
    assert set(ledger) == {"pyro", "torch", "sympy", "counts", *lists}
    import pyro
    import torch

    assert ledger["pyro"] == pyro.__version__ and ledger["torch"] == torch.__version__
    assert ledger["identities"], "ledger is empty"
    rows = []
    for key, kind in lists.items():
        for row in ledger[key]:
            assert tuple(row) == RECORD_FIELDS, row["id"]
            assert row["kind"] == kind, row["id"]
            assert row["passed"] is True, row
            num = row["numeric"]
            if num is not None:
                assert tuple(num) == NUMERIC_FIELDS, row["id"]
                if kind == "claim":
                    assert num["kind"] in {"inequality", "interval"} and num["gap"] is not None, row["id"]
                else:
                    assert num["kind"] in {"exact", "monte-carlo"}
                    assert num["abs_error"] <= num["tolerance"], row["id"]
            rows.append(row)
    # every registered check is in the ledger, once, in the list of its kind
    ids = [r["id"] for r in rows]
    assert sorted(ids) == sorted(IDENTITIES), set(ids) ^ set(IDENTITIES)
    assert all(IDENTITIES[r["id"]].kind == r["kind"] for r in rows)
    assert ledger["counts"]["identities"] == len(ledger["identities"])
    assert ledger["counts"]["source_checks"] == len(ledger["source_checks"]) >= 2
    assert len([r for r in rows if r["chapter"] == "elbo"]) >= 5


@pytest.mark.book
def test_the_ledger_page_shows_every_identity(built_book):
    page = (built_book.html / "ledger.html").read_text()
    for iid in IDENTITIES:
        assert f'id="identity-{iid}"' in page, iid


def _throwaway_book(tmp: Path, chapter: str) -> Path:
    """A minimal copy of the project: conf.py, code/, and a book with one chapter."""
    shutil.copy(ROOT / "conf.py", tmp / "conf.py")
    shutil.copytree(ROOT / "code", tmp / "code", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    book = tmp / "book"
    shutil.copytree(ROOT / "book" / "_static", book / "_static")
    shutil.copy(ROOT / "book" / "references.bib", book / "references.bib")
    (book / "index.md").write_text("# Throwaway\n\n```{toctree}\n:numbered:\n\nchapter\nrefs\n```\n")
    (book / "refs.md").write_text("# References\n\n```{bibliography}\n:all:\n```\n")
    (book / "chapter.md").write_text(HEADER + chapter)
    return book


def _one_identity_chapter(identity_id: str, label: str, rhs: float, title: str) -> str:
    """A chapter that displays "1 = rhs" under ``label`` and verifies it as ``identity_id``."""
    return f"""
# {title}

$$
1 = {rhs:g}
$$ ({label})

```{{code-cell}} ipython3
from elbo_terms.build.book import verify
from elbo_terms.build.identity import Identity, exact

verify(Identity(id="{identity_id}", chapter="chapter", label="{label}", statement="1 = {rhs:g}",
                numeric=lambda variant: exact(1.0, {rhs!r}), wrong=("none",)))
```
"""


FALSE_CHAPTER = _one_identity_chapter("deliberately-false", "one-equals-two", 2.0, "A false statement")


def test_a_false_identity_fails_the_build_and_names_itself(tmp_path):
    book = _throwaway_book(tmp_path, FALSE_CHAPTER)
    build = sphinx_build(book, tmp_path / "_build", confdir=tmp_path)
    assert build.returncode != 0
    assert "deliberately-false" in build.log
    assert "IdentityFailed" in build.log


TRUE_CHAPTER = _one_identity_chapter("one-is-one", "one-equals-one", 1.0, "A true statement")


def test_editing_code_re_executes_the_chapters(tmp_path):
    book = _throwaway_book(tmp_path, TRUE_CHAPTER)
    out = tmp_path / "_build"
    first = sphinx_build(book, out, confdir=tmp_path)
    assert first.returncode == 0, first.log[-3000:]
    assert "Executed notebook" in first.log
    second = sphinx_build(book, out, confdir=tmp_path)
    assert second.returncode == 0 and "Using cached notebook" in second.log and "Executed notebook" not in second.log
    module = tmp_path / "code" / "elbo_terms" / "_util.py"
    module.write_text(module.read_text() + "\n# an edit\n")
    third = sphinx_build(book, out, confdir=tmp_path)
    assert third.returncode == 0, third.log[-3000:]
    assert "Executed notebook" in third.log, "a change under code/ must re-execute every chapter"
    assert len(list((out / ".jupyter_cache").iterdir())) == 1, "old caches are pruned"


WRONG_LABEL_CHAPTER = TRUE_CHAPTER.replace('label="one-equals-one"', 'label="no-such-equation"')


def test_a_record_whose_equation_is_missing_fails_the_build(tmp_path):
    book = _throwaway_book(tmp_path, WRONG_LABEL_CHAPTER)
    build = sphinx_build(book, tmp_path / "_build", confdir=tmp_path)
    assert build.returncode != 0
    assert "no-such-equation" in build.log and "one-is-one" in build.log


def test_an_identity_its_chapter_never_verifies_fails_the_build(tmp_path):
    book = _throwaway_book(tmp_path, TRUE_CHAPTER)
    package = tmp_path / "code" / "elbo_terms"
    (package / "chapters" / "forgotten.py").write_text(
        "from ..build.identity import Identity, exact, register\n"
        'register(Identity(id="forgotten-identity", chapter="chapter", statement="2 = 2",\n'
        '                  numeric=lambda v: exact(2.0, 2.0), wrong=("none",)))\n'
    )
    init = package / "chapters" / "__init__.py"
    init.write_text(init.read_text() + "\nfrom . import forgotten  # noqa: E402, F401\n")
    build = sphinx_build(book, tmp_path / "_build", confdir=tmp_path, env={"PYTHONPATH": str(tmp_path / "code")})
    assert build.returncode != 0
    assert "forgotten-identity" in build.log and "never verifies it" in build.log
