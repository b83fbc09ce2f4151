"""Chapter ``gradients``: helpers, bad input, and the must-fail behaviour of its statistical checks.

The generic tests (tests/test_identities.py) already show that every identity of the chapter
holds and that each named wrong variant is rejected; these add what they cannot express.
"""

import math
import re
from pathlib import Path

import elbo_terms.chapters  # noqa: F401  (registers every identity)
import pyro
import pyro.distributions as dist
import pytest
import sympy as sp
import torch
from elbo_terms._util import float64, seeded, t64
from elbo_terms.build.identity import IDENTITIES
from elbo_terms.chapters import conjugate as C
from elbo_terms.chapters import gradients as G
from pyro import poutine

M, S = C.GUIDE_MEAN, C.GUIDE_SD
BOOK = Path(__file__).resolve().parent.parent / "book"
CHAPTER_FILE = BOOK / "gradients.md"
#: the module backs two pages: gradients (Part I) and gradient-estimators (Part II)
CHAPTERS = (G.CHAPTER, G.ESTIMATORS)
IDS = sorted(iid for iid, i in IDENTITIES.items() if i.chapter in CHAPTERS)


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


# ------------------------------------------------ near-miss wrong variants
def test_unnormalized_score_misses_the_identity_by_the_mean_of_f_over_s():
    """The wrong variant of score-function-identity is a near miss: right in m, off by E_q[f]/s in s."""
    lhs, rhs = G._exp_tz_sides("unnormalized")
    mgf = G.gaussian_expectation(sp.exp(G.t * C.z))
    assert sp.simplify(lhs[0] - rhs[0]) == 0
    assert sp.simplify(lhs[1] - rhs[1] + mgf / C.s) == 0


# --------------------------------------------- scope of the surrogate equation
def test_sequential_plate_gets_no_rao_blackwellization():
    """MultiFrameTensor.add keeps vectorized frames only: a sequential plate weights by the whole sum."""
    assert G.sequential_plate_check(rao_blackwell=False).passed
    assert not G.sequential_plate_check(rao_blackwell=True).passed


def test_log_r_leaves_out_auxiliary_guide_sites():
    """_compute_log_r loops over model sites: an auxiliary guide site's log q is not in the weight."""
    x, draws, aux = C.data(), [], []

    def guide(x):
        m, s = pyro.param("m", t64(M)), pyro.param("s", t64(S))
        z = pyro.sample("z", dist.Normal(m, s).has_rsample_(False))
        a = pyro.sample("aux", dist.Normal(t64(0.0), t64(1.0)), infer={"is_auxiliary": True})
        draws.append(z.detach().clone())
        aux.append(a.detach().clone())

    _, grads = G.loss_and_grads(pyro.infer.Trace_ELBO(), guide, x, seed=12)
    est = G.score_function_estimate(x, draws[0], M, S)
    assert torch.allclose(G.flat(grads), -est, rtol=1e-12, atol=0)
    log_q_aux = dist.Normal(t64(0.0), t64(1.0)).log_prob(aux[0])
    with_aux = G.scores(draws[0], M, S) * (G.log_r(x, draws[0], M, S) - log_q_aux)
    assert not torch.allclose(G.flat(grads), -with_aux, rtol=1e-6, atol=0)


def test_the_sticking_the_landing_comment_is_in_the_non_reparameterized_branch():
    assert G.stl_comment_branch() == "not reparameterized"


def test_score_parts_table_shows_both_guides():
    lines = G.score_parts_table(C.data()).splitlines()
    assert len(lines) == 3
    assert lines[1].startswith("True") and lines[2].startswith("False")
    short = G.rsample_table(C.data()).splitlines()
    assert short == ["has_rsample z.requires_grad", "True        True", "False       False"]
    loss_r, sur_r = G.loss_and_surrogate_loss(True, C.data())
    loss_s, sur_s = G.loss_and_surrogate_loss(False, C.data())
    assert loss_r == pytest.approx(sur_r, rel=1e-12) and loss_r == pytest.approx(loss_s, rel=1e-12)
    assert sur_s != pytest.approx(loss_s, rel=1e-3)
    assert len(pyro.get_param_store()) == 0


