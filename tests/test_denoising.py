"""The question's denoising model (chapter ``likelihoods-as-losses``): data, prior, posterior, fit, checks."""

import pyro
import pytest
import torch
from elbo_terms import decompose
from elbo_terms._util import float64, seeded, t64
from elbo_terms.build.identity import IDENTITIES, monte_carlo
from elbo_terms.chapters import denoising as dn
from pyro.infer import Trace_ELBO


# ------------------------------------------------------------------ data and prior
def test_clean_image_is_a_small_gray_image():
    img = dn.clean_image()
    assert img.dtype == torch.float64
    assert img.shape == (
        (dn.CROP_ROWS[1] - dn.CROP_ROWS[0]) // dn.BLOCK,
        (dn.CROP_COLS[1] - dn.CROP_COLS[0]) // dn.BLOCK,
    )
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0


def test_clean_image_is_a_copy():
    dn.clean_image().zero_()
    assert float(dn.clean_image().abs().sum()) > 0


def test_noise_is_fixed_by_its_seed_and_leaves_the_global_rng_alone():
    rng = torch.get_rng_state()
    a, b, c = dn.noisy_image(), dn.noisy_image(), dn.noisy_image(seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), rng)
    assert abs(dn.rmse(a, dn.clean_image()) - dn.NOISE_SD) < 0.02


def test_grid_laplacian_is_the_sum_of_squared_neighbour_differences():
    h, w = 3, 4
    g = dn.grid_laplacian(h, w)
    assert torch.equal(g, g.T)
    assert torch.allclose(g.sum(1), torch.zeros(h * w, dtype=torch.float64))
    with seeded(0):
        z = torch.randn(h, w, dtype=torch.float64)
    direct = ((z[1:, :] - z[:-1, :]) ** 2).sum() + ((z[:, 1:] - z[:, :-1]) ** 2).sum()
    flat = z.reshape(-1)
    assert float(flat @ g @ flat) == pytest.approx(float(direct), rel=1e-12)


def test_prior_has_the_stated_precision():
    with float64():
        lam = dn.prior_precision()
        cov = dn.prior().covariance_matrix
        assert torch.allclose(cov @ lam, torch.eye(len(lam), dtype=torch.float64), atol=1e-8)


# ------------------------------------------------------------------ posterior
def test_posterior_mean_is_the_mode_of_the_joint():
    """At the posterior mean the gradient of log p(x, z) in z vanishes (autograd through Pyro's model)."""
    from pyro import poutine

    with float64():
        x = dn.noisy_image()
        z = dn.posterior(x).loc.clone().requires_grad_(True)
        tr = poutine.trace(poutine.condition(dn.model, data={"clean": z})).get_trace(x)
        (grad,) = torch.autograd.grad(tr.log_prob_sum(), z)
        assert float(grad.abs().max()) < 1e-8


def test_mean_field_optimum_uses_the_diagonal_of_the_posterior_precision():
    with float64():
        x = dn.noisy_image()
        loc, scale = dn.mean_field_optimum(x)
        p = dn.prior_precision() + torch.eye(x.numel(), dtype=torch.float64) / dn.NOISE_SD**2
        assert torch.allclose(scale, p.diagonal().rsqrt())
        assert torch.allclose(
            loc, torch.linalg.solve(p, dn.prior_precision() @ dn.prior().loc + x.reshape(-1) / dn.NOISE_SD**2)
        )
        # mean field is over-confident: its s.d. is below the posterior's marginal s.d.
        assert bool((scale <= dn.posterior(x).stddev + 1e-12).all())


# ------------------------------------------------------------------ model and fit
def test_model_accepts_vectorized_particles():
    with float64():
        x = dn.noisy_image()
        g = dn.make_guide(*dn.mean_field_optimum(x))
        elbo = Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=0)
        with seeded(0):
            loss = elbo.loss(dn.model, g, x)
        with seeded(0):
            terms = decompose(dn.model, g, x, num_particles=3, vectorize_particles=True, max_plate_nesting=0)
        assert loss == pytest.approx(terms.loss, rel=1e-9)


def test_fit_improves_the_loss_and_leaves_param_store_and_rng_alone():
    pyro.clear_param_store()
    pyro.param("someone_elses", torch.tensor(1.0))
    rng = torch.get_rng_state()
    with float64():
        x = dn.noisy_image()
        fit = dn.fit(x, steps=60)
    assert len(fit.losses) == 60
    assert float(fit.losses[-10:].mean()) < float(fit.losses[:10].mean())
    assert list(pyro.get_param_store().keys()) == ["someone_elses"]
    assert torch.equal(torch.get_rng_state(), rng)
    with pyro.get_param_store().scope(fit.state):
        assert torch.equal(pyro.param("loc").detach(), fit.loc)
    pyro.clear_param_store()


def test_fit_is_deterministic():
    with float64():
        x = dn.noisy_image()
        a, b = dn.fit(x, steps=5), dn.fit(x, steps=5)
    assert torch.equal(a.losses, b.losses) and torch.equal(a.loc, b.loc)


@pytest.mark.parametrize("kwargs", [{"steps": 0}, {"lr_end": 0.0}, {"lr": 0.01, "lr_end": 0.1}])
def test_fit_refuses_bad_settings(kwargs):
    with pytest.raises(ValueError, match="fit\\(\\)"):
        dn.fit(dn.noisy_image(), **kwargs)


# ------------------------------------------------------------------ the checks
def test_loss_terms_add_up_to_the_loss_with_the_l2_positive():
    with float64():
        x = dn.noisy_image()
        loc, scale = dn.mean_field_optimum(x)
        t = dn.loss_terms(dn.one_draw(dn.make_guide(loc, scale), x, seed=7), x, loc, scale)
        assert t["l2"] > 0
        assert IDENTITIES["denoising-loss-terms"].numeric(None).rhs == pytest.approx(sum(t.values()), rel=1e-12)


def test_expected_l2_check_rejects_a_biased_estimator():
    """Must-fail: shifting the draws by 6 standard errors is caught."""
    with float64():
        x = dn.noisy_image()
        loc, scale = dn.mean_field_optimum(x)
        draws = dn.sq_error_draws(loc, scale, x)
        exact_value = float(((x.reshape(-1) - loc) ** 2).sum() + (scale**2).sum())
        stderr = float(draws.std()) / len(draws) ** 0.5
        assert monte_carlo(draws, exact_value).passed
        assert not monte_carlo(draws + 6 * stderr, exact_value).passed


def test_expected_l2_check_refuses_too_few_draws():
    with float64():
        x = dn.noisy_image()
        loc, scale = dn.mean_field_optimum(x)
        with pytest.raises(ValueError, match="too few"):
            monte_carlo(dn.sq_error_draws(loc, scale, x, n=50), 1.0)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_expected_l2_holds_for_other_seeds(seed):
    with float64():
        x = dn.noisy_image()
        loc, scale = dn.mean_field_optimum(x)
        exact_value = float(((x.reshape(-1) - loc) ** 2).sum() + (scale**2).sum())
        assert monte_carlo(dn.sq_error_draws(loc, scale, x, seed=seed), exact_value).passed


def test_rmse():
    assert dn.rmse(t64([0.0, 0.0]), t64([3.0, 4.0])) == pytest.approx((12.5) ** 0.5)
