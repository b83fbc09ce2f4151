r"""Chapters ``gradients`` (Part I) and ``gradient-estimators`` (Part II): what Pyro differentiates.

``gradients`` states the two estimators, which one Pyro uses per site, and their variance;
``gradient-estimators`` takes Pyro's surrogate apart (scaled sites, Rao-Blackwellization,
``TraceGraph_ELBO`` baselines, the score term at the posterior). Each identity names its page.

The setting is chapter ``elbo``'s conjugate Normal model (:mod:`elbo_terms.conjugate`),
now with a guide whose parameters are ``pyro.param``\ s, lambda = (m, s)::

    q_lambda(z) = N(m, s^2),     log r(z) = log p(x, z) - log q_lambda(z).

Two unbiased estimators of the gradient of the ELBO ``L(m, s)``:

* score function (BBVI eq. 2-3):   grad log q_lambda(z) * log r(z),          z ~ q fixed;
* reparameterization:              grad [log p(x, m + s e) - log q_lambda(m + s e)],  e ~ N(0, 1)
  (``e`` is the book's varepsilon).

``Trace_ELBO`` builds a *surrogate* ELBO, L^sur, whose autograd gradient is the first for guide
sites with ``has_rsample == False`` and the second for the others. The checks below compare the
``.grad`` that Pyro leaves on the params with these formulas evaluated on the same draw
(exact, float64), and the means of many draws with the SymPy gradient of the closed-form
ELBO (statistical). Pyro reports a *loss*, ``-L``: its ``.grad`` is minus the gradient of L.
"""

from __future__ import annotations

import functools
import inspect

import pyro
import pyro.distributions as dist
import sympy as sp
import torch
from pyro.infer import Trace_ELBO, TraceGraph_ELBO
from torch.distributions import Normal

from .._util import float64, seeded, t64
from ..build.identity import Identity, Numeric, exact, inequality, monte_carlo, register
from . import conjugate as C

CHAPTER = "gradients"
#: the Part II page with the surrogate, Rao-Blackwellization, baselines and sticking the landing
ESTIMATORS = "gradient-estimators"

#: the variational parameters lambda, as SymPy symbols and as pyro.param names
LAMBDA = (C.m, C.s)
PARAM_NAMES = ("m", "s")

# ------------------------------------------------------------------- SymPy side
t = sp.Symbol("t", real=True)
eps = sp.Symbol("varepsilon", real=True)  # printed by sp.latex as \varepsilon
#: a direction in (m, s)-space: a vector identity holds iff its derivative along every direction does
u_m, u_s = sp.symbols("u_m u_s", positive=True)


def log_q_symbolic(normalized=True):
    """log N(z; m, s^2); ``normalized=False`` drops -log(2 pi s^2)/2 (a wrong variant)."""
    full = C.log_normal(C.z, C.m, C.s)
    return full if normalized else -((C.z - C.m) ** 2) / (2 * C.s**2)


def score_symbolic(lam, normalized=True):
    """The score d/d lambda log q_lambda(z), one component."""
    return sp.diff(log_q_symbolic(normalized), lam)


@functools.cache
def _gaussian_moment(k, v, mean, sd):
    """E[v^k] for v ~ N(mean, sd^2): the integral of v^k N(v; mean, sd^2), done by SymPy."""
    density = sp.exp(C.log_normal(v, mean, sd))
    return sp.simplify(sp.integrate(v**k * density, (v, -sp.oo, sp.oo), conds="none"))


def gaussian_expectation(f, v=C.z, mean=C.m, sd=C.s):
    r"""E[f(v)] for v ~ N(mean, sd^2), by integration.

    A polynomial in ``v`` is integrated monomial by monomial (fast); anything else is
    handed to ``sympy.integrate`` whole.
    """
    f = sp.expand(f)
    if f.is_polynomial(v):
        return sum(c * _gaussian_moment(k, v, mean, sd) for (k,), c in sp.Poly(f, v).terms())
    density = sp.exp(C.log_normal(v, mean, sd))
    return sp.integrate(f * density, (v, -sp.oo, sp.oo), conds="none")


def along(components):
    """u . (component_m, component_s): the derivative along a generic direction u."""
    return u_m * components[0] + u_s * components[1]


def gradient_symbolic(expr):
    """[d expr / dm, d expr / ds]."""
    return [sp.diff(expr, lam) for lam in LAMBDA]


def elbo_gradient_symbolic():
    """The exact gradient: SymPy differentiates chapter 1's closed-form ELBO."""
    return gradient_symbolic(C.elbo_closed_form())


def log_r_symbolic():
    """log p(x, z) - log q_lambda(z)."""
    return C.log_joint_symbolic() - log_q_symbolic()


@functools.cache
def score_gradient_by_integration(variant=None):
    """E_q[grad log q (log p - log q)] (BBVI eq. 2) by integration; ``without-log-q`` weights by log p only."""
    weight = C.log_joint_symbolic() if variant == "without-log-q" else log_r_symbolic()
    return tuple(gaussian_expectation(score_symbolic(lam) * weight) for lam in LAMBDA)


@functools.cache
def reparam_gradient_by_integration(variant=None):
    """E_eps[grad (log p - log q)(m + s eps)], eps ~ N(0, 1), by integration.

    ``no-path-through-z`` differentiates with z held fixed and substitutes z = m + s eps afterwards.
    """
    path = {C.z: C.m + C.s * eps}
    if variant == "no-path-through-z":
        integrands = [sp.diff(log_r_symbolic(), lam).subs(path) for lam in LAMBDA]
    else:
        integrands = [sp.diff(log_r_symbolic().subs(path), lam) for lam in LAMBDA]
    return tuple(gaussian_expectation(f, eps, 0, 1) for f in integrands)


def exact_elbo_gradient(x=None, mean=C.GUIDE_MEAN, sd=C.GUIDE_SD) -> torch.Tensor:
    """dL/d(m, s) at (mean, sd) on the chapter's data, from SymPy, as a float64 tensor."""
    return _evaluate(elbo_gradient_symbolic(), x, mean, sd)


def _evaluate(exprs, x=None, mean=C.GUIDE_MEAN, sd=C.GUIDE_SD) -> torch.Tensor:
    with float64():
        x = C.data() if x is None else x
        return t64([C._subs(sp.sympify(e), x, {C.m: mean, C.s: sd}) for e in exprs])


