"""Chapter ``reconstruction-and-kl``: the split, the Gaussian KL, estimators A and B, the Monte Carlo KL."""

import math

import pyro
import pyro.distributions as dist
import pytest
import sympy as sp
import torch
from elbo_terms import decompose
from elbo_terms._util import float64, seeded, t64
from elbo_terms.build.identity import IDENTITIES, monte_carlo, proves_zero
from elbo_terms.chapters import conjugate as C
from elbo_terms.chapters import kl as K
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import Normal, kl_divergence


# ------------------------------------------------------------------ the Gaussian KL
def test_standard_kl_is_the_general_kl_at_a_standard_prior():
    assert proves_zero(K.gaussian_kl_closed_form().subs({K.mu0: 0, K.s0: 1}) - K.standard_kl_closed_form())


@pytest.mark.parametrize("m, s, mu0, s0", [(0.3, 0.4, 0.0, 1.0), (-1.0, 2.0, 0.5, 0.7), (2.0, 0.1, -1.0, 3.0)])
def test_gaussian_kl_formula_matches_torch(m, s, mu0, s0):
    formula = math.log(s0 / s) + (s**2 + (m - mu0) ** 2) / (2 * s0**2) - 0.5
    assert float(kl_divergence(Normal(t64(m), t64(s)), Normal(t64(mu0), t64(s0)))) == pytest.approx(formula, rel=1e-12)


def test_kl_is_zero_only_between_equal_normals_and_not_symmetric():
    kl = K.gaussian_kl_closed_form()
    assert sp.simplify(kl.subs({K.m: K.mu0, K.s: K.s0})) == 0
    swapped = K.gaussian_kl_closed_form("swapped-arguments")
    vals = {K.m: 0.3, K.s: 0.4, K.mu0: 0.0, K.s0: 1.0}
    assert abs(float(kl.subs(vals)) - float(swapped.subs(vals))) > 0.1


# ------------------------------------------------------------ the Monte Carlo KL check
def test_monte_carlo_kl_check_rejects_a_biased_estimator():
    """Must-fail: shifting the draws by 6 standard errors is caught."""
    draws = K.kl_mc_samples()
    stderr = K.standard_error(draws)
    assert monte_carlo(draws, K.analytic_kl()).passed
    assert not monte_carlo(draws + 6 * stderr, K.analytic_kl()).passed


def test_monte_carlo_kl_check_rejects_another_guides_kl():
    """Must-fail: the draws of the chapter's guide do not match the KL of a guide 0.1 away."""
    assert not monte_carlo(K.kl_mc_samples(), K.analytic_kl(C.GUIDE_MEAN + 0.1, C.GUIDE_SD)).passed


def test_monte_carlo_kl_check_refuses_too_few_draws():
    with pytest.raises(ValueError, match="take more samples"):
        monte_carlo(K.kl_mc_samples(draws=300), K.analytic_kl())


def test_monte_carlo_split_check_rejects_the_prior_as_the_kl():
    result = IDENTITIES["elbo-reconstruction-kl"].numeric("log-prior-as-kl")
    assert not result.passed
    entropy = 0.5 * math.log(2 * math.pi * math.e * C.GUIDE_SD**2)
    # what that reading misses is the guide's entropy, up to Monte Carlo error
    assert C.elbo_value() - result.lhs == pytest.approx(entropy, abs=5 * result.detail["stderr"])


def test_one_draw_of_the_sampled_kl_can_be_negative():
    draws = K.kl_mc_samples(draws=2000)
    assert (draws < 0).any() and K.analytic_kl() > 0


# ------------------------------------------------------------- per-particle terms
@pytest.mark.parametrize("vectorize", [False, True])
def test_particle_terms_add_up_to_trace_elbo(vectorize):
    with float64():
        x, guide = C.data(), C.make_guide()
        t = K.particle_terms(C.model, guide, x, particles=5, vectorize=vectorize, seed=2)
        elbo = Trace_ELBO(num_particles=5, vectorize_particles=vectorize, max_plate_nesting=1)
        with seeded(2):
            loss = elbo.loss(C.model, guide, x)
    per_draw = t["reconstruction"] + t["log_prior"] - t["log_q"]
    assert float(-per_draw.mean()) == pytest.approx(loss, rel=1e-12)
    assert torch.allclose(t["kl_mc"], t["log_q"] - t["log_prior"])


