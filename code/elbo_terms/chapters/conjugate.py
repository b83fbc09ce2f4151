r"""Chapter ``elbo``: BBVI eq. (1) on the conjugate Normal model.

Model and guide::

    z ~ N(mu0, s0^2),   x_n | z ~ N(z, sigma^2)  (n = 1..N),   q(z) = N(m, s^2).

Everything about the data enters through ``T_1 = sum_n x_n`` and ``T_2 = sum_n x_n^2``; the
posterior is ``N(mu_N, s_N^2)`` (book notation: N data points, n their index).
SymPy derives the evidence by integrating ``z`` out, the ELBO by integrating against
``q``; the numeric checks run the same quantities through Pyro in float64.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import sympy as sp
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from .._util import float64, seeded, t64
from ..build.identity import Identity, exact, monte_carlo, register

CHAPTER = "elbo"

# ---------------------------------------------------------------- the setting
#: the numbers of the chapter's running example
PRIOR_MEAN, PRIOR_SD, NOISE_SD = 0.0, 1.0, 0.5
GUIDE_MEAN, GUIDE_SD = 0.3, 0.4
N_DATA, DATA_SEED = 5, 0


def data() -> torch.Tensor:
    """Five float64 observations drawn once, with a fixed seed, from z = 0.8."""
    with seeded(DATA_SEED):
        return 0.8 + NOISE_SD * torch.randn(N_DATA, dtype=torch.float64)


def model(x, mu0=PRIOR_MEAN, s0=PRIOR_SD, sigma=NOISE_SD):
    """p(x, z): one latent site ``z``, one observed site ``x`` inside a plate."""
    z = pyro.sample("z", dist.Normal(t64(mu0), t64(s0)))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(z, t64(sigma)), obs=x)


def make_guide(m=GUIDE_MEAN, s=GUIDE_SD):
    """q(z) = N(m, s^2), with the model's signature."""

    def guide(x, mu0=PRIOR_MEAN, s0=PRIOR_SD, sigma=NOISE_SD):
        pyro.sample("z", dist.Normal(t64(m), t64(s)))

    return guide


def posterior(x, mu0=PRIOR_MEAN, s0=PRIOR_SD, sigma=NOISE_SD) -> dist.Normal:
    """p(z | x) = N(mu_N, s_N^2), 1/s_N^2 = 1/s0^2 + N/sigma^2 (:func:`precision_symbolic`)."""
    precision = 1 / s0**2 + len(x) / sigma**2
    mu_post = (mu0 / s0**2 + float(x.sum()) / sigma**2) / precision
    return dist.Normal(t64(mu_post), t64(precision**-0.5))


def marginal(x, mu0=PRIOR_MEAN, s0=PRIOR_SD, sigma=NOISE_SD) -> dist.MultivariateNormal:
    """The evidence as a distribution: x ~ N(mu0 1, sigma^2 I + s0^2 1 1^T)."""
    n = len(x)
    cov = sigma**2 * torch.eye(n, dtype=torch.float64) + s0**2 * torch.ones(n, n, dtype=torch.float64)
    return dist.MultivariateNormal(torch.full((n,), float(mu0), dtype=torch.float64), cov)


# ------------------------------------------------------------------- SymPy side
z, m, mu0 = sp.symbols("z m mu_0", real=True)
s, s0, sigma = sp.symbols("s s_0 sigma", positive=True)
N = sp.Symbol("N", positive=True, integer=True)
T1, T2 = sp.symbols("T_1 T_2", real=True)
#: display-only symbols of the posterior's mean and standard deviation
muN, sN = sp.Symbol("mu_N", real=True), sp.Symbol("s_N", positive=True)


def log_normal(v, mean, sd):
    """log N(v; mean, sd^2) as a SymPy expression."""
    return -sp.log(2 * sp.pi * sd**2) / 2 - (v - mean) ** 2 / (2 * sd**2)


