r"""Chapter ``reconstruction-and-kl``: the p(x|z)p(z) split, AEVB estimators A and B, the Gaussian KL.

Since ``log p(x, z) = log p(x | z) + log p(z)``, the ELBO of BBVI eq. (1) regroups as

    L = E_q[log p(x | z)] - KL(q(z) || p(z))                           (AEVB eq. (3))

Pyro has two estimators of the same L, on the same draws z^(k) ~ q, k = 1..S:

* ``Trace_ELBO``: (1/S) sum_k [log p(x | z^(k)) + log p(z^(k)) - log q(z^(k))]
  -- AEVB's estimator A (eq. (6)); the KL is never computed, only sampled;
* ``TraceMeanField_ELBO``: (1/S) sum_k log p(x | z^(k)) - KL(q || p), the KL in closed
  form where torch has one -- AEVB's estimator B (eq. (7)).

The running example is the chapter-1 model (:mod:`elbo_terms.conjugate`), whose prior is
N(0, 1) and whose guide is N(m, s^2). AEVB writes mu, sigma for the guide's m, s; the book
keeps sigma for the observation noise.
"""

from __future__ import annotations

from functools import cache

import sympy as sp
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import Normal, kl_divergence

from .._util import float64, seeded, t64
from ..build.identity import Identity, IdentityFailed, Numeric, exact, inequality, monte_carlo, register
from . import conjugate as C
from .trace_source import SourceLine, count_found, traces

CHAPTER = "reconstruction-and-kl"

# ------------------------------------------------------------------- SymPy side
z, m, s, mu0, s0 = C.z, C.m, C.s, C.mu0, C.s0


@cache
def kl_by_integration(m_=m, s_=s, mu_=mu0, sd_=s0):
    r"""KL(N(m_, s_^2) || N(mu_, sd_^2)) = \int q(z) (log q(z) - log p(z)) dz, integrated by SymPy."""
    log_q, log_p = C.log_normal(z, m_, s_), C.log_normal(z, mu_, sd_)
    integrand = sp.expand((log_q - log_p) * sp.exp(log_q))
    return sp.simplify(sp.integrate(integrand, (z, -sp.oo, sp.oo), conds="none"))


def gaussian_kl_closed_form(variant=None):
    """log(s0/s) + (s^2 + (m - mu0)^2) / (2 s0^2) - 1/2.

    Variant ``swapped-arguments``: the same formula for KL(p || q), the arguments swapped.
    """
    if variant == "swapped-arguments":
        return sp.log(s / s0) + (s0**2 + (mu0 - m) ** 2) / (2 * s**2) - sp.Rational(1, 2)
    return sp.log(s0 / s) + (s**2 + (m - mu0) ** 2) / (2 * s0**2) - sp.Rational(1, 2)


def standard_kl_closed_form(variant=None):
    """1/2 (m^2 + s^2 - 1 - log s^2), AEVB App. B (variant ``log-s-not-squared``: log s)."""
    log_term = sp.log(s) if variant == "log-s-not-squared" else sp.log(s**2)
    return (m**2 + s**2 - 1 - log_term) / 2


@cache
def expected_log_likelihood_by_integration():
    r"""E_q[log p(x | z)] = \int q(z) sum_i log N(x_i; z, sigma^2) dz, integrated by SymPy."""
    log_q = C.log_normal(z, m, s)
    integrand = sp.expand(C.log_likelihood_symbolic() * sp.exp(log_q))
    return sp.integrate(integrand, (z, -sp.oo, sp.oo), conds="none")


def expected_log_likelihood_grouped():
    r"""-N/2 log(2 pi sigma^2) - (T_2 - 2 m T_1 + N (m^2 + s^2)) / (2 sigma^2): the integral above, grouped.

    (E_q[(x_n - z)^2] = (x_n - m)^2 + s^2, summed over n.)
    """
    N, T1, T2, sigma = C.N, C.T1, C.T2, C.sigma
    return -N * sp.log(2 * sp.pi * sigma**2) / 2 - (T2 - 2 * m * T1 + N * (m**2 + s**2)) / (2 * sigma**2)


@cache
def expected_log_prior_by_integration():
    r"""E_q[log p(z)], integrated by SymPy."""
    log_q = C.log_normal(z, m, s)
    return sp.integrate(sp.expand(C.log_normal(z, mu0, s0) * sp.exp(log_q)), (z, -sp.oo, sp.oo), conds="none")


eps = sp.Symbol("varepsilon", real=True)


@cache
def log_q_at_reparameterized_draw():
    r"""log q(z) at z = m + s*eps: -log(2 pi s^2)/2 - eps^2/2, by substitution into log N(z; m, s^2)."""
    return sp.expand(C.log_normal(m + s * eps, m, s), log=False)


@cache
def log_q_variance():
    r"""Var_eps[log q(m + s*eps)] with eps ~ N(0, 1), integrated by SymPy: 1/2, whatever m and s.

    log q(z) = -log s - log(2 pi)/2 - eps^2/2, so its variance is Var(eps^2)/4 = 2/4.
    """
    density = sp.exp(-(eps**2) / 2) / sp.sqrt(2 * sp.pi)
    f = log_q_at_reparameterized_draw()
    mean = sp.integrate(f * density, (eps, -sp.oo, sp.oo))
    second = sp.integrate(sp.expand(f**2) * density, (eps, -sp.oo, sp.oo))
    return sp.simplify(second - mean**2)


