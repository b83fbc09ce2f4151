"""The library alone: ``import elbo_terms`` loads neither the book's chapter/build modules nor SymPy (issue 18)."""

import json
import os
import subprocess
import sys

CODE = """
import json, sys
from elbo_terms import TermsTrace_ELBO, TermsTraceMeanField_ELBO, decompose
loaded = sorted(m for m in sys.modules if m.startswith(("elbo_terms.", "sympy", "matplotlib")) or m == "sympy")
print(json.dumps(loaded))
"""


def test_importing_the_library_loads_no_chapter_no_build_module_and_no_sympy():
    out = subprocess.run(
        [sys.executable, "-c", CODE], capture_output=True, text=True, check=True, env=dict(os.environ)
    ).stdout
    loaded = json.loads(out.strip().splitlines()[-1])
    assert not [m for m in loaded if m.startswith(("elbo_terms.chapters", "elbo_terms.build"))], loaded
    assert not [m for m in loaded if m == "sympy" or m.startswith("sympy.")], loaded
    assert not [m for m in loaded if m.startswith("matplotlib")], loaded  # plot() imports it when called
    assert "elbo_terms.decomposition" in loaded and "elbo_terms.terms" in loaded


def test_the_library_states_the_pyro_range_the_version_record_checked():
    """PYRO_MIN..PYRO_MAX is the range of releases on which every check passed (book/_data/pyro-versions.json)."""
    from pathlib import Path

    from elbo_terms import PYRO_MAX, PYRO_MIN

    record = json.loads((Path(__file__).resolve().parent.parent / "book" / "_data" / "pyro-versions.json").read_text())
    holding = [
        row["pyro"]
        for row in record["versions"]
        if row["checks"] and all(check["passed"] for check in row["checks"].values())
    ]
    assert holding, "the version record holds no release on which every check passed"
    assert (PYRO_MIN, PYRO_MAX) == (holding[0], holding[-1]), (
        f"elbo_terms/_versions.py says {PYRO_MIN}..{PYRO_MAX}; nox -s versions found every check passing on "
        f"{holding[0]}..{holding[-1]}"
    )
