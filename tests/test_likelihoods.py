"""Chapter ``likelihoods-as-losses``: the SymPy helpers, the Pyro helpers, and what the checks leave behind."""

import math
import re
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import sympy as sp
import sympy.stats as st
import torch
import torch.nn.functional as F
from elbo_terms._util import float64, t64
from elbo_terms.build.identity import IDENTITIES, proves_zero
from elbo_terms.chapters import likelihoods as L

CHAPTER_FILE = Path(__file__).resolve().parent.parent / "book" / "likelihoods-as-losses.md"
IDS = sorted(i for i, v in IDENTITIES.items() if v.chapter == L.CHAPTER)


# ------------------------------------------------------------------ SymPy side
def test_sum_over_pixels_reduces_an_affine_per_pixel_term():
    a, c = sp.symbols("a c", real=True)
    total = sp.Symbol("T", positive=True)
    assert proves_zero(L.sum_over_pixels(a * L.u**2 + c, L.u**2, total) - (a * total + L.n_pix * c))


@pytest.mark.parametrize("per_pixel", [L.u**3, sp.exp(L.u), L.u**2 + L.u])
def test_sum_over_pixels_refuses_terms_it_cannot_reduce(per_pixel):
    with pytest.raises(ValueError, match="affine|other than through"):
        L.sum_over_pixels(per_pixel, L.u**2, sp.Symbol("T", positive=True))


def test_gaussian_log_likelihood_at_one_pixel_is_the_normal_log_density():
    one = L.gaussian_log_likelihood().subs({L.n_pix: 1, L.sq_norm: sp.Rational(9, 100)})
    expected = float(torch.distributions.Normal(t64(0.0), t64(0.5)).log_prob(t64(0.3)))
    assert float(one.subs(L.sigma, sp.Rational(1, 2))) == pytest.approx(expected, rel=1e-12)


def test_laplace_log_likelihood_at_one_pixel_is_the_laplace_log_density():
    one = L.laplace_log_likelihood().subs({L.n_pix: 1, L.abs_norm: sp.Rational(3, 10), L.kappa: sp.Rational(1, 2)})
    expected = float(torch.distributions.Laplace(t64(0.0), t64(0.5)).log_prob(t64(-0.3)))
    assert float(one) == pytest.approx(expected, rel=1e-12)


def test_sigma_hat_is_the_only_stationary_point_and_a_maximum():
    roots = L.sigma_hat_by_solving()
    assert len(roots) == 1
    assert proves_zero(roots[0] ** 2 - L.sq_norm / L.n_pix)
    curvature = sp.diff(L.gaussian_log_likelihood(), L.sigma, 2).subs(L.sigma, roots[0])
    assert sp.simplify(curvature).is_negative


def test_mse_mean_factors():
    c, beta = L.mse_mean_factors()
    assert proves_zero(c - 2 * L.sigma**2 / L.n_pix)
    assert proves_zero(beta - L.n_pix / (2 * L.sigma**2))
    assert proves_zero(c * beta - 1)


def test_bernoulli_pmf_from_sympy_stats_is_the_bce_formula():
    p = sp.Symbol("p", positive=True)
    for v in (0, 1):
        pmf = st.density(st.Bernoulli("B", p))(v)
        assert proves_zero(sp.log(pmf) + (-(v * sp.log(p) + (1 - v) * sp.log(1 - p))))


# ------------------------------------------------------------- Pyro / torch side
def test_site_log_prob_names_a_missing_site():
    with pytest.raises(ValueError, match="no sample site named 'nope'"):
        L.site_log_prob(L.observe, dist.Normal(0.0, 1.0), torch.tensor(0.0), site="nope")


def test_site_log_prob_scores_only_the_named_site():
    """Conditioning the latent makes it observed too; only 'obs' must be counted."""
    with float64():
        x, clean, s = L.gaussian_example()
        only_obs = float(L.denoiser_obs_log_prob(clean, x, s))
        assert only_obs == pytest.approx(float(dist.Normal(clean, s).log_prob(x).sum()), rel=1e-12)


def test_bernoulli_site_refuses_gray_levels_under_validation():
    images, _ = L.digits(1)
    with float64(), pytest.raises(ValueError, match="support"):
        L.site_log_prob(L.observe, dist.Bernoulli(probs=torch.full((8, 8), 0.5)).to_event(2), images[0])