def log_q_variance_measured(sd, draws=20_000, mean=0.6, seed=71) -> float:
    """The sample variance of the guide's log q(z) over ``draws`` draws z ~ N(mean, sd^2), read from traces."""
    with float64(), torch.no_grad():
        t = particle_terms(C.model, C.make_guide(mean, sd), C.data(), particles=draws, vectorize=True, seed=seed)
        return float(t["log_q"].var())


# ---------------------------------------------------------------- the setting
#: (m, s) pairs at which the standard-normal KL formula is compared with torch
STANDARD_POINTS = ((0.0, 1.0), (0.3, 0.4), (-1.2, 0.05), (2.5, 3.0), (0.7, 1.6))
#: (m, s, mu0, s0) at which the general formula is compared with torch
GENERAL_POINTS = ((0.3, 0.4, 0.0, 1.0), (0.3, 0.4, 1.0, 0.5), (-2.0, 1.5, 0.5, 0.2), (1.0, 1.0, 1.0, 1.0))
#: particles of the same-draw checks of estimators A and B
PARTICLES = 8
#: independent draws in the Monte Carlo checks
MC_DRAWS = 40_000


def prior():
    """The model's prior p(z) = N(mu0, s0^2) of the chapter-1 model."""
    return Normal(t64(C.PRIOR_MEAN), t64(C.PRIOR_SD))


def guide_dist(mean=C.GUIDE_MEAN, sd=C.GUIDE_SD):
    """The guide q(z) = N(m, s^2) of the chapter-1 model."""
    return Normal(t64(mean), t64(sd))


def expanded(expr):
    """An expression with its logarithms split and its products expanded, for display."""
    return sp.expand(sp.expand_log(expr, force=True))


def _at(expr, values):
    return float(sp.N(expr.subs(values), 30))


# --------------------------------------------------------- per-particle terms from traces
def particle_terms(model_fn, guide_fn, *args, particles=1, vectorize=False, seed=0) -> dict:
    """The three terms of each particle, read from the same traces ``Trace_ELBO`` makes.

    Returns float64 tensors of shape ``(particles,)``:

    * ``reconstruction``: sum of the model's observed sites, log p(x | z^(k));
    * ``log_prior``: sum of the model's latent sites, log p(z^(k));
    * ``log_q``: sum of the guide's sites, log q(z^(k));
    * ``kl_mc`` = ``log_q - log_prior``, the one-draw Monte Carlo KL.

    With ``vectorize`` every site carries the particles in its leading dimension.
    """
    terms = {"reconstruction": [], "log_prior": [], "log_q": []}
    for model_trace, guide_trace in traces(
        model_fn, guide_fn, *args, particles=particles, vectorize=vectorize, seed=seed
    ):
        model_trace.compute_log_prob()
        guide_trace.compute_log_prob()
        n = particles if vectorize else 1
        acc = {k: torch.zeros(n, dtype=torch.float64) for k in terms}
        for tr, which in ((model_trace, "model"), (guide_trace, "guide")):
            for site in tr.nodes.values():
                if site["type"] != "sample":
                    continue
                lp = site["log_prob"].detach()
                lp = lp.reshape(n, -1).sum(-1) if vectorize else lp.sum().reshape(1)
                key = "log_q" if which == "guide" else ("reconstruction" if site["is_observed"] else "log_prior")
                acc[key] = acc[key] + lp
        for k in terms:
            terms[k].append(acc[k])
    out = {k: torch.cat(v) for k, v in terms.items()}
    out["kl_mc"] = out["log_q"] - out["log_prior"]
    return out


def analytic_kl(mean=C.GUIDE_MEAN, sd=C.GUIDE_SD) -> float:
    """torch's closed-form KL(q || p) of the chapter-1 guide and prior."""
    return float(kl_divergence(guide_dist(mean, sd), prior()))


