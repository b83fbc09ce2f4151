"""The decompose chapter's example VAE and its identities: decompose's terms against Pyro's losses."""

from __future__ import annotations

import functools
import warnings

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import sympy as sp
import torch

from .._util import float64, seeded
from ..build.identity import Identity, exact, monte_carlo, register
from ..decomposition import ScaleMismatchWarning, decompose

CHAPTER = "decompose"

# ------------------------------------------------------------------ the chapter's example
#: the example VAE: latent dimension, hidden units, minibatch size, the seed of its weights
EXAMPLE_LATENT, EXAMPLE_HIDDEN, EXAMPLE_BATCH, EXAMPLE_SEED = 2, 32, 64, 0


@functools.cache
def _digits():
    from sklearn.datasets import load_digits

    return load_digits().data > 7


def example_data() -> torch.Tensor:
    """scikit-learn's bundled 8x8 digits, binarized (a pixel is 1 when its ink is above 7 of 16)."""
    return torch.as_tensor(_digits(), dtype=torch.get_default_dtype())


def example_vae(
    batch_size=EXAMPLE_BATCH,
    latent=EXAMPLE_LATENT,
    hidden=EXAMPLE_HIDDEN,
    seed=EXAMPLE_SEED,
):
    """A small VAE on the digits: ``(model, guide)``, weights drawn from ``seed``.

    Model: ``z_n ~ N(0, I)``, then ``x_n | z_n``: Bernoulli pixels with logits
    ``decoder(z_n)``. Guide: ``q(z_n | x_n) = N(m_n, diag(s_n^2))``, with
    ``(m_n, s_n)`` from the encoder. The data plate draws ``batch_size``
    digits, so Pyro scales the sites in it by N / B.
    """
    dtype = torch.get_default_dtype()
    with seeded(seed):
        encoder = torch.nn.Sequential(
            torch.nn.Linear(64, hidden),
            torch.nn.Softplus(),
            torch.nn.Linear(hidden, 2 * latent),
        ).to(dtype)
        decoder = torch.nn.Sequential(
            torch.nn.Linear(latent, hidden),
            torch.nn.Softplus(),
            torch.nn.Linear(hidden, 64),
        ).to(dtype)

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", len(x), subsample_size=batch_size) as idx:
            prior = dist.Normal(torch.zeros(latent), 1.0).to_event(1)
            z = pyro.sample("z", prior)
            likelihood = dist.Bernoulli(logits=decoder(z)).to_event(1)
            pyro.sample("x", likelihood, obs=x[idx])

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", len(x), subsample_size=batch_size) as idx:
            loc, raw_scale = encoder(x[idx]).chunk(2, dim=-1)
            scale = torch.nn.functional.softplus(raw_scale)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    return model, guide


# ------------------------------------------------------------------------------ identities
#: the statements, as the chapter displays them; loss_S is Trace_ELBO(num_particles=S).loss and
#: loss^MF_S TraceMeanField_ELBO's, on the draws z^(1), ..., z^(S) of the guide
STATEMENT_TRACE_ELBO = r"""\begin{aligned}
-\texttt{loss}_S
&= \underbrace{\tfrac1S\textstyle\sum_{k=1}^{S} \log p(x \mid z^{(k)})}
_{\texttt{reconstruction}}\\
&\quad - \underbrace{\tfrac1S\textstyle\sum_{k=1}^{S}
\big[\log q_\lambda(z^{(k)}) - \log p(z^{(k)})\big]}_{\texttt{kl\_mc}}
\end{aligned}"""
STATEMENT_MEAN_FIELD = r"""\begin{aligned}
-\texttt{loss}^{\mathrm{MF}}_S
&= \underbrace{\tfrac1S\textstyle\sum_{k=1}^{S} \log p(x \mid z^{(k)})}
_{\texttt{reconstruction}}
- \underbrace{\tfrac1S\textstyle\sum_{k=1}^{S} \sum_{j} \mathrm{KL}_j^{(k)}}
_{\texttt{kl\_mean\_field}},\\
\mathrm{KL}_j^{(k)} &= \begin{cases}
\mathrm{KL}\big(q_\lambda(z_j)\,\|\,p(z_j)\big)
& \text{if torch has it in closed form,}\\
\log q_\lambda(z_j^{(k)}) - \log p(z_j^{(k)}) & \text{otherwise}
\end{cases}
\end{aligned}"""
STATEMENT_SCALE_MISMATCH = r"""\begin{aligned}
\mathbb E_{q_\lambda(z)}\big[\beta_p \log p(z) - \beta_q \log q_\lambda(z)\big]
&= -\beta_p\,\mathrm{KL}\big(q_\lambda(z)\,\|\,p(z)\big)\\
&\quad + (\beta_q - \beta_p)\,\mathrm H[q_\lambda]
\end{aligned}"""