def test_bce_with_mean_reduction_is_the_sum_over_its_number_of_terms():
    x, p = L.bernoulli_example()
    assert float(F.binary_cross_entropy(p, x, reduction="mean")) * x.numel() == pytest.approx(
        float(F.binary_cross_entropy(p, x, reduction="sum")), rel=1e-12
    )


def test_maximize_over_sigma_finds_a_known_maximum():
    d, r = 10.0, 2.5  # log-likelihood -r/(2 s^2) - d log s: maximum at s^2 = r / d

    def f(s):
        return -r / (2 * s**2) - d * torch.log(s)

    assert L.maximize_over_sigma(f, sigma0=30.0) ** 2 == pytest.approx(r / d, rel=1e-12)


def test_maximize_over_sigma_refuses_a_convex_function():
    with pytest.raises(ValueError, match="not concave"):
        L.maximize_over_sigma(lambda s: s**2 + torch.log(s) ** 2)


def test_maximize_over_sigma_reports_no_convergence():
    with pytest.raises(ValueError, match="no convergence"):
        L.maximize_over_sigma(lambda s: -(torch.log(s) ** 2) - 100 * torch.log(s), max_iter=3)


def test_beta_model_scales_only_the_prior_term():
    """Trace_ELBO of the beta model, the guide scaled alike: -log p(x|z) + beta (log q - log p(z))."""
    from elbo_terms._util import seeded
    from elbo_terms.chapters import denoising as dn
    from pyro import poutine
    from pyro.infer import Trace_ELBO

    with float64():
        x = dn.noisy_image()
        loc, scale = dn.mean_field_optimum(x)
        g = dn.make_guide(loc, scale)
        losses = []
        for beta in (1.0, 3.0):
            with seeded(4):
                losses.append(Trace_ELBO().loss(L.beta_model, poutine.scale(g, scale=beta), x, dn.NOISE_SD, beta))
        z = dn.one_draw(g, x, seed=4)
        kl_draw = float(torch.distributions.Normal(loc, scale).log_prob(z).sum() - dn.prior().log_prob(z))
        assert losses[1] - losses[0] == pytest.approx(2.0 * kl_draw, rel=1e-9)


# ------------------------------------------------------------- the chapter's interface
def test_every_identity_of_the_chapter_backs_a_displayed_equation():
    text = CHAPTER_FILE.read_text()
    labels = set(re.findall(r"^\$\$ \(([a-z0-9-]+)\)$", text, re.M))
    verified = set(re.findall(r'verify\("([a-z0-9-]+)"\)', text))
    assert IDS, "the chapter registers no identity"
    for iid in IDS:
        assert IDENTITIES[iid].label in labels, iid
        assert iid in verified, iid


def test_the_slide_identity_is_registered_under_its_stable_name():
    assert "gaussian-to-l2" in IDS
    assert IDENTITIES["gaussian-to-l2"].label == "gaussian-to-l2"


@pytest.mark.parametrize("iid", IDS)
def test_checks_leave_no_global_state_behind(iid):
    pyro.clear_param_store()
    dtype, rng = torch.get_default_dtype(), torch.get_rng_state()
    identity = IDENTITIES[iid]
    for variant in (None,) + identity.wrong:
        if identity.numeric is not None:
            identity.numeric(variant)
    assert torch.get_default_dtype() == dtype
    assert torch.equal(torch.get_rng_state(), rng)
    assert len(pyro.get_param_store()) == 0


def test_checks_are_deterministic():
    for iid in ("gaussian-to-l2", "mse-mean-as-beta", "bernoulli-to-bce"):
        a, b = IDENTITIES[iid].numeric(None), IDENTITIES[iid].numeric(None)
        assert (a.lhs, a.rhs) == (b.lhs, b.rhs)
        assert math.isfinite(a.lhs)


def _displayed_equations() -> dict:
    """label -> the LaTeX of the labelled display in the chapter, without spaces and the final period."""
    pattern = r"^\$\$\n((?:(?!^\$\$).)*?)^\$\$ \(([a-z0-9-]+)\)$"
    blocks = re.findall(pattern, CHAPTER_FILE.read_text(), re.M | re.S)
    return {label: re.sub(r"\s+", "", body).rstrip(".") for body, label in blocks}


@pytest.mark.parametrize("iid", IDS)
def test_registered_statement_is_the_displayed_equation(iid):
    identity = IDENTITIES[iid]
    assert re.sub(r"\s+", "", identity.statement).rstrip(".") == _displayed_equations()[identity.label]