def log_likelihood_symbolic():
    """sum_n log N(x_n; z, sigma^2), written with T_1 and T_2."""
    return -N * sp.log(2 * sp.pi * sigma**2) / 2 - (T2 - 2 * z * T1 + N * z**2) / (2 * sigma**2)


def log_joint_symbolic():
    """log p(x, z) = log p(x | z) + log p(z)."""
    return log_likelihood_symbolic() + log_normal(z, mu0, s0)


def log_evidence_by_integration():
    """log p(x) = log of the integral of p(x, z) over z, done by SymPy."""
    integral = sp.integrate(sp.exp(sp.expand(log_joint_symbolic())), (z, -sp.oo, sp.oo), conds="none")
    return sp.expand_log(sp.log(integral), force=True)


def precision_symbolic(variant=None):
    """1/s_N^2 = 1/s0^2 + N/sigma^2, the posterior precision (variant ``forgot-n``: 1/s0^2 + 1/sigma^2)."""
    return 1 / s0**2 + (1 if variant == "forgot-n" else N) / sigma**2


def posterior_mean_symbolic(variant=None):
    return (mu0 / s0**2 + T1 / sigma**2) / precision_symbolic(variant)


def log_evidence_closed_form(variant=None):
    """The closed form the chapter displays (variant ``missing-log-det`` drops -1/2 log(s0^2 tau))."""
    tau, mu_n = precision_symbolic(), posterior_mean_symbolic()
    expr = -N * sp.log(2 * sp.pi * sigma**2) / 2 - T2 / (2 * sigma**2) - mu0**2 / (2 * s0**2) + tau * mu_n**2 / 2
    if variant != "missing-log-det":
        expr += -sp.log(s0**2 * tau) / 2
    return expr


def elbo_by_integration():
    """L(m, s) = E_q[log p(x, z) - log q(z)], the integral against q done by SymPy."""
    log_q = log_normal(z, m, s)
    integrand = sp.expand((log_joint_symbolic() - log_q) * sp.exp(log_q))
    return sp.integrate(integrand, (z, -sp.oo, sp.oo), conds="none")


def elbo_closed_form(variant=None):
    """Expected log-likelihood + expected log-prior + entropy of q (variant ``missing-entropy``)."""
    exp_loglik = -N * sp.log(2 * sp.pi * sigma**2) / 2 - (T2 - 2 * m * T1 + N * (m**2 + s**2)) / (2 * sigma**2)
    exp_logprior = -sp.log(2 * sp.pi * s0**2) / 2 - ((m - mu0) ** 2 + s**2) / (2 * s0**2)
    entropy = sp.log(2 * sp.pi * sp.E * s**2) / 2
    return exp_loglik + exp_logprior + (0 if variant == "missing-entropy" else entropy)


def kl_to_posterior_closed_form():
    """KL(N(m, s^2) || N(mu_n, 1/tau)) for two Gaussians."""
    tau, mu_n = precision_symbolic(), posterior_mean_symbolic()
    return -sp.log(s * sp.sqrt(tau)) + tau * (s**2 + (m - mu_n) ** 2) / 2 - sp.Rational(1, 2)


# ----------------------------------------------------------- numeric helpers
def _stats(x):
    return {T1: float(x.sum()), T2: float((x**2).sum()), N: len(x)}


def _subs(expr, x, extra=None):
    """Evaluate a SymPy expression of the chapter at its numbers (``extra`` overrides)."""
    vals = {mu0: PRIOR_MEAN, s0: PRIOR_SD, sigma: NOISE_SD, m: GUIDE_MEAN, s: GUIDE_SD, **_stats(x)}
    vals.update(extra or {})
    return float(sp.N(expr.subs(vals), 30))


def trace_log_prob_sums(model_fn, guide_fn, *args, seed=0):
    """Run the guide, replay its sample into the model: the two log-prob sums of one draw."""
    with seeded(seed):
        guide_trace = poutine.trace(guide_fn).get_trace(*args)
        model_trace = poutine.trace(poutine.replay(model_fn, trace=guide_trace)).get_trace(*args)
    return float(model_trace.log_prob_sum()), float(guide_trace.log_prob_sum())