#: the training steps of the TermsTrace_ELBO example
TRAIN_STEPS = 60

#: the particle setting and seed of the same-draw checks
CHECK_PARTICLES, CHECK_VECTORIZE, CHECK_SEED = 4, True, 11


def _same_draws(estimator, pair="vae"):
    """Pyro's loss and decompose's terms on one seed (float64, own param store).

    ``pair`` is ``"vae"`` (the example VAE) or ``"fallback"`` (:func:`fallback_pair`).
    """
    from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

    elbo_class = {"trace": Trace_ELBO, "mean-field": TraceMeanField_ELBO}[estimator]
    with float64(), pyro.get_param_store().scope():
        if pair == "vae":
            x = example_data()
            model, guide = example_vae()
        else:
            model, guide, x = fallback_pair()
        options = dict(num_particles=CHECK_PARTICLES, vectorize_particles=CHECK_VECTORIZE)
        with seeded(CHECK_SEED):
            loss = elbo_class(**options).loss(model, guide, x)
        with seeded(CHECK_SEED):
            terms = decompose(model, guide, x, **options)
    return loss, terms


def fallback_pair():
    """A pair with one latent site of each kind for ``TraceMeanField_ELBO``: ``(model, guide, data)``.

    ``z``: Normal prior, Normal guide (closed-form KL); ``rate``: Gamma prior, LogNormal guide
    (torch has no KL for the pair: Pyro samples it).  Data: five fixed numbers.
    """

    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        rate = pyro.sample("rate", dist.Gamma(2.0, 2.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(z, rate.rsqrt()), obs=x)

    def guide(x):
        pyro.sample("z", dist.Normal(0.4, 0.5))
        pyro.sample("rate", dist.LogNormal(0.2, 0.3))

    return model, guide, torch.tensor([0.2, 1.1, 0.5, -0.3, 0.9])


def num_matches_trace_elbo(variant=None):
    """-Trace_ELBO(...).loss against reconstruction - kl_mc of decompose, on the same draws."""
    loss, t = _same_draws("trace")
    if variant == "flipped-kl-sign":
        rhs = t.reconstruction + t.kl_mc
    elif variant == "missing-log-q":
        rhs = t.reconstruction + t.log_prior
    else:
        rhs = t.reconstruction - t.kl_mc
    return exact(-loss, rhs)


register(
    Identity(
        id="decompose-matches-trace-elbo",
        chapter=CHAPTER,
        label="decompose-matches-trace-elbo",
        statement=STATEMENT_TRACE_ELBO,
        numeric=num_matches_trace_elbo,
        wrong=("flipped-kl-sign", "missing-log-q"),
        summary="decompose splits Trace_ELBO's loss, on Pyro's own draws, into reconstruction minus a sampled KL",
    )
)


def num_matches_mean_field(variant=None):
    """-TraceMeanField_ELBO(...).loss against reconstruction - kl_mean_field, on the same draws.

    Two pairs: the example VAE (every KL in closed form) and :func:`fallback_pair` (one site
    sampled), compared together.
    """
    lhs, rhs = [], []
    for pair in ("vae", "fallback"):
        loss, t = _same_draws("mean-field", pair)
        closed = sum(r.kl_analytic for r in t.sites if r.kl_analytic is not None)
        kl = {
            None: t.kl_mean_field,
            "sampled-kl": t.kl_mc,
            "flipped-kl-sign": -t.kl_mean_field,
            "closed-form-only": closed,
        }[variant]
        lhs.append(-loss)
        rhs.append(t.reconstruction - kl)
    return exact(torch.tensor(lhs, dtype=torch.float64), torch.tensor(rhs, dtype=torch.float64))


register(
    Identity(
        id="decompose-matches-mean-field",
        chapter=CHAPTER,
        label="decompose-matches-mean-field",
        statement=STATEMENT_MEAN_FIELD,
        numeric=num_matches_mean_field,
        wrong=("sampled-kl", "flipped-kl-sign", "closed-form-only"),
        summary="decompose's reconstruction - kl_mean_field (closed-form KL where torch has one, sampled "
        "elsewhere) is TraceMeanField_ELBO's loss",
    )
)


# ------------------------------------------------------------- the one-sided scale warning
#: the setting of the check: model scale, guide scale, the guide q = N(m, s^2) against p = N(0, 1)
MISMATCH_MODEL_SCALE, MISMATCH_GUIDE_SCALE, MISMATCH_LOC, MISMATCH_SD = 0.1, 1.0, 0.5, 0.6
MISMATCH_PARTICLES, MISMATCH_SEED = 20000, 5

_z = sp.Symbol("z", real=True)
_m = sp.Symbol("m", real=True)
_s, _bp, _gap = sp.symbols("s beta_p delta", positive=True)
#: beta_q, written as beta_p + delta: the wrong variant then differs by delta * H[q], which no
#: test point can make 0 (delta > 0), while the proof, a polynomial identity in delta, holds for any delta
_bq = _bp + _gap


def _log_normal(v, mean, sd):
    return -sp.log(2 * sp.pi * sd**2) / 2 - (v - mean) ** 2 / (2 * sd**2)


@functools.cache
def _expect_q(f):
    """E_q[f(z)] for q = N(m, s^2), integrated by SymPy."""
    q = sp.exp(_log_normal(_z, _m, _s))
    return sp.simplify(sp.integrate(sp.expand(f * q), (_z, -sp.oo, sp.oo), conds="none"))


def mismatch_objective_symbolic(variant=None):
    """The two sides of ``scale-mismatch-objective`` (p = N(0, 1)), each integrated against q."""
    log_p, log_q = _log_normal(_z, 0, 1), _log_normal(_z, _m, _s)
    lhs = _expect_q(_bp * log_p - _bq * log_q)
    kl, entropy = _expect_q(log_q - log_p), _expect_q(-log_q)
    rhs = -_bp * kl + (0 if variant == "entropy-cancels" else (_bq - _bp) * entropy)
    return lhs, rhs


def sym_scale_mismatch(variant=None):
    lhs, rhs = mismatch_objective_symbolic(variant)
    return lhs - rhs


def mismatch_pair():
    """z ~ N(0, 1) scaled by beta_p in the model, q = N(m, s^2) scaled by beta_q in the guide; one datum."""

    def model():
        with poutine.scale(scale=MISMATCH_MODEL_SCALE):
            z = pyro.sample("z", dist.Normal(torch.tensor(0.0), 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(1.0))

    def guide():
        with poutine.scale(scale=MISMATCH_GUIDE_SCALE):
            pyro.sample("z", dist.Normal(torch.tensor(MISMATCH_LOC), MISMATCH_SD))

    return model, guide


def num_scale_mismatch(variant=None):
    """decompose's per-particle ``log_prior - log_q`` (a Monte Carlo mean) against the closed form.

    Also checks that decompose warned (the claim of its message is what is being checked).
    """
    with float64():
        model, guide = mismatch_pair()
        with seeded(MISMATCH_SEED), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t = decompose(model, guide, num_particles=MISMATCH_PARTICLES, vectorize_particles=True)
        if not any(issubclass(w.category, ScaleMismatchWarning) for w in caught):
            raise AssertionError("decompose did not warn about the one-sided scale")
        samples = [p - q for p, q in zip(t.per_particle["log_prior"], t.per_particle["log_q"], strict=True)]
        values = {_bp: MISMATCH_MODEL_SCALE, _gap: MISMATCH_GUIDE_SCALE - MISMATCH_MODEL_SCALE}
        values.update({_m: MISMATCH_LOC, _s: MISMATCH_SD})
        claimed = float(mismatch_objective_symbolic(variant)[1].subs(values))
        true = float(mismatch_objective_symbolic()[1].subs(values))
        return monte_carlo(samples, claimed, scale=abs(true))


register(
    Identity(
        id="scale-mismatch-objective",
        chapter=CHAPTER,
        label="scale-mismatch-objective",
        statement=STATEMENT_SCALE_MISMATCH,
        symbolic=sym_scale_mismatch,
        numeric=num_scale_mismatch,
        wrong=("entropy-cancels",),
        summary="a latent site scaled by beta_p in the model and beta_q in the guide adds (beta_q - beta_p) "
        "times the guide's entropy; decompose's warning says so",
    )
)