# ------------------------------------------------------------------ Pyro side
def make_param_guide(reparam=True, mean=C.GUIDE_MEAN, sd=C.GUIDE_SD, draws=None, infer=None):
    """q_lambda(z) = N(m, s^2) with lambda = (m, s) as ``pyro.param``s.

    ``reparam=False`` hides the reparameterization from Pyro:
    ``dist.Normal(m, s).has_rsample_(False)``, so Pyro must use the score function.
    ``draws``: a list that receives each sampled ``z`` (detached), so that a check can
    recompute the estimator on the draw Pyro used. ``infer``: the site's ``infer`` dict.
    ``s`` is left unconstrained so that its ``.grad`` is d/ds itself.
    """
    if not sd > 0:
        raise ValueError(f"make_param_guide(): the guide's standard deviation must be > 0, got sd={sd}")

    def guide(x, *args, **kwargs):
        m = pyro.param("m", t64(mean))
        s = pyro.param("s", t64(sd))
        q = dist.Normal(m, s) if reparam else dist.Normal(m, s).has_rsample_(False)
        z = pyro.sample("z", q, infer=dict(infer or {}))
        if draws is not None:
            draws.append(z.detach().clone())

    return guide


def param_grads() -> dict:
    """The ``.grad`` that autograd left on each param of the store (by name)."""
    grads = {}
    for name, p in pyro.get_param_store().named_parameters():
        if p.grad is None:
            raise ValueError(f"param {name!r} has no .grad: nothing was differentiated with respect to it")
        grads[name] = p.grad.detach().clone()
    return grads


def loss_and_grads(elbo, guide, x, model=C.model, seed=0):
    """``elbo.loss_and_grads`` once, on a fresh param store: ``(loss, {name: .grad})``.

    The param store is cleared before and after, so nothing leaks between checks.
    """
    pyro.clear_param_store()
    try:
        with float64(), seeded(seed):
            loss = elbo.loss_and_grads(model, guide, x)
        return loss, param_grads()
    finally:
        pyro.clear_param_store()


def flat(grads: dict, names=PARAM_NAMES) -> torch.Tensor:
    """Concatenate the gradients of the named params into one float64 vector."""
    return torch.cat([grads[n].reshape(-1) for n in names])


# --------------------------------------------------------- the estimators by hand
def log_joint(x, z):
    """log p(x, z) of the conjugate model with plain torch (no Pyro): prior + likelihood."""
    prior = Normal(t64(C.PRIOR_MEAN), t64(C.PRIOR_SD)).log_prob(z)
    return prior + Normal(z.unsqueeze(-1), t64(C.NOISE_SD)).log_prob(x).sum(-1)


def scores(z, mean, sd, normalized=True):
    r"""Per-draw scores ``[d/dm, d/ds] log q_lambda(z)`` with ``z`` fixed, by autograd; shape ``z.shape + (2,)``.

    ``normalized=False`` scores ``log q + log s + log(2 pi)/2``, the density without its
    normalizing constant (a wrong variant).
    """
    z = t64(z).detach()
    m = torch.full_like(z, float(mean), requires_grad=True)
    s = torch.full_like(z, float(sd), requires_grad=True)
    log_q = Normal(m, s).log_prob(z)
    if not normalized:
        log_q = log_q + torch.log(s)
    gm, gs = torch.autograd.grad(log_q.sum(), (m, s))
    return torch.stack([gm, gs], -1)


def log_r(x, z, mean, sd):
    """log p(x, z) - log q_lambda(z) at fixed z (the weight of the score function)."""
    z = t64(z)
    return log_joint(x, z) - Normal(t64(mean), t64(sd)).log_prob(z)


def score_function_estimate(x, z, mean, sd, baseline=0.0):
    r"""One term of BBVI eq. (3): ``grad log q_lambda(z) * (log r(z) - baseline)``; vectorized over ``z``."""
    return scores(z, mean, sd) * (log_r(x, z, mean, sd) - baseline).unsqueeze(-1)


def reparam_estimate(x, e, mean, sd, through_z=True):
    r"""``grad_lambda [log p(x, m + s e) - log q_lambda(m + s e)]`` by autograd, ``e`` fixed.

    ``through_z=False`` detaches ``z = m + s e`` (a wrong variant: the path is cut).
    """
    lam = t64([mean, sd]).requires_grad_()
    m, s = lam[0], lam[1]
    z = m + s * t64(e)
    if not through_z:
        z = z.detach()
    f = log_joint(x, z) - Normal(m, s).log_prob(z)
    (g,) = torch.autograd.grad(f, lam)
    return g


# ------------------------------------------------------------------ identities
def _worst(*checks: Numeric, names=PARAM_NAMES) -> Numeric:
    """Several componentwise checks as one: the component with the largest error/tolerance.

    The returned Numeric passes only if every component passes; ``detail`` lists them all.
    """

    def ratio(c):
        return c.abs_error / c.tolerance if c.tolerance > 0 else (0.0 if c.abs_error == 0 else float("inf"))

    i = max(range(len(checks)), key=lambda j: ratio(checks[j]))
    w = checks[i]
    detail = dict(w.detail, component=names[i], components={n: c.as_dict() for n, c in zip(names, checks, strict=True)})
    return Numeric(w.lhs, w.rhs, w.abs_error, w.tolerance, w.kind, detail)


def componentwise_monte_carlo(samples, exact_values, scales) -> Numeric:
    """``monte_carlo`` on each column of ``samples`` (shape (n, 2)) against ``exact_values``."""
    samples, exact_values, scales = t64(samples), t64(exact_values), t64(scales)
    if samples.dim() != 2 or samples.shape[1] != len(exact_values):
        raise ValueError(f"samples must have shape (n, {len(exact_values)}), got {tuple(samples.shape)}")
    return _worst(*(monte_carlo(samples[:, j], exact_values[j], scale=scales[j]) for j in range(len(exact_values))))


# (1) the score-function identity, for f(z) = exp(t z)
SCORE_IDENTITY_T = 2.0
SCORE_IDENTITY_DRAWS = 2_000_000


def _exp_tz_sides(variant=None):
    """[grad E_q f], [E_q f * score] for f = exp(t z); ``unnormalized`` scores log q without -log(2 pi s^2)/2."""
    f = sp.exp(t * C.z)
    lhs = gradient_symbolic(gaussian_expectation(f))
    rhs = [gaussian_expectation(f * score_symbolic(lam, normalized=variant != "unnormalized")) for lam in LAMBDA]
    return lhs, rhs


def sym_score_function_identity(variant=None):
    lhs, rhs = _exp_tz_sides(variant)
    return along([a - b for a, b in zip(lhs, rhs, strict=True)])