def elbo_losses(particles, repeats, seed=0, mean=C.GUIDE_MEAN, sd=C.GUIDE_SD):
    """``repeats`` independent values of -Trace_ELBO.loss and -TraceMeanField_ELBO.loss with S = ``particles``."""
    with float64():
        x, guide = C.data(), C.make_guide(mean, sd)
        out = {}
        for name, cls in (("A", Trace_ELBO), ("B", TraceMeanField_ELBO)):
            elbo = cls(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
            with seeded(seed):
                out[name] = t64([-elbo.loss(C.model, guide, x) for _ in range(repeats)])
        return out


# ------------------------------------------------------------------ identities
def sym_split(variant=None):
    """The ELBO integrated in one piece, minus [E_q log p(x|z) - KL(q || p(z))] integrated in pieces.

    Variant ``log-prior-as-kl``: E_q log p(x|z) + E_q log p(z), i.e. the prior's term read as
    the KL term, with the guide's -log q forgotten.
    """
    recon = expected_log_likelihood_by_integration()
    if variant == "log-prior-as-kl":
        rhs = recon + expected_log_prior_by_integration()
    else:
        rhs = recon - kl_by_integration()
    return C.elbo_by_integration() - rhs


def num_split(variant=None) -> Numeric:
    """Monte Carlo: draws of log p(x | z^(k)) - KL_torch(q || p) average to the closed-form ELBO.

    Variant ``log-prior-as-kl``: draws of log p(x | z^(k)) + log p(z^(k)).
    """
    with float64():
        x = C.data()
        t = particle_terms(C.model, C.make_guide(), x, particles=MC_DRAWS, vectorize=True, seed=31)
        if variant == "log-prior-as-kl":
            samples = t["reconstruction"] + t["log_prior"]
        else:
            samples = t["reconstruction"] - analytic_kl()
        return monte_carlo(samples, C.elbo_value())


register(
    Identity(
        id="elbo-reconstruction-kl",
        chapter=CHAPTER,
        label="elbo-reconstruction-kl",
        statement=r"\mathcal L(\lambda) = \mathbb E_{q_\lambda(z)}\big[\log p(x \mid z)\big]"
        r" - \mathrm{KL}\big(q_\lambda(z)\,\Vert\,p(z)\big)",
        symbolic=sym_split,
        numeric=num_split,
        wrong=("log-prior-as-kl",),
        summary="the ELBO is the expected reconstruction minus the KL from the guide to the prior (AEVB eq. 3)",
    )
)


def sym_general_kl(variant=None):
    return kl_by_integration() - gaussian_kl_closed_form(variant)


def num_general_kl(variant=None) -> Numeric:
    """torch's kl_divergence between two Normals against the formula, at several points."""
    with float64():
        torch_kl, formula = [], []
        for mv, sv, m0, sd0 in GENERAL_POINTS:
            torch_kl.append(float(kl_divergence(Normal(t64(mv), t64(sv)), Normal(t64(m0), t64(sd0)))))
            formula.append(_at(gaussian_kl_closed_form(variant), {m: mv, s: sv, mu0: m0, s0: sd0}))
        return exact(t64(torch_kl), t64(formula))


register(
    Identity(
        id="gaussian-kl-general",
        chapter=CHAPTER,
        label="gaussian-kl-general",
        statement=r"\mathrm{KL}\big(\mathcal N(m, s^2)\,\Vert\,\mathcal N(\mu_0, s_0^2)\big)"
        r" = \log\frac{s_0}{s} + \frac{s^2 + (m - \mu_0)^2}{2 s_0^2} - \frac12",
        symbolic=sym_general_kl,
        numeric=num_general_kl,
        wrong=("swapped-arguments",),
        summary="the KL between two univariate Normals, by integration; torch's kl_divergence agrees",
    )
)


def sym_standard_kl(variant=None):
    return kl_by_integration(m, s, 0, 1) - standard_kl_closed_form(variant)


def num_standard_kl(variant=None) -> Numeric:
    """torch's KL(N(m, s^2) || N(0, 1)) against 1/2 (m^2 + s^2 - 1 - log s^2), at several points."""
    with float64():
        means, sds = t64([p[0] for p in STANDARD_POINTS]), t64([p[1] for p in STANDARD_POINTS])
        torch_kl = kl_divergence(Normal(means, sds), Normal(torch.zeros_like(means), torch.ones_like(sds)))
        formula = [_at(standard_kl_closed_form(variant), {m: mv, s: sv}) for mv, sv in STANDARD_POINTS]
        return exact(torch_kl, t64(formula))


register(
    Identity(
        id="gaussian-kl-closed-form",
        chapter=CHAPTER,
        label="gaussian-kl-closed-form",
        statement=r"\mathrm{KL}\big(\mathcal N(m, s^2)\,\Vert\,\mathcal N(0, 1)\big)"
        r" = \tfrac12\big(m^2 + s^2 - 1 - \log s^2\big)",
        symbolic=sym_standard_kl,
        numeric=num_standard_kl,
        wrong=("log-s-not-squared",),
        summary="AEVB App. B: the Gaussian KL to a standard Normal prior, the 'KL term' of VAE code",
    )
)


def kl_mc_samples(variant=None, draws=MC_DRAWS, seed=41):
    """Per-draw log q(z) - log p(z) from the chapter-1 traces (variant ``log-prior-alone``: -log p(z))."""
    with float64():
        t = particle_terms(C.model, C.make_guide(), C.data(), particles=draws, vectorize=True, seed=seed)
        return -t["log_prior"] if variant == "log-prior-alone" else t["kl_mc"]


def num_kl_expectation(variant=None) -> Numeric:
    """The mean of the per-draw Monte Carlo KL against torch's closed form, within 5 standard errors."""
    return monte_carlo(kl_mc_samples(variant), analytic_kl())


register(
    Identity(
        id="kl-as-expectation",
        chapter=CHAPTER,
        label="kl-as-expectation",
        statement=r"\mathrm{KL}\big(q_\lambda(z)\,\Vert\,p(z)\big)"
        r" = \mathbb E_{q_\lambda(z)}\big[\log q_\lambda(z) - \log p(z)\big]",
        numeric=num_kl_expectation,
        wrong=("log-prior-alone",),
        summary="the guide's log q and the prior's log p make the KL only together and only on average",
    )
)


def estimators_same_draw(seed=51, particles=PARTICLES):
    """-loss of both ELBO classes and the terms of the same draws, on one seeded stream each."""
    with float64():
        x, guide = C.data(), C.make_guide()
        losses = {}
        for name, cls in (("A", Trace_ELBO), ("B", TraceMeanField_ELBO)):
            elbo = cls(num_particles=particles, vectorize_particles=False, max_plate_nesting=1)
            with seeded(seed):
                losses[name] = elbo.loss(C.model, guide, x)
        t = particle_terms(C.model, guide, x, particles=particles, vectorize=False, seed=seed)
        return losses, t


def num_estimator_a(variant=None) -> Numeric:
    """-Trace_ELBO(S).loss against mean(reconstruction) - mean(kl_mc) on the same draws.

    Variant ``closed-form-kl``: the closed-form KL in place of the sampled one -- what
    Trace_ELBO does *not* do.
    """
    losses, t = estimators_same_draw()
    kl = analytic_kl() if variant == "closed-form-kl" else float(t["kl_mc"].mean())
    return exact(-losses["A"], float(t["reconstruction"].mean()) - kl)


register(
    Identity(
        id="trace-elbo-estimator-a",
        chapter=CHAPTER,
        label="trace-elbo-estimator-a",
        statement=r"\begin{aligned}\widetilde{\mathcal L}^A &= -\texttt{Trace\_ELBO(num\_particles=S).loss} \\"
        r"&= \frac1S\sum_{k=1}^S \log p(x \mid z^{(k)})"
        r" - \frac1S\sum_{k=1}^S \big[\log q_\lambda(z^{(k)}) - \log p(z^{(k)})\big]\end{aligned}",
        numeric=num_estimator_a,
        wrong=("closed-form-kl",),
        summary="bookkeeping: Trace_ELBO is AEVB's estimator A (eq. 6) -- observed sites in the reconstruction,"
        " latent model and guide sites in a sampled KL, averaged with 1/S; no closed-form KL",
    )
)


def num_estimator_b(variant=None) -> Numeric:
    """-TraceMeanField_ELBO(S).loss against mean(reconstruction) - KL_torch(q || p) on the same draws.

    Variant ``sampled-kl``: the sampled KL in place of the closed form.
    """
    losses, t = estimators_same_draw()
    kl = float(t["kl_mc"].mean()) if variant == "sampled-kl" else analytic_kl()
    return exact(-losses["B"], float(t["reconstruction"].mean()) - kl)


register(
    Identity(
        id="trace-mean-field-estimator-b",
        chapter=CHAPTER,
        label="trace-mean-field-estimator-b",
        statement=r"\begin{aligned}\widetilde{\mathcal L}^B &= -\texttt{TraceMeanField\_ELBO(num\_particles=S).loss} \\"
        r"&= \frac1S\sum_{k=1}^S \log p(x \mid z^{(k)}) - \mathrm{KL}\big(q_\lambda(z)\,\Vert\,p(z)\big)\end{aligned}",
        numeric=num_estimator_b,
        wrong=("sampled-kl",),
        summary="TraceMeanField_ELBO is AEVB's estimator B (eq. 7): the reconstruction sampled, the KL in closed form",
    )
)


# ------------------------------------------------------ the TraceMeanField_ELBO source lines
TMF = "pyro.infer.trace_mean_field_elbo.TraceMeanField_ELBO"
#: the lines of TraceMeanField_ELBO this chapter's text relies on
RELIED_ON: tuple[SourceLine, ...] = (
    SourceLine(
        f"{TMF}.loss",
        "loss_particle, _ = self._differentiable_loss_particle(",
        "each particle's value comes from `_differentiable_loss_particle` ...",
    ),
    SourceLine(
        f"{TMF}.loss",
        "loss = loss + loss_particle / self.num_particles",
        r"... averaged over the $S$ particles, as in `Trace_ELBO`",
    ),
    SourceLine(
        f"{TMF}._differentiable_loss_particle", 'if model_site["is_observed"]:', "observed sites of the model ..."
    ),
    SourceLine(
        f"{TMF}._differentiable_loss_particle",
        'elbo_particle = elbo_particle + model_site["log_prob_sum"]',
        r"... add $\log p(x \mid z^{(k)})$ at the sampled $z^{(k)}$: the reconstruction",
    ),
    SourceLine(
        f"{TMF}._differentiable_loss_particle",
        'kl_qp = kl_divergence(guide_site["fn"], model_site["fn"])',
        r"a latent site: torch's closed-form $\mathrm{KL}(q \,\Vert\, p)$ of the two distributions,"
        " not the sampled values",
    ),
    SourceLine(
        f"{TMF}._differentiable_loss_particle",
        "elbo_particle = elbo_particle - kl_qp_sum",
        r"is subtracted: $-\mathrm{KL}$",
    ),
    SourceLine(
        f"{TMF}._differentiable_loss_particle",
        "except NotImplementedError:",
        "where torch registers no KL for the pair ...",
    ),
    SourceLine(
        f"{TMF}._differentiable_loss_particle",
        '+ model_site["log_prob_sum"]',
        r"... it falls back to the sampled $\log p(z^{(k)})$ ...",
    ),
    SourceLine(
        f"{TMF}._differentiable_loss_particle",
        "- entropy_term.sum()",
        r"... minus the guide's $\log q(z^{(k)})$ (its `entropy_term`): estimator A for that site",
    ),
)
ABSENT_LINE = SourceLine(
    "pyro.infer.trace_elbo.Trace_ELBO._differentiable_loss_particle",
    'kl_qp = kl_divergence(guide_site["fn"], model_site["fn"])',
    "a closed-form KL in Trace_ELBO: it has none",
)


def num_mean_field_source(variant=None) -> Numeric:
    """How many relied-on lines of TraceMeanField_ELBO are in the installed source.

    Variant ``kl-in-trace-elbo`` also looks for the KL line in Trace_ELBO, where it is not.
    """
    return count_found(RELIED_ON + ((ABSENT_LINE,) if variant == "kl-in-trace-elbo" else ()))


register(
    Identity(
        id="trace-mean-field-source-drift",
        kind="source",
        chapter=CHAPTER,
        label=None,
        statement=r"\#\{\text{lines of TraceMeanField\_ELBO quoted by the text found in the installed Pyro}\}"
        r" = \#\{\text{lines quoted}\}",
        numeric=num_mean_field_source,
        wrong=("kl-in-trace-elbo",),
        summary="every line of TraceMeanField_ELBO this chapter relies on is in the installed source",
    )
)


#: numbers of particles, repeats and guides (mean, sd) of the chapter's plot of the two estimators
SPREAD_PARTICLES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SPREAD_REPEATS = 200
GUIDES = {"chapter-1 guide": (C.GUIDE_MEAN, C.GUIDE_SD), "narrow guide": (0.6, 0.1)}


def spread_by_particles(mean, sd, particles=SPREAD_PARTICLES, repeats=SPREAD_REPEATS, seed=61) -> dict:
    """For each S: the standard deviation over ``repeats`` runs of both estimators.

    "A" is -Trace_ELBO(num_particles=S).loss, "B" is -TraceMeanField_ELBO(num_particles=S).loss.
    """
    out = {"S": list(particles), "A": [], "B": [], "mean A": [], "mean B": []}
    for i, S in enumerate(particles):
        draws = elbo_losses(S, repeats, seed=seed + i, mean=mean, sd=sd)
        for k in ("A", "B"):
            out[k].append(float(draws[k].std(unbiased=True)))
            out["mean " + k].append(float(draws[k].mean()))
    return out


def standard_error(x: torch.Tensor) -> float:
    """Standard error of the mean of a 1-D sample."""
    return float(x.std(unbiased=True)) / len(x) ** 0.5


# ------------------------------------------- the variance of A and B: values and gradients, exact
# One particle, a reparameterized draw z = m + s*eps, eps ~ N(0, 1). On the conjugate model both
# integrands and both gradients are polynomials in eps, so their variances are exact (moments of
# a standard Normal); :func:`estimators_match_pyro` ties the polynomials to Pyro's own values and
# gradients on the same draws before any variance is reported.
_EPS_MOMENTS = {0: 1, 1: 0, 2: 1, 3: 0, 4: 3, 5: 0, 6: 15, 7: 0, 8: 105}


def _normal_variance(expr, values=None) -> float:
    """Var_eps[expr] for a polynomial in eps, eps ~ N(0, 1), from the moments of a standard Normal.

    ``values`` are substituted first (then the moments are summed in float64).
    """
    poly = sp.Poly(sp.expand(expr if values is None else expr.subs(values)), eps)
    coef = {k: float(c) for (k,), c in poly.terms()}
    mean = sum(c * _EPS_MOMENTS[k] for k, c in coef.items())
    second = sum(ci * cj * _EPS_MOMENTS[i + j] for i, ci in coef.items() for j, cj in coef.items())
    return second - mean**2


@cache
def estimator_integrands():
    """The one-particle integrands of A and B as polynomials in eps (z = m + s*eps)."""
    zr = m + s * eps
    a = (C.log_joint_symbolic() - C.log_normal(z, m, s)).subs(z, zr)
    b = C.log_likelihood_symbolic().subs(z, zr) - gaussian_kl_closed_form()
    return {"A": sp.expand(a), "B": sp.expand(b)}


@cache
def estimator_gradients():
    """d/dm and d/ds of each integrand at fixed eps: the reparameterization gradients Pyro computes."""
    return {k: (sp.diff(f, m), sp.diff(f, s)) for k, f in estimator_integrands().items()}


def _values(guide, x=None):
    x = C.data() if x is None else x
    vals = {mu0: C.PRIOR_MEAN, s0: C.PRIOR_SD, C.sigma: C.NOISE_SD, C.T1: float(x.sum()), C.T2: float((x**2).sum())}
    vals.update({C.N: len(x), m: guide[0], s: guide[1]})
    return vals


def posterior_guide() -> tuple[float, float]:
    post = C.posterior(C.data())
    return float(post.loc), float(post.scale)


@cache
def variance_table() -> dict:
    """Exact per-draw variances at the three guides of the chapter (chapter-1, narrow, the posterior).

    For each guide and estimator: ``value`` = Var of the one-particle ELBO estimate, ``sd`` its square
    root, ``grad`` = Var(d/dm) + Var(d/ds) of the one-particle gradient.
    """
    guides = {**GUIDES, "posterior": posterior_guide()}
    ints, grads = estimator_integrands(), estimator_gradients()
    out = {}
    for name, g in guides.items():
        vals = _values(g)
        row = {}
        for k in ("A", "B"):
            value = _normal_variance(ints[k], vals)
            grad = sum(_normal_variance(d, vals) for d in grads[k])
            row[k] = {"value": value, "sd": value**0.5, "grad": grad}
        out[name] = row
    return out


def _param_guide(mt, st):
    def guide(x, *args, **kwargs):
        import pyro
        import pyro.distributions as dist

        pyro.sample("z", dist.Normal(mt, st))

    return guide


def estimators_match_pyro(guide=(C.GUIDE_MEAN, C.GUIDE_SD), seeds=range(5), variant=None) -> float:
    """Largest relative difference between Pyro and the eps-polynomials, on the same draws.

    For each seed: -loss and its gradient in (m, s) from ``Trace_ELBO`` (A) and
    ``TraceMeanField_ELBO`` (B), against :func:`estimator_integrands` and
    :func:`estimator_gradients` at eps = (z - m) / s of the draw. Variant ``score-term-dropped``
    uses the sticking-the-landing gradient for A (the score term of log q left out), which is not
    what Trace_ELBO computes.
    """
    with float64():
        x = C.data()
        ints, grads = estimator_integrands(), estimator_gradients()
        if variant == "score-term-dropped":
            grads = dict(grads, A=stl_gradient())
        worst = 0.0
        for seed in seeds:
            for k, cls in (("A", Trace_ELBO), ("B", TraceMeanField_ELBO)):
                mt = t64(guide[0]).requires_grad_(True)
                st = t64(guide[1]).requires_grad_(True)
                g = _param_guide(mt, st)
                with seeded(seed):
                    zv = float(C.drawn_z(g, x, seed=seed))
                with seeded(seed):
                    loss = cls(max_plate_nesting=1).differentiable_loss(C.model, g, x)
                dm, ds = torch.autograd.grad(-loss, [mt, st])
                vals = {**_values(guide, x), eps: (zv - guide[0]) / guide[1]}
                pairs = [(float(-loss.detach()), ints[k]), (float(dm), grads[k][0]), (float(ds), grads[k][1])]
                for got, expr in pairs:
                    want = float(expr.subs(vals))
                    worst = max(worst, abs(got - want) / max(1.0, abs(want)))
        return worst


@cache
def stl_gradient():
    """Sticking the landing: the gradient of A with log q's parameters held fixed (only the path through z)."""
    mb, sb = sp.symbols("m_bot s_bot", real=True)
    zr = m + s * eps
    f = (C.log_joint_symbolic() - C.log_normal(z, mb, sb)).subs(z, zr)
    return tuple(sp.expand(sp.diff(f, v).subs({mb: m, sb: s})) for v in (m, s))


def stl_gradient_variance(guide) -> float:
    """Var(d/dm) + Var(d/ds) of the sticking-the-landing gradient of A at ``guide``, exact."""
    vals = _values(guide)
    return sum(_normal_variance(d, vals) for d in stl_gradient())


def num_stl_at_posterior(variant=None) -> Numeric:
    """Sticking the landing: the exact gradient variance is zero at the posterior.

    Variants: ``chapter-1-guide`` (the same variance at the chapter-1 guide, where it is positive) and
    ``trace-elbo-gradient`` (A's full gradient, score term kept, at the posterior, also positive).
    """
    if variant == "trace-elbo-gradient":
        value = _checked_table()["posterior"]["A"]["grad"]
        what = "exact Var(d/dm) + Var(d/ds) of A's one-particle gradient (score term kept) at the posterior"
    else:
        guide = GUIDES["chapter-1 guide"] if variant == "chapter-1-guide" else posterior_guide()
        where = "chapter-1 guide" if variant == "chapter-1-guide" else "posterior"
        value = stl_gradient_variance(guide)
        if variant is None and not stl_gradient_variance(GUIDES["chapter-1 guide"]) > 1e-6:
            raise IdentityFailed("the sticking-the-landing variance is not positive at the chapter-1 guide")
        what = f"exact Var(d/dm) + Var(d/ds) of the sticking-the-landing gradient at the {where}"
    return exact(value, 0.0, atol=1e-12, lhs_is=what, rhs_is="0")


def gradient_variance_ratios() -> dict:
    """Var(grad B) / Var(grad A) of one particle at each of the three guides (exact)."""
    return {name: row["B"]["grad"] / row["A"]["grad"] for name, row in _checked_table().items()}


@cache
def _checked_table():
    bad = estimators_match_pyro()
    if bad > 1e-9:
        raise IdentityFailed(f"Pyro's values/gradients differ from the eps-polynomials by {bad:.3g} (relative)")
    return variance_table()


def num_value_spread_narrow(variant=None) -> Numeric:
    """Narrow guide: estimator B's one-particle value has the smaller spread (exact sds).

    Variant ``chapter-1-guide``: the same claim at the chapter-1 guide, where it is false.
    """
    name = "chapter-1 guide" if variant == "chapter-1-guide" else "narrow guide"
    row = _checked_table()[name]
    return inequality(
        row["B"]["sd"],
        row["A"]["sd"],
        "<",
        lhs_is=f"sd of B's one-particle ELBO estimate at the {name}, exact",
        rhs_is=f"sd of A's one-particle ELBO estimate at the {name}, exact",
    )


def num_value_spread_wide(variant=None) -> Numeric:
    """Chapter-1 guide: estimator A's one-particle value has the smaller spread (exact sds).

    Variant ``narrow-guide``: the same claim at the narrow guide, where it is false.
    """
    name = "narrow guide" if variant == "narrow-guide" else "chapter-1 guide"
    row = _checked_table()[name]
    return inequality(
        row["A"]["sd"],
        row["B"]["sd"],
        "<",
        lhs_is=f"sd of A's one-particle ELBO estimate at the {name}, exact",
        rhs_is=f"sd of B's one-particle ELBO estimate at the {name}, exact",
    )


def num_gradient_variance(variant=None) -> Numeric:
    """At each of the three guides, B's one-particle gradient has the smaller variance (exact).

    Reported: the largest ratio Var(grad B) / Var(grad A) over the guides, against 1. Variant
    ``loss-values``: the same ratio for the loss values, the ranking the gradient does *not* follow.
    """
    key = "value" if variant == "loss-values" else "grad"
    table = _checked_table()
    ratio = max(row["B"][key] / row["A"][key] for name, row in table.items() if row["A"][key] > 0)
    what = "value" if key == "value" else "Var(d/dm) + Var(d/ds) of the gradient"
    return inequality(
        ratio,
        1.0,
        "<",
        lhs_is=f"largest ratio B / A of the one-particle {what} variance"
        " over the chapter-1, narrow and posterior guides",
        rhs_is="1",
    )


register(
    Identity(
        id="value-spread-narrow-guide",
        kind="claim",
        chapter=CHAPTER,
        label=None,
        statement=r"\operatorname{sd}\widetilde{\mathcal L}^B_1 < \operatorname{sd}\widetilde{\mathcal L}^A_1"
        r"\ \text{(narrow guide, one particle)}",
        numeric=num_value_spread_narrow,
        wrong=("chapter-1-guide",),
        summary="with the narrow guide, B's ELBO estimate is less spread than A's (exact sds)",
    )
)
register(
    Identity(
        id="value-spread-chapter-1-guide",
        kind="claim",
        chapter=CHAPTER,
        label=None,
        statement=r"\operatorname{sd}\widetilde{\mathcal L}^A_1 < \operatorname{sd}\widetilde{\mathcal L}^B_1"
        r"\ \text{(chapter 1's guide, one particle)}",
        numeric=num_value_spread_wide,
        wrong=("narrow-guide",),
        summary="with chapter 1's guide, A's ELBO estimate is less spread than B's (exact sds)",
    )
)
register(
    Identity(
        id="gradient-variance-a-and-b",
        kind="claim",
        chapter=CHAPTER,
        label=None,
        statement=r"\operatorname{Var}\nabla_{m,s}\widetilde{\mathcal L}^B_1"
        r" < \operatorname{Var}\nabla_{m,s}\widetilde{\mathcal L}^A_1"
        r"\ \text{(chapter 1's, narrow and posterior guides)}",
        numeric=num_gradient_variance,
        wrong=("loss-values",),
        summary="the gradient of B is less noisy than A's at all three guides, although the values rank otherwise",
    )
)

register(
    Identity(
        id="stl-variance-zero-at-posterior",
        kind="identity",
        chapter=CHAPTER,
        label=None,
        statement=r"\operatorname{Var}\nabla^{\mathrm{STL}}_{m,s}\widetilde{\mathcal L}^A_1 = 0"
        r"\ \text{at the posterior}\ (> 0\ \text{at chapter 1's guide})",
        numeric=num_stl_at_posterior,
        wrong=("chapter-1-guide", "trace-elbo-gradient"),
        summary="the sticking-the-landing gradient has exactly zero variance at the posterior; at chapter 1's"
        " guide, and for Trace_ELBO's own gradient at the posterior, it does not",
    )
)


# ------------------------------------------ TraceMeanField_ELBO with two latent layers
def two_layer_model(x):
    """z1 ~ N(0, 1), z2 | z1 ~ N(z1, 1), x_n | z2 ~ N(z2, sigma^2): two latent layers."""
    import pyro
    import pyro.distributions as dist

    z1 = pyro.sample("z1", dist.Normal(t64(0.0), t64(1.0)))
    z2 = pyro.sample("z2", dist.Normal(z1, t64(1.0)))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(z2, t64(C.NOISE_SD)), obs=x)