def test_decompose_agrees_with_the_chapters_terms():
    """The chapter shows decompose's split; its identities compute their own terms. They agree."""
    with float64():
        x, guide = C.data(), C.make_guide()
        t = K.particle_terms(C.model, guide, x, particles=K.PARTICLES, seed=51)
        with seeded(51):
            d = decompose(C.model, guide, x, num_particles=K.PARTICLES)
    assert d.reconstruction == pytest.approx(float(t["reconstruction"].mean()), rel=1e-12)
    assert d.kl_mc == pytest.approx(float(t["kl_mc"].mean()), rel=1e-12)
    assert d.kl_analytic == pytest.approx(K.analytic_kl(), rel=1e-12)


# --------------------------------------------------------------- estimators A and B
def test_estimators_differ_on_the_same_draws_by_the_sampled_minus_closed_kl():
    losses, t = K.estimators_same_draw()
    assert losses["B"] - losses["A"] == pytest.approx(K.analytic_kl() - float(t["kl_mc"].mean()), abs=1e-12)


def test_mean_field_falls_back_to_sampling_without_a_registered_kl():
    """The text says: where torch has no KL for the pair, TraceMeanField_ELBO samples it (estimator A)."""

    def model(x):
        z = pyro.sample("z", dist.StudentT(t64(4.0), t64(0.0), t64(1.0)))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(z, t64(C.NOISE_SD)), obs=x)

    guide = C.make_guide()
    with float64():
        x = C.data()
        with pytest.raises(NotImplementedError):
            kl_divergence(Normal(t64(0.0), t64(1.0)), dist.StudentT(t64(4.0), t64(0.0), t64(1.0)))
        with seeded(4):
            a = Trace_ELBO(num_particles=3).loss(model, guide, x)
        with seeded(4):
            b = TraceMeanField_ELBO(num_particles=3).loss(model, guide, x)
    assert a == pytest.approx(b, rel=1e-12)


def test_both_estimators_have_the_same_mean():
    draws = K.elbo_losses(16, 300, seed=8)
    for name in ("A", "B"):
        stderr = float(draws[name].std()) / math.sqrt(300)
        assert abs(float(draws[name].mean()) - C.elbo_value()) < 5 * stderr


def test_spread_falls_with_particles_and_neither_estimator_always_wins():
    wide = K.spread_by_particles(*K.GUIDES["chapter-1 guide"], particles=(1, 64), repeats=150)
    narrow = K.spread_by_particles(*K.GUIDES["narrow guide"], particles=(1, 64), repeats=150)
    for sp_ in (wide, narrow):
        for name in ("A", "B"):
            assert sp_[name][1] < sp_[name][0] / 4  # 1/sqrt(64) = 1/8, with room for noise
    assert wide["A"][0] < wide["B"][0]
    assert narrow["B"][0] < narrow["A"][0]


# ------------------------------------------------------------------ drift and state
def test_mean_field_drift_check_fails_on_a_doctored_source():
    from elbo_terms.chapters.trace_source import count_found, installed_source

    def source(key):
        return installed_source(key).replace("kl_qp = kl_divergence(", "kl_qp = my_kl(")

    result = count_found(K.RELIED_ON, source)
    assert not result.passed
    assert any("kl_divergence" in m for m in result.detail["missing"])


def test_checks_leave_no_global_state_changed():
    dtype, rng = torch.get_default_dtype(), torch.get_rng_state()
    for ident in ("trace-elbo-estimator-a", "trace-mean-field-estimator-b", "gaussian-kl-general"):
        assert IDENTITIES[ident].numeric(None).passed
    assert torch.get_default_dtype() == dtype
    assert torch.equal(torch.get_rng_state(), rng)


# ------------------------------------------------- the guide's log q at a reparameterized draw
def test_log_q_at_a_reparameterized_draw_has_variance_one_half():
    f = K.log_q_at_reparameterized_draw()
    assert proves_zero(f - (-sp.log(K.s) - sp.log(2 * sp.pi) / 2 - K.eps**2 / 2))
    assert K.log_q_variance() == sp.Rational(1, 2)
    assert not f.has(K.m)  # nothing of the guide's mean is left


def test_log_q_variance_measurements_are_independent_and_near_one_half():
    """Different seeds: two real measurements (the same seed would give equal numbers by construction)."""
    narrow = K.log_q_variance_measured(0.1, mean=0.6, seed=71)
    wide = K.log_q_variance_measured(0.4, mean=0.3, seed=72)
    assert narrow != pytest.approx(wide, rel=1e-6)
    # the sample variance of eps^2/2 over 20000 draws has a standard error of about 0.013
    for v in (narrow, wide):
        assert abs(v - 0.5) < 5 * 0.0133
    # with the same seed the eps draws coincide and so do the variances, whatever s
    assert K.log_q_variance_measured(0.1, seed=5) == pytest.approx(K.log_q_variance_measured(0.4, seed=5), rel=1e-9)