def num_score_function_identity(variant=None):
    """Draws of f(z) grad log q(z) with f = exp(t z) against SymPy's gradient of E_q[f].

    The score comes from autograd on ``torch.distributions.Normal(m, s).log_prob`` (see :func:`scores`).
    Wrong variant ``unnormalized``: the score of log q without its normalizer, whose s-part is
    off by 1/s, so the s-component is off by E_q[f]/s.
    """
    with float64():
        mean, sd, tt = C.GUIDE_MEAN, C.GUIDE_SD, SCORE_IDENTITY_T
        with seeded(10):
            z = mean + sd * torch.randn(SCORE_IDENTITY_DRAWS, dtype=torch.float64)
        f = torch.exp(tt * z)
        samples = f.unsqueeze(-1) * scores(z, mean, sd, normalized=variant != "unnormalized")
        lhs = gradient_symbolic(gaussian_expectation(sp.exp(t * C.z)))
        target = t64([float(e.subs({t: tt, C.m: mean, C.s: sd})) for e in lhs])
        return componentwise_monte_carlo(samples, target, target.abs())


register(
    Identity(
        id="score-function-identity",
        chapter=CHAPTER,
        label="score-function-identity",
        statement=r"\nabla_\lambda\, \mathbb E_{q_\lambda(z)}[f(z)]"
        r" = \mathbb E_{q_\lambda(z)}\big[f(z)\,\nabla_\lambda \log q_\lambda(z)\big]",
        symbolic=sym_score_function_identity,
        numeric=num_score_function_identity,
        wrong=("unnormalized",),
        summary="the log-derivative trick: the gradient of an expectation is the expectation of f times the score",
    )
)


# (2) the score has mean zero
SCORE_MEAN_DRAWS = 40_000


def sym_score_mean_zero(variant=None):
    normalized = variant != "unnormalized"
    return along([gaussian_expectation(score_symbolic(lam, normalized)) for lam in LAMBDA])


def num_score_mean_zero(variant=None):
    """Draws of the score against 0, on the scale of one draw's standard deviation (1/s, sqrt(2)/s)."""
    with float64():
        mean, sd = C.GUIDE_MEAN, C.GUIDE_SD
        with seeded(11):
            z = dist.Normal(t64(mean), t64(sd)).sample((SCORE_MEAN_DRAWS,))
        samples = scores(z, mean, sd, normalized=variant != "unnormalized")
        return componentwise_monte_carlo(samples, [0.0, 0.0], [1 / sd, 2**0.5 / sd])


register(
    Identity(
        id="score-mean-zero",
        chapter=CHAPTER,
        label="score-mean-zero",
        statement=r"\mathbb E_{q_\lambda(z)}\big[\nabla_\lambda \log q_\lambda(z)\big]"
        r" = \nabla_\lambda \int q_\lambda(z)\,dz = 0",
        symbolic=sym_score_mean_zero,
        numeric=num_score_mean_zero,
        wrong=("unnormalized",),
        summary="the score has mean zero because q integrates to one for every lambda",
    )
)


# (3) BBVI eq. (2) and its estimator in Pyro; (5) the reparameterization gradient
#: Monte Carlo design of the two statistical gradient checks: ``B`` calls of
#: ``Trace_ELBO(num_particles=P, vectorize_particles=True).loss_and_grads``.
ESTIMATOR_BATCHES, ESTIMATOR_PARTICLES = 400, 4000
KINDS = ("score", "reparam")


@functools.lru_cache(maxsize=8)
def estimator_samples(kind, batches=ESTIMATOR_BATCHES, particles=ESTIMATOR_PARTICLES, seed=20) -> torch.Tensor:
    r"""``batches`` independent estimates of dL/d(m, s) from Pyro: ``-(.grad)`` after ``loss_and_grads``.

    ``kind`` is ``"score"`` (guide with ``has_rsample_(False)``) or ``"reparam"``; each
    estimate averages ``particles`` vectorized draws. Shape ``(batches, 2)``. Cached: do not modify.
    """
    if kind not in KINDS:
        raise ValueError(f"estimator_samples(): kind must be one of {KINDS}, got {kind!r}")
    if batches < 2 or particles < 1:
        raise ValueError(f"estimator_samples(): need batches >= 2 and particles >= 1, got {batches}, {particles}")
    with float64():
        x = C.data()
        elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
        guide = make_param_guide(reparam=kind == "reparam")
        out = torch.empty(batches, 2, dtype=torch.float64)
        pyro.clear_param_store()
        try:
            with seeded(seed):
                for b in range(batches):
                    elbo.loss_and_grads(C.model, guide, x)
                    out[b] = -flat(param_grads())
                    for _, p in pyro.get_param_store().named_parameters():
                        p.grad = None
        finally:
            pyro.clear_param_store()
    return out


def _gradient_check(kind, claimed):
    """Pyro's estimates of ``kind`` against the ``claimed`` mean, on the scale of the exact gradient."""
    claimed_value = _evaluate(claimed)
    return componentwise_monte_carlo(estimator_samples(kind), claimed_value, exact_elbo_gradient().abs())


def sym_bbvi_score_gradient(variant=None):
    exact_grad, by_score = elbo_gradient_symbolic(), score_gradient_by_integration(variant)
    return along([a - b for a, b in zip(exact_grad, by_score, strict=True)])


def num_bbvi_score_gradient(variant=None):
    """Mean of Pyro's score-function estimates (has_rsample False) against the claimed gradient."""
    claimed = elbo_gradient_symbolic() if variant is None else score_gradient_by_integration(variant)
    return _gradient_check("score", claimed)


register(
    Identity(
        id="bbvi-score-gradient",
        chapter=CHAPTER,
        label="bbvi-score-gradient",
        statement=r"\nabla_\lambda \mathcal L = \mathbb E_{q_\lambda(z)}\Big[\nabla_\lambda \log q_\lambda(z)\,"
        r"\big(\log p(x, z) - \log q_\lambda(z)\big)\Big]",
        symbolic=sym_bbvi_score_gradient,
        numeric=num_bbvi_score_gradient,
        wrong=("without-log-q",),
        summary="BBVI eq. (2), the score-function gradient; Pyro's non-reparameterized estimator is unbiased",
    )
)


def sym_reparam_gradient(variant=None):
    exact_grad, by_path = elbo_gradient_symbolic(), reparam_gradient_by_integration(variant)
    return along([a - b for a, b in zip(exact_grad, by_path, strict=True)])


