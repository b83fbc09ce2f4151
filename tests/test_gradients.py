"""Chapter ``gradients``: helpers, bad input, and the must-fail behaviour of its statistical checks.

The generic tests (tests/test_identities.py) already show that every identity of the chapter
holds and that each named wrong variant is rejected; these add what they cannot express.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import sympy as sp
import torch
from elbo_terms import conjugate as C
from elbo_terms import gradients as G
from elbo_terms._util import float64, seeded, t64
from pyro import poutine

M, S = C.GUIDE_MEAN, C.GUIDE_SD


# ------------------------------------------------------------------ helpers
def test_scores_match_the_closed_form():
    z = t64([-0.5, 0.3, 1.2])
    got = G.scores(z, M, S)
    want = torch.stack([(z - M) / S**2, ((z - M) ** 2 - S**2) / S**3], -1)
    assert torch.allclose(got, want, rtol=1e-12, atol=0)


def test_unnormalized_score_differs_only_in_s_by_one_over_s():
    z = t64([0.1, 0.7])
    diff = G.scores(z, M, S, normalized=False) - G.scores(z, M, S)
    assert torch.allclose(diff[:, 0], torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(diff[:, 1], torch.full((2,), 1 / S, dtype=torch.float64))


def test_gaussian_expectation_moments():
    assert sp.simplify(G.gaussian_expectation(C.z**2) - (C.m**2 + C.s**2)) == 0
    assert sp.simplify(G.gaussian_expectation(G.eps**4, G.eps, 0, 1) - 3) == 0
    # a non-polynomial integrand goes to sympy.integrate whole
    assert sp.simplify(G.gaussian_expectation(sp.exp(G.t * C.z)) - sp.exp(G.t * C.m + G.t**2 * C.s**2 / 2)) == 0


def test_exact_gradient_matches_finite_differences_of_the_closed_form_elbo():
    g, h = G.exact_elbo_gradient(), 1e-6
    dm = (C.elbo_value(M + h, S) - C.elbo_value(M - h, S)) / (2 * h)
    ds = (C.elbo_value(M, S + h) - C.elbo_value(M, S - h)) / (2 * h)
    assert math.isclose(float(g[0]), dm, rel_tol=1e-7)
    assert math.isclose(float(g[1]), ds, rel_tol=1e-7)


def test_reparam_estimate_with_the_path_cut_is_minus_the_score():
    x, e = C.data(), t64(0.7)
    cut = G.reparam_estimate(x, e, M, S, through_z=False)
    assert torch.allclose(cut, -G.scores(M + S * e, M, S), rtol=1e-12)


def test_bbvi_estimate_with_several_particles():
    assert G.bbvi_estimate_check(particles=4).passed
    assert not G.bbvi_estimate_check(particles=4, variant="with-minus-score").passed


def test_tracegraph_without_baseline_equals_trace_elbo_on_the_same_draw():
    """With one latent site the downstream cost is the whole log r: both ELBOs leave the same .grad."""
    x = C.data()
    guide = G.make_param_guide(reparam=False)
    _, a = G.loss_and_grads(pyro.infer.Trace_ELBO(), guide, x, seed=5)
    _, b = G.loss_and_grads(pyro.infer.TraceGraph_ELBO(), guide, x, seed=5)
    assert torch.allclose(G.flat(a), G.flat(b), rtol=1e-12, atol=0)


# ---------------------------------------------------------------- bad input
def test_bad_input_is_named():
    with pytest.raises(ValueError, match="standard deviation must be > 0"):
        G.make_param_guide(sd=0.0)
    with pytest.raises(ValueError, match="kind must be one of"):
        G.estimator_samples("pathwise")
    with pytest.raises(ValueError, match="batches >= 2"):
        G.estimator_samples("score", batches=1)
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        G.componentwise_monte_carlo(torch.zeros(200, 3), [0.0, 0.0], [1.0, 1.0])


def test_param_without_grad_is_named():
    pyro.clear_param_store()
    try:
        pyro.param("unused", t64(1.0))
        with pytest.raises(ValueError, match="'unused' has no .grad"):
            G.param_grads()
    finally:
        pyro.clear_param_store()


# --------------------------------------------------- no state leaks from checks
def test_checks_leave_no_global_state():
    before_dtype, before_rng = torch.get_default_dtype(), torch.get_rng_state()
    G.num_reparam_single_draw()
    G.num_surrogate_elbo()
    G.num_differentiable_loss()
    assert torch.get_default_dtype() == before_dtype
    assert torch.equal(torch.get_rng_state(), before_rng)
    assert len(list(pyro.get_param_store().keys())) == 0


# ------------------------------------------- must-fail: the statistical checks
@pytest.mark.parametrize("kind", G.KINDS)
def test_statistical_check_rejects_a_gradient_off_by_ten_standard_errors(kind):
    samples, exact = G.estimator_samples(kind), G.exact_elbo_gradient()
    stderr = samples.std(0) / math.sqrt(len(samples))
    assert G.componentwise_monte_carlo(samples, exact, exact.abs()).passed
    for j in range(2):
        shifted = exact.clone()
        shifted[j] += 10 * stderr[j]
        result = G.componentwise_monte_carlo(samples, shifted, exact.abs())
        assert not result.passed, f"{kind}: a shift of 10 stderr in {G.PARAM_NAMES[j]} was accepted"
        assert result.detail["component"] == G.PARAM_NAMES[j]


def test_statistical_check_refuses_too_few_draws():
    """A handful of single-particle score-function estimates cannot give a bound narrow enough."""
    samples = G.estimator_samples("score", batches=200, particles=1, seed=3)
    exact = G.exact_elbo_gradient()
    with pytest.raises(ValueError, match="take more samples"):
        G.componentwise_monte_carlo(samples, exact, exact.abs())


def _naive_trace_gradients(batches=400, particles=100, seed=7):
    """The mistake the chapter warns about: backward() on -(log p - log q) from the traces of a
    non-reparameterized guide. ``batches`` estimates, each the mean over ``particles`` draws."""
    with float64():
        x = C.data()
        guide = G.make_param_guide(reparam=False)
        out = torch.empty(batches, 2, dtype=torch.float64)
        pyro.clear_param_store()
        try:
            with seeded(seed):
                for b in range(batches):
                    with pyro.plate("particles", particles, dim=-2):
                        guide_trace = poutine.trace(guide).get_trace(x)
                        model_trace = poutine.trace(poutine.replay(C.model, trace=guide_trace)).get_trace(x)
                    loss = -(model_trace.log_prob_sum() - guide_trace.log_prob_sum()) / particles
                    loss.backward()
                    out[b] = -G.flat(G.param_grads())
                    for _, p in pyro.get_param_store().named_parameters():
                        p.grad = None
        finally:
            pyro.clear_param_store()
    return out


def test_naive_backward_through_the_loss_is_biased_and_rejected():
    samples, exact = _naive_trace_gradients(), G.exact_elbo_gradient()
    result = G.componentwise_monte_carlo(samples, exact, exact.abs())
    assert not result.passed
    # what it estimates instead: -E_q[score] = 0
    assert G.componentwise_monte_carlo(samples, [0.0, 0.0], exact.abs()).passed


def test_the_variances_differ():
    """One particle each: the score-function estimate scatters far more, in both components."""
    score = G.estimator_samples("score", batches=300, particles=1, seed=8).var(0)
    reparam = G.estimator_samples("reparam", batches=300, particles=1, seed=8).var(0)
    assert torch.all(score > 3 * reparam), (score, reparam)
    # must-fail: the reverse claim is false
    assert not torch.all(reparam > 3 * score)


def test_baseline_and_rao_blackwell_reduce_variance():
    rb = G.rao_blackwell_variances(draws=4000)
    assert torch.all(rb[True] < rb[False])
    bv = G.baseline_variances(draws=4000)
    assert torch.all(bv[G.tracegraph_baseline()] < bv[0.0])


def test_guide_draws_are_recorded_in_order_and_not_reparameterized_when_asked():
    draws = []
    guide = G.make_param_guide(reparam=False, draws=draws)
    pyro.clear_param_store()
    try:
        with float64(), seeded(0):
            tr = poutine.trace(guide).get_trace(C.data())
    finally:
        pyro.clear_param_store()
    assert tr.nodes["z"]["fn"].has_rsample is False
    assert isinstance(tr.nodes["z"]["fn"], dist.Normal)
    assert len(draws) == 1 and torch.equal(draws[0], tr.nodes["z"]["value"].detach())