# ------------------------------------------------------------------ displays
@pytest.mark.parametrize(
    "ident",
    [
        "elbo-reconstruction-kl",
        "gaussian-kl-general",
        "gaussian-kl-closed-form",
        "kl-as-expectation",
        "trace-elbo-estimator-a",
        "trace-mean-field-estimator-b",
        "mean-field-kl-at-sampled-parents",
    ],
)
def test_registered_statement_is_the_displayed_equation(ident):
    import re
    from pathlib import Path

    identity = IDENTITIES[ident]
    text = (Path(__file__).resolve().parent.parent / "book" / f"{identity.chapter}.md").read_text()
    match = re.search(r"^\$\$\n((?:(?!^\$\$).)*?)^\$\$ \(" + re.escape(identity.label) + r"\)$", text, re.S | re.M)
    assert match, ident
    assert "".join(identity.statement.split()) == "".join(match.group(1).split())


def test_aevb_equation_numbers_in_the_module():
    doc = K.__doc__
    assert "estimator A (eq. (6))" in doc and "estimator B (eq. (7))" in doc
    assert "eq. 8" not in doc and "eq. (8)" not in doc


def test_grouped_reconstruction_is_the_integral():
    assert proves_zero(K.expected_log_likelihood_by_integration() - K.expected_log_likelihood_grouped())
    assert not proves_zero(K.expected_log_likelihood_by_integration() - K.expected_log_likelihood_grouped() + K.s**2)


# ------------------------------------------------ the variance of A and B (issue 11, section 2)
def test_the_eps_polynomials_are_what_pyro_computes_and_a_wrong_gradient_is_caught():
    assert K.estimators_match_pyro(guide=(0.6, 0.1), seeds=range(3)) < 1e-9
    assert K.estimators_match_pyro(seeds=range(2), variant="score-term-dropped") > 1e-3


def test_exact_value_spreads_are_the_reviewers():
    t = K.variance_table()
    assert round(t["narrow guide"]["B"]["sd"], 2) == 0.18 and round(t["narrow guide"]["A"]["sd"], 2) == 0.56
    assert round(t["chapter-1 guide"]["A"]["sd"], 2) == 3.19 and round(t["chapter-1 guide"]["B"]["sd"], 2) == 3.63
    assert t["posterior"]["A"]["value"] < 1e-9  # tight at the posterior, draw by draw


def test_exact_variances_match_a_monte_carlo_of_pyros_own_gradients():
    """Independent of the polynomials: per-draw gradients from Pyro, 400 draws, within 5 standard errors."""
    guide = K.GUIDES["chapter-1 guide"]
    exact_grad = K.variance_table()["chapter-1 guide"]
    for est, cls in (("A", Trace_ELBO), ("B", TraceMeanField_ELBO)):
        grads = []
        with float64():
            for seed in range(400):
                mt, st = t64(guide[0]).requires_grad_(True), t64(guide[1]).requires_grad_(True)
                with seeded(1000 + seed):
                    loss = cls(max_plate_nesting=1).differentiable_loss(C.model, K._param_guide(mt, st), C.data())
                grads.append(torch.stack(torch.autograd.grad(-loss, [mt, st])))
        g = torch.stack(grads)
        total = g.var(0).sum()
        # standard error of a sample variance ~ var * sqrt(2 / (n - 1)) for near-Normal draws (generous: x2)
        assert abs(float(total) - exact_grad[est]["grad"]) < 5 * 2 * exact_grad[est]["grad"] * (2 / 399) ** 0.5


def test_gradient_of_b_is_less_noisy_although_values_rank_otherwise():
    t = K.variance_table()
    assert all(row["B"]["grad"] < row["A"]["grad"] for row in t.values())
    assert t["chapter-1 guide"]["A"]["value"] < t["chapter-1 guide"]["B"]["value"]


def test_sticking_the_landing_has_no_gradient_variance_at_the_posterior():
    assert K.stl_gradient_variance(K.posterior_guide()) < 1e-20
    assert K.stl_gradient_variance(K.GUIDES["chapter-1 guide"]) > 1.0


# ------------------------------------------------ TraceMeanField_ELBO's condition, two latent layers
def test_pyro_warns_only_for_the_guide_outside_the_condition():
    assert K.mean_field_warnings(K.two_layer_guide) == []
    assert any("mean field" in w for w in K.mean_field_warnings(K.bottom_up_guide))
    assert "descendants of `z` in the guide" in K.mean_field_condition_text()


def test_two_layer_kl_is_taken_at_the_sampled_parent():
    assert K.num_two_layer_kl().passed and not K.num_two_layer_kl("exact-joint-kl").passed
    terms = K.two_layer_kl_terms()
    assert max(terms) - min(terms) > 1e-3  # random, not one number