def trace_elbo_loss(model_fn, guide_fn, *args, seed=0, **elbo_kwargs):
    """``Trace_ELBO(**elbo_kwargs).loss`` on a private random stream seeded with ``seed``."""
    with seeded(seed):
        return Trace_ELBO(**elbo_kwargs).loss(model_fn, guide_fn, *args)


# ------------------------------------------------------------------ identities
EVIDENCE_STATEMENT = (
    r"\begin{aligned}\log p(x) = {} & -\tfrac{N}{2}\log(2\pi\sigma^2) - \tfrac12\log\tfrac{s_0^2}{s_N^2} \\"
    r" & - \tfrac{T_2}{2\sigma^2} - \tfrac{\mu_0^2}{2s_0^2} + \tfrac{\mu_N^2}{2 s_N^2}\end{aligned}"
)


def log_evidence_display():
    """The closed form (1.3) in the display symbols mu_N, s_N, as SymPy prints it."""
    return (
        -N * sp.log(2 * sp.pi * sigma**2) / 2
        - sp.log(s0**2 / sN**2) / 2
        - T2 / (2 * sigma**2)
        - mu0**2 / (2 * s0**2)
        + muN**2 / (2 * sN**2)
    )


def log_evidence_display_is_closed_form() -> bool:
    """SymPy: the display form, with mu_N and s_N substituted, minus the closed form simplifies to 0."""
    from ..build.identity import proves_zero

    values = {muN: posterior_mean_symbolic(), sN: 1 / sp.sqrt(precision_symbolic())}
    return proves_zero(log_evidence_display().subs(values) - log_evidence_closed_form())


def sym_evidence(variant=None):
    return log_evidence_by_integration() - log_evidence_closed_form(variant)


def num_evidence(variant=None):
    with float64():
        x = data()
        closed = _subs(log_evidence_closed_form(variant), x)
        return exact(closed, float(marginal(x).log_prob(x)))


register(
    Identity(
        id="evidence-closed-form",
        chapter=CHAPTER,
        label="evidence-closed-form",
        statement=EVIDENCE_STATEMENT,
        symbolic=sym_evidence,
        numeric=num_evidence,
        wrong=("missing-log-det",),
        summary="closed-form evidence of the conjugate model = its marginal likelihood",
    )
)


def sym_posterior(variant=None):
    tau = precision_symbolic(variant)
    return (
        log_joint_symbolic()
        - log_evidence_closed_form()
        - log_normal(z, posterior_mean_symbolic(variant), 1 / sp.sqrt(tau))
    )


def num_posterior(variant=None):
    """log p(x, z) - log p(x) against log N(z; mu_n, 1/tau), at a point z drawn from q."""
    with float64():
        x = data()
        with seeded(1):
            zval = dist.Normal(t64(GUIDE_MEAN), t64(GUIDE_SD)).sample()
        conditioned = poutine.condition(model, data={"z": zval})
        joint = float(poutine.trace(conditioned).get_trace(x).log_prob_sum())
        lhs = joint - float(marginal(x).log_prob(x))
        if variant == "forgot-n":
            tau = 1 / PRIOR_SD**2 + 1 / NOISE_SD**2
            mu_n = (PRIOR_MEAN / PRIOR_SD**2 + float(x.sum()) / NOISE_SD**2) / tau
            post = dist.Normal(t64(mu_n), t64(tau**-0.5))
        else:
            post = posterior(x)
        return exact(lhs, float(post.log_prob(zval)))


