"""Every registered identity holds, and every wrong variant of it is rejected by the same checks.

The ledger names these two tests for each identity id.
"""

import random

import elbo_terms.chapters  # noqa: F401  (registers every identity)
import pytest
import sympy as sp
from elbo_terms.build.identity import IDENTITIES, proves_zero

IDS = sorted(IDENTITIES)


def _value_at_a_point(expr, seed=0):
    """Evaluate a SymPy expression at a random point that respects the symbols' assumptions."""
    rng = random.Random(seed)
    vals = {}
    for sym in expr.free_symbols:
        if sym.is_integer:
            vals[sym] = rng.randint(2, 7)
        elif sym.is_positive:
            vals[sym] = sp.Rational(rng.randint(3, 20), 10)
        else:
            vals[sym] = sp.Rational(rng.randint(-20, 20), 10)
    return complex(sp.N(expr.subs(vals), 30))


@pytest.mark.parametrize("iid", IDS)
def test_identity_holds(iid):
    identity = IDENTITIES[iid]
    if identity.symbolic is not None:
        assert proves_zero(identity.symbolic(None)), f"{iid}: lhs - rhs does not simplify to 0"
    if identity.numeric is not None:
        result = identity.numeric(None)
        assert result.passed, f"{iid}: {result}"


@pytest.mark.parametrize("iid", IDS)
def test_wrong_variant_fails(iid):
    identity = IDENTITIES[iid]
    assert identity.wrong, f"{iid} names no wrong variant"
    for variant in identity.wrong:
        if identity.symbolic is not None:
            diff = identity.symbolic(variant)
            assert not proves_zero(diff), f"{iid}[{variant}]: the wrong statement was proved"
            assert abs(_value_at_a_point(sp.sympify(diff))) > 1e-8, f"{iid}[{variant}]: wrong statement is 0 at a point"
        if identity.numeric is not None:
            result = identity.numeric(variant)
            assert not result.passed, f"{iid}[{variant}]: the wrong statement passed {result}"


def test_ids_are_unique_and_kebab_case():
    for iid, identity in IDENTITIES.items():
        assert identity.id == iid


def test_each_chapter_module_names_a_book_page():
    from pathlib import Path

    book = Path(__file__).resolve().parent.parent / "book"
    for identity in IDENTITIES.values():
        assert (book / f"{identity.chapter}.md").exists(), identity.chapter


def test_statements_hold_no_control_characters():
    """A LaTeX statement written in a non-raw string turns \\frac, \\text, \\big into form feeds, tabs, backspaces."""
    import re

    bad = {iid: repr(i.statement) for iid, i in IDENTITIES.items() if re.search(r"[\x00-\x08\x0b-\x1f]", i.statement)}
    assert not bad, bad