def num_reparam_gradient(variant=None):
    """Mean of Pyro's reparameterized estimates against the claimed gradient."""
    claimed = elbo_gradient_symbolic() if variant is None else reparam_gradient_by_integration(variant)
    return _gradient_check("reparam", claimed)


register(
    Identity(
        id="reparam-gradient",
        chapter=CHAPTER,
        label="reparam-gradient",
        statement=r"\nabla_\lambda \mathcal L = \mathbb E_{\varepsilon \sim \mathcal N(0, 1)}\Big[\nabla_\lambda"
        r"\big(\log p(x, m + s\varepsilon) - \log q_\lambda(m + s\varepsilon)\big)\Big]",
        symbolic=sym_reparam_gradient,
        numeric=num_reparam_gradient,
        wrong=("no-path-through-z",),
        summary="the reparameterization gradient of the ELBO; Pyro's reparameterized estimator is unbiased",
    )
)


# (4) same draw: non-reparameterized guide = BBVI eq. (3)
def bbvi_estimate_check(particles=1, variant=None, seed=30) -> Numeric:
    """Pyro's ``.grad`` (guide with has_rsample False, ``num_particles=particles``) against -(eq. 3) on its draws."""
    with float64():
        x, draws = C.data(), []
        guide = make_param_guide(reparam=False, draws=draws)
        _, grads = loss_and_grads(Trace_ELBO(num_particles=particles), guide, x, seed=seed)
        z = torch.stack(draws)
        terms = score_function_estimate(x, z, C.GUIDE_MEAN, C.GUIDE_SD)
        if variant == "with-minus-score":  # also differentiate -log q with z fixed
            terms = terms - scores(z, C.GUIDE_MEAN, C.GUIDE_SD)
        sign = 1 if variant == "flipped-sign" else -1
        return exact(flat(grads), sign * terms.mean(0))


def num_bbvi_mc_estimate(variant=None):
    return bbvi_estimate_check(1, variant)


register(
    Identity(
        id="bbvi-mc-estimate",
        chapter=CHAPTER,
        label="bbvi-mc-estimate",
        statement=r"\begin{aligned}"
        r"-\nabla_\lambda\texttt{loss} &= \frac1S \sum_{k=1}^S \nabla_\lambda \log q_\lambda(z^{(k)})\,"
        r"\big(\log p(x, z^{(k)}) - \log q_\lambda(z^{(k)})\big), \\"
        r" z^{(k)} &\sim q_\lambda, \quad k = 1, \dots, S."
        r"\end{aligned}",
        numeric=num_bbvi_mc_estimate,
        wrong=("with-minus-score", "flipped-sign"),
        summary="BBVI eq. (3): with has_rsample False, the gradient Trace_ELBO leaves is the score-function estimate",
    )
)


# (6) same draw: reparameterized guide = autograd of the single-sample objective
def reparam_draw_check(variant=None, seed=31, mean=C.GUIDE_MEAN, sd=C.GUIDE_SD) -> Numeric:
    """Pyro's ``.grad`` (reparameterized guide) against the autograd gradient at the same eps."""
    with float64():
        x, draws = C.data(), []
        guide = make_param_guide(reparam=True, mean=mean, sd=sd, draws=draws)
        _, grads = loss_and_grads(Trace_ELBO(), guide, x, seed=seed)
        e = (draws[0] - mean) / sd  # the standard Normal draw behind z = m + s e
        g = reparam_estimate(x, e, mean, sd, through_z=variant != "no-path-through-z")
        sign = 1 if variant == "flipped-sign" else -1
        return exact(flat(grads), sign * g)


def num_reparam_single_draw(variant=None):
    return reparam_draw_check(variant)


register(
    Identity(
        id="reparam-single-draw",
        chapter=CHAPTER,
        label="reparam-single-draw",
        statement=r"\begin{aligned}"
        r"-\nabla_\lambda\texttt{loss} &= \nabla_\lambda\big(\log p(x, m + s\varepsilon)"
        r" - \log q_\lambda(m + s\varepsilon)\big), \\"
        r" &\qquad \varepsilon \sim \mathcal N(0, 1)\ \text{fixed}."
        r"\end{aligned}",
        numeric=num_reparam_single_draw,
        wrong=("no-path-through-z", "flipped-sign"),
        summary="with a reparameterized guide, the gradient Trace_ELBO leaves is autograd through z = m + s eps",
    )
)


# (7) the surrogate of _differentiable_loss_particle
def pyro_traces(guide, x, model=C.model, seed=0):
    """The (model_trace, guide_trace) pair of one draw, made the way Trace_ELBO makes it.

    Running the guide creates its params in Pyro's param store: clear it when done.
    """
    with seeded(seed):
        return Trace_ELBO()._get_trace(model, guide, (x,), {})


def score_parts_table(x, seed=32, parts=True) -> str:
    """The guide site on one draw from each guide, as a small fixed-width table.

    Columns: ``has_rsample``, ``z.requires_grad`` and, if ``parts``, the site's ``score_parts``
    (``log_prob``, ``score_function``, ``entropy_term``).
    """
    header = f"{'has_rsample':12s}{'z.requires_grad':16s}"
    lines = [(header + (f"{'log_prob':10s}{'score_function':16s}entropy_term" if parts else "")).rstrip()]
    pyro.clear_param_store()
    try:
        with float64():
            for reparam in (True, False):
                _, guide_trace = pyro_traces(make_param_guide(reparam=reparam), x, seed=seed)
                site = guide_trace.nodes["z"]
                row = f"{site['fn'].has_rsample!s:12s}{site['value'].requires_grad!s:16s}"
                if parts:
                    p = [float(v.detach()) if torch.is_tensor(v) else v for v in site["score_parts"]]
                    row += f"{p[0]:<10.4f}{p[1]:<16.4g}{p[2]:.4g}"
                lines.append(row.rstrip())
    finally:
        pyro.clear_param_store()
    return "\n".join(lines)


def rsample_table(x, seed=32) -> str:
    """``has_rsample`` and ``z.requires_grad`` on one draw from each guide (the gradients chapter's short table)."""
    return score_parts_table(x, seed=seed, parts=False)


def loss_and_surrogate_loss(reparam, x, seed=32) -> tuple[float, float]:
    """``_differentiable_loss_particle`` on one draw: the values of ``loss`` and ``surrogate_loss``."""
    pyro.clear_param_store()
    try:
        with float64():
            model_trace, guide_trace = pyro_traces(make_param_guide(reparam=reparam), x, seed=seed)
            loss, surrogate_loss = Trace_ELBO()._differentiable_loss_particle(model_trace, guide_trace)
        return float(loss), float(surrogate_loss.detach())
    finally:
        pyro.clear_param_store()


