"""The comparison rules of elbo_terms.identity: what passes, what fails, what is refused."""

import math

import pytest
import torch
from elbo_terms.build.book import Result
from elbo_terms.build.identity import Identity, exact, monte_carlo, proves_zero, register


def test_exact_accepts_rounding_and_rejects_a_real_difference():
    assert exact(1.0, 1.0 + 1e-13).passed
    assert not exact(1.0, 1.0 + 1e-6).passed
    assert exact(1e6, 1e6 * (1 + 5e-10)).passed  # relative tolerance


def test_exact_on_tensors_uses_the_largest_elementwise_error():
    a = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert exact(a, a.clone()).passed
    b = a.clone()
    b[1] += 1e-3
    r = exact(a, b)
    assert not r.passed and math.isclose(r.abs_error, 1e-3, rel_tol=1e-6)


def test_exact_refuses_float32_and_mismatched_sizes():
    with pytest.raises(TypeError, match="float64"):
        exact(torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="2 numbers"):
        exact(torch.ones(2, dtype=torch.float64), torch.ones(3, dtype=torch.float64))


def test_monte_carlo_bound_is_k_standard_errors():
    g = torch.Generator().manual_seed(0)
    samples = 3.0 + torch.randn(10_000, generator=g, dtype=torch.float64)
    ok = monte_carlo(samples, 3.0)
    assert ok.passed and ok.kind == "monte-carlo"
    assert math.isclose(ok.tolerance, 5 * ok.detail["stderr"])
    assert not monte_carlo(samples, 3.1).passed  # 10 standard errors away


def test_monte_carlo_refuses_a_bound_too_wide_to_mean_anything():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="take more samples"):
        monte_carlo(1.0 + 10 * torch.randn(200, generator=g, dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match="too few"):
        monte_carlo(torch.ones(10, dtype=torch.float64), 1.0)


def test_proves_zero():
    import sympy as sp

    x = sp.Symbol("x", positive=True)
    assert proves_zero(sp.log(x**2) - 2 * sp.log(x))
    assert not proves_zero(sp.log(x**2) - sp.log(x))


def test_identity_needs_a_kebab_id_a_check_and_a_wrong_variant():
    check = lambda v: exact(1.0, 1.0)  # noqa: E731
    with pytest.raises(ValueError, match="kebab"):
        Identity(id="Not_Kebab", chapter="x", statement="", numeric=check, wrong=("a",))
    with pytest.raises(ValueError, match="neither"):
        Identity(id="no-check", chapter="x", statement="", wrong=("a",))
    with pytest.raises(ValueError, match="wrong variant"):
        Identity(id="no-wrong", chapter="x", statement="", numeric=check)


def test_register_refuses_a_second_identity_with_the_same_id():
    check = lambda v: exact(1.0, 1.0)  # noqa: E731
    a = Identity(id="unit-test-dup", chapter="x", statement="", numeric=check, wrong=("a",))
    b = Identity(id="unit-test-dup", chapter="x", statement="", numeric=check, wrong=("a",))
    from elbo_terms.build.identity import IDENTITIES

    try:
        register(a)
        with pytest.raises(ValueError, match="twice"):
            register(b)
    finally:
        IDENTITIES.pop("unit-test-dup", None)


def test_failure_message_names_identity_chapter_and_numbers():
    ident = Identity(
        id="one-is-two", chapter="ch", label="eq-x", statement="1=2", numeric=lambda v: exact(1.0, 2.0), wrong=("a",)
    )
    r = Result(ident, None, ident.numeric(None))
    msg = r.message()
    assert not r.passed
    for part in ("one-is-two", "'ch'", "eq-x", "FAILED", "lhs=1", "rhs=2"):
        assert part in msg


def test_inequality_needs_a_gap_of_k_standard_errors():
    from elbo_terms.build.identity import inequality

    assert inequality(1.0, 2.0, "<").passed
    assert not inequality(2.0, 1.0, "<").passed
    assert not inequality(1.0, 1.0, "<").passed and inequality(1.0, 1.0, "<=").passed
    assert inequality(3.0, 1.0, ">", lhs_se=0.1, rhs_se=0.1).passed  # gap 2 > 5 * 0.14
    assert not inequality(1.3, 1.0, ">", lhs_se=0.1, rhs_se=0.1).passed  # gap 0.3 < 5 * 0.14
    with pytest.raises(ValueError, match="relation"):
        inequality(1.0, 2.0, "=")


def test_interval_needs_the_value_k_standard_errors_inside():
    from elbo_terms.build.identity import interval

    assert interval(15.0, 14.0, 16.0, se=0.1).passed
    assert not interval(15.0, 14.0, 16.0, se=0.3).passed  # 1 < 5 * 0.3
    assert not interval(17.0, 14.0, 16.0).passed
    with pytest.raises(ValueError, match="lo < hi"):
        interval(1.0, 2.0, 1.0)


def test_a_claim_is_recorded_with_its_kind():
    from elbo_terms.build.identity import inequality

    claim = Identity(
        id="unit-claim",
        chapter="c",
        statement="a < b",
        kind="claim",
        numeric=lambda v: inequality(1.0, 2.0 if v is None else 0.5, "<"),
        wrong=("flipped",),
    )
    result = Result(claim, None, claim.numeric(None))
    assert result.passed and result.as_dict()["kind"] == "claim"
    assert result.as_dict()["numeric"]["relation"] == "<"
    assert not Result(claim, None, claim.numeric("flipped")).passed
    with pytest.raises(ValueError, match="kind"):
        Identity(id="x", chapter="c", statement="s", kind="guess", numeric=lambda v: None, wrong=("w",))