register(
    Identity(
        id="posterior-closed-form",
        chapter=CHAPTER,
        label="posterior-closed-form",
        statement=r"\begin{aligned}p(z \mid x) &= \frac{p(x, z)}{p(x)}"
        r" = \mathcal N\!\left(z;\ \mu_N,\ s_N^2\right), \\"
        r" \tfrac{1}{s_N^2} &= \tfrac{1}{s_0^2} + \tfrac{N}{\sigma^2},\quad"
        r" \mu_N = s_N^2\left(\tfrac{\mu_0}{s_0^2} + \tfrac{T_1}{\sigma^2}\right)\end{aligned}",
        symbolic=sym_posterior,
        numeric=num_posterior,
        wrong=("forgot-n",),
        summary="Bayes' rule on the conjugate model gives a Normal posterior",
    )
)


def sym_elbo(variant=None):
    return elbo_by_integration() - elbo_closed_form(variant)


#: Monte Carlo design of the ELBO check: ``B`` independent Trace_ELBO estimates, each
#: averaging ``M`` vectorized particles.
MC_BATCHES, MC_PARTICLES = 400, 250


def elbo_estimates(batches=MC_BATCHES, particles=MC_PARTICLES, seed=2):
    """``batches`` independent values of -Trace_ELBO(num_particles=particles).loss."""
    with float64():
        x = data()
        elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
        guide = make_guide()
        with seeded(seed):
            return torch.tensor([-elbo.loss(model, guide, x) for _ in range(batches)], dtype=torch.float64)


def num_elbo(variant=None):
    with float64():
        closed = _subs(elbo_closed_form(variant), data())
    return monte_carlo(elbo_estimates(), closed)


register(
    Identity(
        id="elbo-closed-form",
        chapter=CHAPTER,
        label="elbo-closed-form",
        statement=r"\mathcal L(m, s) = \mathbb E_q[\log p(x\mid z)] + \mathbb E_q[\log p(z)]"
        r" + \tfrac12\log(2\pi e s^2)",
        symbolic=sym_elbo,
        numeric=num_elbo,
        wrong=("missing-entropy",),
        summary="the ELBO of BBVI eq. (1), integrated in closed form; Trace_ELBO estimates it without bias",
    )
)


def sym_decomposition(variant=None):
    sign = -1 if variant == "flipped-kl-sign" else 1
    return log_evidence_closed_form() - (elbo_closed_form() + sign * kl_to_posterior_closed_form())


def num_decomposition(variant=None):
    """Three independent computations: torch's MVN evidence, the ELBO, torch's Gaussian KL."""
    with float64():
        x = data()
        elbo = _subs(elbo_closed_form(), x)
        q = dist.Normal(t64(GUIDE_MEAN), t64(GUIDE_SD))
        kl = float(torch.distributions.kl_divergence(q, posterior(x)))
        sign = -1 if variant == "flipped-kl-sign" else 1
        return exact(float(marginal(x).log_prob(x)), elbo + sign * kl)


register(
    Identity(
        id="evidence-decomposition",
        chapter=CHAPTER,
        label="evidence-decomposition",
        statement=r"\log p(x) = \mathcal L(q) + \mathrm{KL}\big(q(z)\,\|\,p(z\mid x)\big)",
        symbolic=sym_decomposition,
        numeric=num_decomposition,
        wrong=("flipped-kl-sign",),
        summary="the evidence is the ELBO plus the KL to the posterior, so the ELBO is a lower bound",
    )
)


def _trace_elbo_variant(log_joint, log_q, variant):
    if variant == "flipped-sign":
        return log_joint - log_q
    if variant == "missing-guide-term":
        return -log_joint
    return -(log_joint - log_q)


def log_normal_by_hand(v: float, mean: float, sd: float) -> float:
    """log N(v; mean, sd^2) = -log(2 pi sd^2)/2 - (v - mean)^2 / (2 sd^2), in plain Python floats."""
    return -math.log(2 * math.pi * sd**2) / 2 - (v - mean) ** 2 / (2 * sd**2)


def drawn_z(guide_fn, *args, seed=0) -> float:
    """The value of ``z`` that the guide draws on the stream seeded with ``seed`` (only the value is read)."""
    with seeded(seed):
        return float(poutine.trace(guide_fn).get_trace(*args).nodes["z"]["value"].detach())