#: the structured guide's numbers: q(z1) = N(a, b^2), q(z2 | z1) = N(c + d z1, e^2)
TWO_LAYER_GUIDE = (0.4, 0.5, 0.2, 0.5, 0.3)


def two_layer_guide(x):
    """A top-down structured guide, q(z1) q(z2 | z1): not mean-field, but within Pyro's condition."""
    import pyro
    import pyro.distributions as dist

    a, b, c, d, e = TWO_LAYER_GUIDE
    z1 = pyro.sample("z1", dist.Normal(t64(a), t64(b)))
    pyro.sample("z2", dist.Normal(c + d * z1, t64(e)))


def num_two_layer_kl(variant=None, seed=81) -> Numeric:
    """-TraceMeanField_ELBO().loss on one draw against log p(x | z2) - KL(q(z1) || p(z1))
    - KL(q(z2 | z1) || p(z2 | z1)) at the sampled z1, all by hand from the drawn values.

    Variant ``exact-joint-kl``: the exact KL(q(z1, z2) || p(z1, z2)) in place of the sampled-parent
    terms, the reading that holds for one latent layer only.
    """
    with float64():
        x = C.data()
        with seeded(seed):
            loss = TraceMeanField_ELBO(max_plate_nesting=1).loss(two_layer_model, two_layer_guide, x)
        with seeded(seed):
            from pyro import poutine

            tr = poutine.trace(two_layer_guide).get_trace(x)
        z1v, z2v = float(tr.nodes["z1"]["value"]), float(tr.nodes["z2"]["value"])
        a, b, c, d, e = TWO_LAYER_GUIDE
        recon = sum(C.log_normal_by_hand(xv, z2v, C.NOISE_SD) for xv in x.tolist())
        kl1 = float(kl_divergence(Normal(t64(a), t64(b)), Normal(t64(0.0), t64(1.0))))
        if variant == "exact-joint-kl":
            kl2 = two_layer_expected_kl2()
        else:
            kl2 = float(kl_divergence(Normal(t64(c + d * z1v), t64(e)), Normal(t64(z1v), t64(1.0))))
        return exact(
            -loss,
            recon - kl1 - kl2,
            lhs_is="-TraceMeanField_ELBO().loss on one draw of the two-layer model",
            rhs_is="log p(x | z2) - KL(q(z1) || p(z1)) - KL(q(z2 | z1) || p(z2 | z1)) at the drawn z1, z2",
        )