def pyro_surrogate(guide, x, seed=0):
    """Value and autograd gradient (in m, s) of the surrogate ELBO ``-surrogate_loss`` Pyro builds for one draw.

    Also returns the draw ``z``. Runs on a fresh param store and clears it afterwards.
    """
    pyro.clear_param_store()
    try:
        with float64():
            model_trace, guide_trace = pyro_traces(guide, x, seed=seed)
            _, surrogate_loss = Trace_ELBO()._differentiable_loss_particle(model_trace, guide_trace)
            params = [pyro.param(n).unconstrained() for n in PARAM_NAMES]
            grads = torch.autograd.grad(-surrogate_loss, params)
            return -float(surrogate_loss.detach()), torch.stack(grads), guide_trace.nodes["z"]["value"].detach()
    finally:
        pyro.clear_param_store()


def surrogate_by_hand(x, z, reparam, mean=C.GUIDE_MEAN, sd=C.GUIDE_SD, variant=None):
    r"""Value and gradient of the surrogate ELBO (equation ``surrogate-elbo``) for the one-site guide.

    reparameterized:      log p(x, z) - log q(z),  z = m + s e  (gradient through z);
    not reparameterized:  log p(x, z) + stop(log r) * log q(z),  z fixed.
    Wrong variants: ``log-r-not-detached``, ``entropy-term-for-all``.
    """
    lr = float(log_r(x, z, mean, sd))
    if reparam:
        return lr, reparam_estimate(x, (z - mean) / sd, mean, sd)
    log_q, score = float(log_joint(x, z)) - lr, scores(z, mean, sd)
    value, grad = float(log_joint(x, z)) + lr * log_q, lr * score
    if variant == "log-r-not-detached":  # log r also differentiated: it depends on lambda through -log q
        grad = grad - log_q * score
    if variant == "entropy-term-for-all":  # -log q subtracted as for a reparameterized site
        value, grad = value - log_q, grad - score
    return value, grad


def num_surrogate_elbo(variant=None):
    """For both guides: [value, d/dm, d/ds] of Pyro's surrogate against the formula, on the same draw."""
    with float64():
        x, pyro_side, hand_side = C.data(), [], []
        for reparam in (True, False):
            value, grad, z = pyro_surrogate(make_param_guide(reparam=reparam), x, seed=32)
            pyro_side.append(torch.cat([t64([value]), grad]))
            h_value, h_grad = surrogate_by_hand(x, z, reparam, variant=variant)
            hand_side.append(torch.cat([t64([h_value]), h_grad]))
        return exact(torch.cat(pyro_side), torch.cat(hand_side))


register(
    Identity(
        id="surrogate-elbo",
        chapter=ESTIMATORS,
        label="surrogate-elbo",
        statement=r"\begin{aligned}"
        r"\mathcal L^{\mathrm{sur}} &= \log p(x, z) - \sum_{j\ \text{reparam.}} \log q_\lambda(z_j) \\"
        r" &\quad + \sum_{j\ \text{not reparam.}} \bot\big[\log r\big]\, \log q_\lambda(z_j), \\"
        r" \log r &= \log p(x, z) - \log q_\lambda(z) \quad \text{(no plates, no auxiliary sites).}"
        r"\end{aligned}",
        numeric=num_surrogate_elbo,
        wrong=("log-r-not-detached", "entropy-term-for-all"),
        summary="the surrogate ELBO of Trace_ELBO._differentiable_loss_particle, value and gradient",
    )
)


# (8) differentiable_loss: the value of loss, the gradient of the surrogate
def differentiable_loss_sides(reparam, x, seed=33, variant=None):
    """[value, d/dm, d/ds] of ``differentiable_loss``, and of (``loss``, ``loss_and_grads``'s .grad), same draw."""
    guide = make_param_guide(reparam=reparam)
    pyro.clear_param_store()
    try:
        with float64(), seeded(seed):
            dl = Trace_ELBO().differentiable_loss(C.model, guide, x)
        grads = torch.autograd.grad(dl, [pyro.param(n).unconstrained() for n in PARAM_NAMES])
        lhs = torch.cat([t64([float(dl.detach())]), torch.stack(grads)])
    finally:
        pyro.clear_param_store()
    with float64(), seeded(seed):
        loss = Trace_ELBO().loss(C.model, guide, x)
    _, lg = loss_and_grads(Trace_ELBO(), guide, x, seed=seed)
    if variant == "surrogate-value":
        loss = -pyro_surrogate(guide, x, seed=seed)[0]
    return lhs, torch.cat([t64([loss]), flat(lg)])


def num_differentiable_loss(variant=None):
    with float64():
        x = C.data()
        sides = [differentiable_loss_sides(reparam, x, variant=variant) for reparam in (True, False)]
        return exact(torch.cat([a for a, _ in sides]), torch.cat([b for _, b in sides]))


register(
    Identity(
        id="differentiable-loss",
        chapter=ESTIMATORS,
        label="differentiable-loss",
        statement=r"\texttt{differentiable\_loss}"
        r" = \texttt{loss} + \big(-\mathcal L^{\mathrm{sur}} - \bot[-\mathcal L^{\mathrm{sur}}]\big)",
        numeric=num_differentiable_loss,
        wrong=("surrogate-value",),
        summary="differentiable_loss has the value of loss and the gradient of the surrogate",
    )
)


# (9) Rao-Blackwellization through (vectorized) plates
def local_model(x):
    """One local latent per data point: z_n ~ N(mu0, s0^2), x_n | z_n ~ N(z_n, sigma^2), in one vectorized plate."""
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(t64(C.PRIOR_MEAN), t64(C.PRIOR_SD)))
        pyro.sample("x", dist.Normal(z, t64(C.NOISE_SD)), obs=x)


def make_local_guide(n, draws=None):
    """q(z_n) = N(m_n, s_n^2) inside the vectorized plate, not reparameterized; params m, s of length ``n``."""

    def guide(x):
        m = pyro.param("m", torch.full((n,), C.GUIDE_MEAN, dtype=torch.float64))
        s = pyro.param("s", torch.full((n,), C.GUIDE_SD, dtype=torch.float64))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(m, s).has_rsample_(False))
        if draws is not None:
            draws.append(z.detach().clone())

    return guide