def num_trace_elbo_from_traces(variant=None):
    """Trace_ELBO().loss against -(log p(x, z) - log q(z)) written out by hand at the same drawn z.

    The right-hand side does not use Pyro's log-densities: it takes the drawn value of ``z`` and
    adds up Normal log-densities in plain Python (:func:`log_normal_by_hand`).
    """
    with float64():
        x, guide = data(), make_guide()
        loss = trace_elbo_loss(model, guide, x, seed=3)
        zv = drawn_z(guide, x, seed=3)
        log_joint = log_normal_by_hand(zv, PRIOR_MEAN, PRIOR_SD) + sum(
            log_normal_by_hand(xv, zv, NOISE_SD) for xv in x.tolist()
        )
        log_q = log_normal_by_hand(zv, GUIDE_MEAN, GUIDE_SD)
        return exact(
            loss,
            _trace_elbo_variant(log_joint, log_q, variant),
            lhs_is="Trace_ELBO().loss on one draw",
            rhs_is="-(log p(x, z) - log q(z)) written out by hand at the drawn z",
        )


register(
    Identity(
        id="trace-elbo-single-draw",
        chapter=CHAPTER,
        label="trace-elbo-single-draw",
        statement=r"\texttt{Trace\_ELBO().loss} = -\big(\log p(x, z^{(1)}) - \log q(z^{(1)})\big),\ z^{(1)} \sim q",
        numeric=num_trace_elbo_from_traces,
        wrong=("flipped-sign", "missing-guide-term"),
        summary="Trace_ELBO's loss is minus one draw of the integrand of BBVI eq. (1)",
    )
)


def sym_elbo_at_posterior(variant=None):
    shift = sp.Rational(1, 10) if variant == "guide-off-posterior" else 0
    tau = precision_symbolic()
    log_q = log_normal(z, posterior_mean_symbolic() + shift, 1 / sp.sqrt(tau))
    return log_joint_symbolic() - log_q - log_evidence_closed_form()


#: how many draws the exact check at the posterior looks at
POSTERIOR_DRAWS = 20


def num_elbo_at_posterior(variant=None):
    """With q = p(z|x), every single-draw -loss equals log p(x): the draw farthest from log p(x) against it."""
    with float64():
        x = data()
        post = posterior(x)
        mean = float(post.loc) + (0.1 if variant == "guide-off-posterior" else 0.0)
        guide = make_guide(mean, float(post.scale))
        values = [-trace_elbo_loss(model, guide, x, seed=100 + i) for i in range(POSTERIOR_DRAWS)]
        evidence = float(marginal(x).log_prob(x))
        farthest = max(values, key=lambda v: abs(v - evidence))
        return exact(
            farthest,
            evidence,
            lhs_is=f"log p(x, z) - log q(z) (= -Trace_ELBO().loss) at the draw farthest from log p(x),"
            f" among {POSTERIOR_DRAWS} draws",
            rhs_is="log p(x), torch's multivariate Normal marginal",
        )


register(
    Identity(
        id="elbo-at-posterior",
        chapter=CHAPTER,
        label="elbo-at-posterior",
        statement=r"q(z) = p(z\mid x) \implies \log p(x, z) - \log q(z) = \log p(x)\ \text{for every } z",
        symbolic=sym_elbo_at_posterior,
        numeric=num_elbo_at_posterior,
        wrong=("guide-off-posterior",),
        summary="at the exact posterior the ELBO is tight, and its estimator has zero variance",
    )
)


def log_evidence(x=None) -> float:
    """log p(x) of the chapter's data, from torch's multivariate Normal."""
    with float64():
        x = data() if x is None else x
        return float(marginal(x).log_prob(x))


def elbo_value(mean=GUIDE_MEAN, sd=GUIDE_SD, x=None) -> float:
    """The closed-form ELBO of q = N(mean, sd^2) on the chapter's data."""
    with float64():
        x = data() if x is None else x
        return _subs(elbo_closed_form(), x, {m: mean, s: sd})