# ------------------------------------------------------- the chapter's interface
def _displays(chapter):
    """{label: LaTeX} of a chapter's labelled display equations."""
    display = re.compile(r"^\$\$\n((?:(?!^\$\$).)*?)\n\$\$ \(([a-z0-9-]+)\)$", re.S | re.M)
    return {label: body for body, label in display.findall((BOOK / f"{chapter}.md").read_text())}


def _squash(latex):
    return re.sub(r"\s+", "", latex).rstrip(".")


@pytest.mark.parametrize("iid", IDS)
def test_each_statement_is_the_displayed_equation(iid):
    identity = IDENTITIES[iid]
    text = (BOOK / f"{identity.chapter}.md").read_text()
    assert re.search(rf'verify\("{iid}"\)', text), iid
    if identity.kind == "claim":  # a prose claim: no display, verified right after its sentence
        assert identity.label is None, iid
        return
    displays = _displays(identity.chapter)
    assert identity.label in displays, iid
    assert _squash(identity.statement) == _squash(displays[identity.label]), iid


def test_the_moved_identities_are_on_the_part_two_page():
    moved = {
        "surrogate-elbo",
        "differentiable-loss",
        "rao-blackwell-plates",
        "tracegraph-baseline",
        "score-at-posterior",
    }
    assert {i for i in IDS if IDENTITIES[i].chapter == G.ESTIMATORS} >= moved
    assert not moved & set(_displays(G.CHAPTER))


def test_notation_of_the_chapter():
    """Book-wide decisions: varepsilon, particle index k, L^sur (no tilde)."""
    text = "".join((BOOK / f"{c}.md").read_text() for c in CHAPTERS)
    text += "".join(IDENTITIES[i].statement for i in IDS)
    assert "\\epsilon" not in text
    assert "\\tilde{\\mathcal L}" not in text
    assert "z^{(s)}" not in text and "sum_{s=1}" not in text


# ------------------------------------------------ exact variances (issue 11)
def test_exact_variances_are_the_reviewers_numbers():
    """3821 / 258 and 3821 -> 1130 (an independent reviewer's exact values) come out of SymPy."""
    v = G.exact_variances()
    assert v["score"] == pytest.approx(3821.452, abs=1e-3)
    assert v["reparam"] == pytest.approx(257.993, abs=1e-3)
    assert v["score-baseline"] == pytest.approx(1130.122, abs=1e-3)
    assert v["score"] / v["reparam"] == pytest.approx(14.81, abs=0.01)


def test_exact_variances_agree_with_pyros_estimates():
    """Pyro's per-draw estimates (S = 1) scatter as the exact variances say (a loose band: 2000 draws)."""
    v = G.exact_variances()
    for kind in G.KINDS:
        measured = float(G.estimator_samples(kind, batches=2000, particles=1, seed=9).var(0).sum())
        assert measured == pytest.approx(v[kind], rel=0.15), kind


def test_exact_rao_blackwell_variances_agree_with_sampling():
    exact, sampled = G.exact_rao_blackwell_variances(), G.rao_blackwell_variances()
    for rb in (True, False):
        assert float(sampled[rb][0]) == pytest.approx(exact[rb], rel=0.1), rb


def test_scaled_site_score_is_unscaled_for_several_scales():
    """The surrogate's score term does not carry the site's scale, whatever the scale."""
    x = C.data()
    for c in (0.3, 1.0, 4.0):
        draws = []
        _, grads = G.loss_and_grads(
            pyro.infer.Trace_ELBO(), G.make_scaled_guide(c, draws), x, model=lambda x, c=c: G.scaled_model(x, c), seed=3
        )
        z = draws[0]
        lik = torch.distributions.Normal(z, t64(C.NOISE_SD)).log_prob(x).sum()
        prior = torch.distributions.Normal(t64(C.PRIOR_MEAN), t64(C.PRIOR_SD)).log_prob(z)
        log_q = torch.distributions.Normal(t64(M), t64(S)).log_prob(z)
        want = -G.scores(z, M, S) * (lik + c * prior - c * log_q)
        assert torch.allclose(G.flat(grads), want, rtol=1e-10, atol=1e-12), c