def local_log_r(x, z, mean=C.GUIDE_MEAN, sd=C.GUIDE_SD):
    """Per data point: log r_n = log p(x_n | z_n) + log p(z_n) - log q(z_n); shape of ``z``."""
    prior = Normal(t64(C.PRIOR_MEAN), t64(C.PRIOR_SD)).log_prob(z)
    return Normal(z, t64(C.NOISE_SD)).log_prob(x) + prior - Normal(t64(mean), t64(sd)).log_prob(z)


def local_estimates(x, z, rao_blackwell=True):
    """Score-function estimates for (m_n, s_n): score_n * log r_n, or score_n * sum_j log r_j; shape z.shape+(2,)."""
    lr = local_log_r(x, z)
    weight = lr if rao_blackwell else lr.sum(-1, keepdim=True).expand_as(lr)
    return scores(z, C.GUIDE_MEAN, C.GUIDE_SD) * weight.unsqueeze(-1)


def num_rao_blackwell(variant=None):
    """Pyro's .grad of the local model against -(score_n log r_n) on the same draw."""
    with float64():
        x, draws = C.data(), []
        _, grads = loss_and_grads(Trace_ELBO(), make_local_guide(len(x), draws), x, model=local_model, seed=34)
        est = local_estimates(x, draws[0], rao_blackwell=variant != "no-rao-blackwell")
        return exact(flat(grads), -torch.cat([est[:, 0], est[:, 1]]))


register(
    Identity(
        id="rao-blackwell-plates",
        chapter=ESTIMATORS,
        label="rao-blackwell-plates",
        statement=r"\begin{aligned}"
        r"-\nabla_{\lambda_n}\texttt{loss} &= \nabla_{\lambda_n}\log q_{\lambda_n}(z_n)\,\log r_n, \\"
        r" \log r_n &= \log p(x_n \mid z_n) + \log p(z_n) - \log q_{\lambda_n}(z_n)."
        r"\end{aligned}",
        numeric=num_rao_blackwell,
        wrong=("no-rao-blackwell",),
        summary="inside a vectorized plate, log_r.sum_to keeps only the terms of the site's own data point",
    )
)


def sequential_local_model(x):
    """``local_model`` with a sequential plate, ``for n in pyro.plate(...)``: one site per data point."""
    for n in pyro.plate("data", len(x)):
        z = pyro.sample(f"z_{n}", dist.Normal(t64(C.PRIOR_MEAN), t64(C.PRIOR_SD)))
        pyro.sample(f"x_{n}", dist.Normal(z, t64(C.NOISE_SD)), obs=x[n])


def make_sequential_local_guide(n, draws=None):
    """``make_local_guide`` with a sequential plate; ``draws`` receives the n draws stacked in one tensor."""

    def guide(x):
        m = pyro.param("m", torch.full((n,), C.GUIDE_MEAN, dtype=torch.float64))
        s = pyro.param("s", torch.full((n,), C.GUIDE_SD, dtype=torch.float64))
        z = [pyro.sample(f"z_{i}", dist.Normal(m[i], s[i]).has_rsample_(False)) for i in pyro.plate("data", len(x))]
        if draws is not None:
            draws.append(torch.stack(z).detach().clone())

    return guide


def sequential_plate_check(rao_blackwell=False, seed=34) -> Numeric:
    """Pyro's .grad with a *sequential* plate against the estimate with weight log r_n (``rao_blackwell``)
    or with the whole sum of log r (the default, which is what Pyro computes: ``MultiFrameTensor.add``
    keeps only vectorized frames, so a sequential plate gives ``sum_to`` nothing to keep apart)."""
    with float64():
        x, draws = C.data(), []
        guide = make_sequential_local_guide(len(x), draws)
        _, grads = loss_and_grads(Trace_ELBO(), guide, x, model=sequential_local_model, seed=seed)
        est = local_estimates(x, draws[0], rao_blackwell=rao_blackwell)
        return exact(flat(grads), -torch.cat([est[:, 0], est[:, 1]]))


RB_DRAWS = 20_000


def rao_blackwell_variances(draws=RB_DRAWS, seed=35):
    """Per-draw variance of the estimate for (m_1, s_1), with and without Rao-Blackwellization."""
    with float64():
        x = C.data()
        with seeded(seed):
            z = dist.Normal(t64(C.GUIDE_MEAN), t64(C.GUIDE_SD)).sample((draws, len(x)))
        return {rb: local_estimates(x, z, rao_blackwell=rb)[:, 0, :].var(0) for rb in (True, False)}


# (10) TraceGraph_ELBO with a baseline
def tracegraph_baseline() -> float:
    """The constant baseline the check uses: the closed-form ELBO at the guide, b = L(m, s)."""
    return C.elbo_value()


def num_tracegraph_baseline(variant=None):
    """TraceGraph_ELBO's .grad with ``baseline_value = b`` against -(score * (log r - b)) on the same draw."""
    with float64():
        x, draws, b = C.data(), [], tracegraph_baseline()
        guide = make_param_guide(reparam=False, draws=draws, infer={"baseline": {"baseline_value": t64(b)}})
        _, grads = loss_and_grads(TraceGraph_ELBO(), guide, x, seed=36)
        used = 0.0 if variant == "baseline-ignored" else b
        return exact(flat(grads), -score_function_estimate(x, draws[0], C.GUIDE_MEAN, C.GUIDE_SD, baseline=used))


register(
    Identity(
        id="tracegraph-baseline",
        chapter=ESTIMATORS,
        label="tracegraph-baseline",
        statement=r"-\nabla_\lambda\texttt{loss}"
        r" = \nabla_\lambda \log q_\lambda(z)\,\big(\log p(x, z) - \log q_\lambda(z) - b\big)",
        numeric=num_tracegraph_baseline,
        wrong=("baseline-ignored",),
        summary="TraceGraph_ELBO subtracts the baseline b from the score function's weight",
    )
)

BASELINE_DRAWS = 20_000


def baseline_variances(draws=BASELINE_DRAWS, seed=37):
    """Per-draw variance of the score-function estimate (m, s) without and with the baseline b."""
    with float64():
        x = C.data()
        with seeded(seed):
            z = dist.Normal(t64(C.GUIDE_MEAN), t64(C.GUIDE_SD)).sample((draws,))
        return {
            b: score_function_estimate(x, z, C.GUIDE_MEAN, C.GUIDE_SD, baseline=b).var(0)
            for b in (0.0, tracegraph_baseline())
        }


# (11) at the posterior, the reparameterized estimator is the zero-mean score term
STL_DRAWS = 10