def two_layer_expected_kl2() -> float:
    """E_{q(z1)} KL(q(z2 | z1) || p(z2 | z1)), exact: the second layer's share of the joint KL (chain rule)."""
    a, b, c, d, e = TWO_LAYER_GUIDE
    # KL(N(c + d z1, e^2) || N(z1, 1)) = -log e + (e^2 + (c + (d - 1) z1)^2) / 2 - 1/2, averaged over z1 ~ N(a, b^2)
    mean_sq = (c + (d - 1) * a) ** 2 + ((d - 1) * b) ** 2
    return -float(torch.log(t64(e))) + (e**2 + mean_sq) / 2 - 0.5


register(
    Identity(
        id="mean-field-kl-at-sampled-parents",
        chapter=CHAPTER,
        label="mean-field-kl-at-sampled-parents",
        statement=r"\begin{aligned}-\texttt{TraceMeanField\_ELBO().loss} &= \log p(x \mid z_2)"
        r"\\ &\quad - \mathrm{KL}\big(q(z_1)\,\Vert\,p(z_1)\big)\\"
        r" &\quad - \mathrm{KL}\big(q(z_2 \mid z_1)\,\Vert\,p(z_2 \mid z_1)\big)\Big|_{z_1 \sim q}\end{aligned}",
        numeric=num_two_layer_kl,
        wrong=("exact-joint-kl",),
        summary="with two latent layers, TraceMeanField_ELBO's 'closed-form' KL is taken at the sampled parent:"
        " a random term, exact only in expectation",
    )
)