def num_score_at_posterior(variant=None):
    """With q = p(z|x), Pyro's .grad on each draw equals grad log q_lambda(z) at fixed z (not 0)."""
    with float64():
        x = C.data()
        post = C.posterior(x)
        mean, sd = float(post.loc), float(post.scale)
        lhs, rhs = [], []
        for i in range(STL_DRAWS):
            draws = []
            guide = make_param_guide(reparam=True, mean=mean, sd=sd, draws=draws)
            _, grads = loss_and_grads(Trace_ELBO(), guide, x, seed=40 + i)
            lhs.append(flat(grads))
            score = scores(draws[0], mean, sd)
            rhs.append(torch.zeros_like(score) if variant == "sticks-the-landing" else score)
        return exact(torch.cat(lhs), torch.cat(rhs))


register(
    Identity(
        id="score-at-posterior",
        chapter=ESTIMATORS,
        label="score-at-posterior",
        statement=r"\begin{aligned}"
        r"q_\lambda(z) = p(z \mid x) \implies"
        r" -\nabla_\lambda\texttt{loss} &= -\nabla_\lambda \log q_\lambda(z)\big|_{z\ \text{fixed}}, \\"
        r" z &= m + s\varepsilon."
        r"\end{aligned}",
        numeric=num_score_at_posterior,
        wrong=("sticks-the-landing",),
        summary="at the optimum the reparameterized estimator is exactly the zero-mean score term, so it is not 0",
    )
)


def stl_comment_branch() -> str:
    """Which branch of the installed ``Distribution.score_parts`` holds the "Sticking the Landing" comment.

    Returns ``"reparameterized"`` (``if self.has_rsample:``) or ``"not reparameterized"`` (``else:``).
    """
    src = inspect.getsource(pyro.distributions.Distribution.score_parts)
    if "if self.has_rsample:" not in src or "Sticking the Landing" not in src:
        raise ValueError("stl_comment_branch(): the installed Distribution.score_parts has changed; read it again")
    reparam_branch, other_branch = src.split("if self.has_rsample:", 1)[1].split("else:", 1)
    return "reparameterized" if "Sticking the Landing" in reparam_branch else "not reparameterized"


# ------------------------------------------------------ variance against particles
PARTICLE_COUNTS = (1, 2, 4, 8, 16, 32, 64)
VARIANCE_BATCHES = 200


def variance_by_particles(particles=PARTICLE_COUNTS, batches=VARIANCE_BATCHES, seed=50) -> dict:
    """For each estimator kind: the total variance (var of d/dm + var of d/ds) of Pyro's estimate per S."""
    return {
        kind: [float(estimator_samples(kind, batches, p, seed + p).var(0).sum()) for p in particles] for kind in KINDS
    }


# ------------------------------------------------- exact variances and the claims they back
# Every estimator here is a polynomial in one Gaussian draw, so its variance is a finite sum of
# Gaussian moments: SymPy computes it exactly (no sampling). The book's comparisons of variances
# are claims on these exact numbers.


def _variance(estimate, v=C.z, mean=C.m, sd=C.s):
    """Var[estimate(v)] for v ~ N(mean, sd^2), exactly: E[e^2] - E[e]^2 by Gaussian moments."""
    e = sp.expand(estimate)
    return gaussian_expectation(sp.expand(e**2), v, mean, sd) - gaussian_expectation(e, v, mean, sd) ** 2


def score_estimate_symbolic(baseline=0):
    """[d/dm, d/ds] of one score-function estimate, grad log q(z) (log r(z) - baseline), z ~ q."""
    return [score_symbolic(lam) * (log_r_symbolic() - baseline) for lam in LAMBDA]


def reparam_estimate_symbolic():
    """[d/dm, d/ds] of one reparameterized estimate, as a polynomial in eps ~ N(0, 1)."""
    path = {C.z: C.m + C.s * eps}
    return [sp.diff(log_r_symbolic().subs(path), lam) for lam in LAMBDA]


@functools.cache
def exact_variances() -> dict:
    """Exact per-draw (S = 1) total variance, Var d/dm + Var d/ds, of each estimator at the chapter's guide.

    Keys: ``"score"`` (BBVI eq. 3 with one draw), ``"reparam"``, ``"score-baseline"`` (weight
    log r - b with b = L(m, s), the closed-form ELBO, as ``TraceGraph_ELBO`` is given below) and
    ``"score-baseline-flipped"`` (b = -L(m, s), a sign slip).
    """
    elbo = C.elbo_closed_form()
    exprs = {
        "score": sum(_variance(e) for e in score_estimate_symbolic()),
        "reparam": sum(_variance(e, eps, 0, 1) for e in reparam_estimate_symbolic()),
        "score-baseline": sum(_variance(e) for e in score_estimate_symbolic(elbo)),
        "score-baseline-flipped": sum(_variance(e) for e in score_estimate_symbolic(-elbo)),
    }
    with float64():
        x = C.data()
        return {k: C._subs(sp.sympify(e), x) for k, e in exprs.items()}


def num_score_noisier(variant=None):
    """Exact variances: score function > reparameterized (S = 1). Wrong variant ``reversed``."""
    v = exact_variances()
    score, reparam = v["score"], v["reparam"]
    what = "exact Var d/dm + Var d/ds of one {} estimate (S = 1)"
    if variant == "reversed":
        return inequality(reparam, score, ">", lhs_is=what.format("reparameterized"), rhs_is=what.format("score"))
    return inequality(score, reparam, ">", lhs_is=what.format("score-function"), rhs_is=what.format("reparameterized"))


register(
    Identity(
        id="score-function-noisier",
        kind="claim",
        chapter=CHAPTER,
        label=None,
        statement=r"\mathrm{Var}\,\hat g_{\mathrm{score}} > \mathrm{Var}\,\hat g_{\mathrm{reparam}}"
        r"\quad (S = 1,\ \text{summed over } m, s)",
        numeric=num_score_noisier,
        wrong=("reversed",),
        summary="on the conjugate model the score-function estimate has more variance than the"
        " reparameterized one (exact variances)",
    )
)


def num_baseline_reduces_variance(variant=None):
    """Exact variances: with the baseline b = L(m, s) < without. Wrong variant ``baseline-sign-flipped`` (b = -L)."""
    v = exact_variances()
    key = "score-baseline-flipped" if variant == "baseline-sign-flipped" else "score-baseline"
    b = "-L(m, s)" if variant == "baseline-sign-flipped" else "L(m, s)"
    return inequality(
        v[key],
        v["score"],
        "<",
        lhs_is=f"exact Var d/dm + Var d/ds of one score-function estimate with baseline b = {b}",
        rhs_is="the same without a baseline",
    )


register(
    Identity(
        id="baseline-reduces-variance",
        kind="claim",
        chapter=ESTIMATORS,
        label=None,
        statement=r"\mathrm{Var}\big[\nabla_\lambda \log q_\lambda(z)\,(\log r - b)\big]"
        r" < \mathrm{Var}\big[\nabla_\lambda \log q_\lambda(z)\,\log r\big],\ b = \mathcal L(m, s)",
        numeric=num_baseline_reduces_variance,
        wrong=("baseline-sign-flipped",),
        summary="the constant baseline b = L(m, s) lowers the score-function estimate's variance (exact)",
    )
)


@functools.cache
def exact_rao_blackwell_variances(point=0) -> dict:
    """Exact per-draw variance of the estimate for m_n (n = ``point``) in the local model.

    ``True``: weight log r_n (Pyro's, inside a vectorized plate); ``False``: weight sum_j log r_j.
    The z_j are independent under the guide, so with R = sum_{j != n} log r_j,
    E[(sc (lr_n + R))^2] = E[sc^2 lr_n^2] + 2 E[sc^2 lr_n] E[R] + E[sc^2] E[R^2], and E[sc R] = 0.
    """
    with float64():
        x = [float(v) for v in C.data()]

    def lr(xn):
        return C.log_normal(xn, C.z, C.sigma) + C.log_normal(C.z, C.mu0, C.s0) - C.log_normal(C.z, C.m, C.s)

    def e(f):
        return gaussian_expectation(sp.expand(f))

    sc = score_symbolic(C.m)
    lr_n = lr(x[point])
    others = [lr(xj) for j, xj in enumerate(x) if j != point]
    mean_r = sum(e(f) for f in others)
    second_r = sum(e(f**2) - e(f) ** 2 for f in others) + mean_r**2
    mean_rb = e(sc * lr_n)
    rb = e(sc**2 * lr_n**2) - mean_rb**2
    full = e(sc**2 * lr_n**2) + 2 * e(sc**2 * lr_n) * mean_r + e(sc**2) * second_r - mean_rb**2
    with float64():
        xs = C.data()
        return {True: C._subs(sp.sympify(rb), xs), False: C._subs(sp.sympify(full), xs)}


def num_rao_blackwell_variance(variant=None):
    """Exact: Var with Pyro's weight log r_n < Var with the whole sum. Wrong variant ``reversed``."""
    v = exact_rao_blackwell_variances()
    own, full = "exact Var of the m_1 estimate weighted by log r_1 (Pyro)", "the same weighted by sum_j log r_j"
    if variant == "reversed":
        return inequality(v[False], v[True], "<", lhs_is=full, rhs_is=own)
    return inequality(v[True], v[False], "<", lhs_is=own, rhs_is=full)


register(
    Identity(
        id="rao-blackwell-reduces-variance",
        kind="claim",
        chapter=ESTIMATORS,
        label=None,
        statement=r"\mathrm{Var}\big[\partial_{m_1}\log q\;\log r_1\big]"
        r" < \mathrm{Var}\big[\partial_{m_1}\log q\;\textstyle\sum_j \log r_j\big]",
        numeric=num_rao_blackwell_variance,
        wrong=("reversed",),
        summary="inside a vectorized plate Pyro's own-data-point weight lowers the variance (exact)",
    )
)


# ------------------------------------------------ a scaled, non-reparameterized site
#: the factor of the scaled-site check: poutine.scale on z, in the model and in the guide
SITE_SCALE = 2.5


def scaled_model(x, c=SITE_SCALE):
    """The conjugate model with its latent site scaled by ``c`` (``poutine.scale``)."""
    with pyro.poutine.scale(scale=c):
        z = pyro.sample("z", dist.Normal(t64(C.PRIOR_MEAN), t64(C.PRIOR_SD)))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(z, t64(C.NOISE_SD)), obs=x)


def make_scaled_guide(c=SITE_SCALE, draws=None):
    """q_lambda(z) = N(m, s^2), not reparameterized, its site scaled by ``c`` like the model's."""

    def guide(x):
        m = pyro.param("m", t64(C.GUIDE_MEAN))
        s = pyro.param("s", t64(C.GUIDE_SD))
        with pyro.poutine.scale(scale=c):
            z = pyro.sample("z", dist.Normal(m, s).has_rsample_(False))
        if draws is not None:
            draws.append(z.detach().clone())

    return guide


def num_surrogate_scaled_site(variant=None):
    """Pyro's .grad for a scaled, non-reparameterized site against the formula, on the same draw.

    Formula: -grad loss = grad log q(z) * (log p(x|z) + c log p(z) - c log q(z)): the score
    multiplies the *unscaled* log q; the scale enters through the weight. Wrong variant
    ``scaled-score`` multiplies the score by c too (reading the surrogate with c log q).
    """
    with float64():
        x, draws, c = C.data(), [], SITE_SCALE
        _, grads = loss_and_grads(Trace_ELBO(), make_scaled_guide(c, draws), x, model=scaled_model, seed=38)
        z = draws[0]
        mean, sd = C.GUIDE_MEAN, C.GUIDE_SD
        lik = Normal(z, t64(C.NOISE_SD)).log_prob(x).sum()
        prior = Normal(t64(C.PRIOR_MEAN), t64(C.PRIOR_SD)).log_prob(z)
        log_q = Normal(t64(mean), t64(sd)).log_prob(z)
        weight = lik + c * prior - c * log_q
        score = scores(z, mean, sd)
        if variant == "scaled-score":
            score = c * score
        return exact(flat(grads), -score * weight)


register(
    Identity(
        id="surrogate-scaled-site",
        chapter=ESTIMATORS,
        label="surrogate-scaled-site",
        statement=r"\begin{aligned}"
        r"-\nabla_\lambda\texttt{loss} &= \nabla_\lambda \log q_\lambda(z)\,\big(\log p(x \mid z) \\"
        r" &\qquad + c\log p(z) - c\log q_\lambda(z)\big), \\"
        r" &\quad c = \text{scale of } z,\ z \text{ not reparam.}"
        r"\end{aligned}",
        numeric=num_surrogate_scaled_site,
        wrong=("scaled-score",),
        summary="for a scaled site the score multiplies the unscaled log q; the scale enters the weight only",
    )
)