def bottom_up_guide(x):
    """q(z2) q(z1 | z2): z1 depends on z2 in the guide, while z2's model parent is z1 -- outside the condition."""
    import pyro
    import pyro.distributions as dist

    z2 = pyro.sample("z2", dist.Normal(t64(0.5), t64(0.3)))
    pyro.sample("z1", dist.Normal(0.5 * z2, t64(0.5)))


def mean_field_condition_text() -> str:
    """The paragraph of the installed TraceMeanField_ELBO docstring that states the precise condition."""
    import inspect

    from pyro.infer import TraceMeanField_ELBO as TMF

    doc = inspect.getdoc(TMF)
    start = doc.index("The mean field condition is a sufficient")
    return " ".join(doc[start:].split("\n\n")[0].split())


def mean_field_warnings(guide_fn, seed=0) -> list[str]:
    """The first line of every warning TraceMeanField_ELBO gives on the two-layer model with ``guide_fn``."""
    import warnings

    import pyro

    with float64(), warnings.catch_warnings(record=True) as caught, pyro.validation_enabled(True):
        warnings.simplefilter("always")
        with seeded(seed):
            TraceMeanField_ELBO(max_plate_nesting=1).loss(two_layer_model, guide_fn, C.data())
    return [str(w.message).splitlines()[0] for w in caught]


def two_layer_kl_terms(draws=4, seed=90) -> list[float]:
    """KL(q(z2 | z1) || p(z2 | z1)) at the sampled z1 of a few draws: a random term, not one number."""
    from pyro import poutine

    a, b, c, d, e = TWO_LAYER_GUIDE
    out = []
    with float64():
        for i in range(draws):
            with seeded(seed + i):
                z1v = float(poutine.trace(two_layer_guide).get_trace(C.data()).nodes["z1"]["value"])
            out.append(float(kl_divergence(Normal(t64(c + d * z1v), t64(e)), Normal(t64(z1v), t64(1.0)))))
    return out


__all__ = [
    "CHAPTER",
    "kl_by_integration",
    "gaussian_kl_closed_form",
    "standard_kl_closed_form",
    "expected_log_likelihood_by_integration",
    "expected_log_likelihood_grouped",
    "expected_log_prior_by_integration",
    "particle_terms",
    "analytic_kl",
    "expanded",
    "elbo_losses",
    "kl_mc_samples",
    "estimators_same_draw",
    "log_q_at_reparameterized_draw",
    "log_q_variance",
    "log_q_variance_measured",
    "standard_error",
    "spread_by_particles",
]
