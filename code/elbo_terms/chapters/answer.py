r"""The answer page: the forum question's own kind of model, term by term, on one draw.

A latent clean image ``z`` (an 8x8 digit of scikit-learn's bundled set, ``D = 64`` pixels)
with a Normal prior; the observe statement of the question,
``pyro.sample("obs", dist.Normal(z, sigma).to_event(2), obs=noisy)``; and a mean-field Normal
guide, fitted briefly with SVI. :func:`numbers` returns, as floats, every number the answer
page quotes: the terms of one draw of ``Trace_ELBO`` (from :func:`elbo_terms.decompose`), the
L2 part of the reconstruction and its constant, and the gradient Pyro computes on that draw
against the reparameterization and score-function (BBVI eq. 3) gradients.
"""

from __future__ import annotations

import functools
import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam
from torch.distributions import constraints

from .._util import float64, seeded
from ..build.identity import IdentityFailed
from ..decomposition import decompose

NOISE_SD, PRIOR_MEAN, PRIOR_SD = 0.3, 0.5, 0.5
DIGIT, DATA_SEED, FIT_STEPS, FIT_SEED, DRAW_SEED = 0, 0, 400, 0, 7


def clean_image() -> torch.Tensor:
    """scikit-learn's first 8x8 digit, gray levels scaled to [0, 1], float64."""
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().images[DIGIT], dtype=torch.float64) / 16


def noisy_image() -> torch.Tensor:
    with seeded(DATA_SEED):
        return clean_image() + NOISE_SD * torch.randn(8, 8, dtype=torch.float64)


def model(data, sigma=NOISE_SD):
    """p(x, z) = N(x; z, sigma^2 I) N(z; 0.5, 0.5^2 I): the question's observe statement."""
    prior = dist.Normal(torch.full_like(data, PRIOR_MEAN), torch.full_like(data, PRIOR_SD)).to_event(2)
    clean = pyro.sample("clean", prior)
    pyro.sample("obs", dist.Normal(clean, sigma).to_event(2), obs=data)


def guide(data, sigma=NOISE_SD):
    """q(z) = prod_d N(z_d; m_d, s_d^2), one mean and one scale per pixel."""
    loc = pyro.param("loc", data.clone())
    scale = pyro.param("scale", torch.full_like(data, 0.1), constraint=constraints.positive)
    pyro.sample("clean", dist.Normal(loc, scale).to_event(2))


@functools.lru_cache(maxsize=1)
def _fit_params():
    with float64(), seeded(FIT_SEED):
        pyro.clear_param_store()
        svi = SVI(model, guide, Adam({"lr": 0.02}), Trace_ELBO())
        data = noisy_image()
        for _ in range(FIT_STEPS):
            svi.step(data)
        params = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
        pyro.clear_param_store()
    return params


def _load_params():
    pyro.clear_param_store()
    params = _fit_params()
    pyro.param("loc", params["loc"].clone())
    pyro.param("scale", params["scale"].clone(), constraint=constraints.positive)


def _gradients(data):
    """On one draw (seed DRAW_SEED): Pyro's gradient w.r.t. the guide means, the reparameterization
    gradient computed by hand, and the score-function estimate (BBVI eq. 3, S = 1)."""
    _load_params()
    with seeded(DRAW_SEED):
        Trace_ELBO().loss_and_grads(model, guide, data)
    store = pyro.get_param_store()
    loc = store["loc"]
    pyro_grad = -loc.grad.clone()  # the loss is -ELBO
    scale = store["scale"].detach()
    # the same draw, by hand: z = m + s * eps, eps taken from the same stream
    with seeded(DRAW_SEED):
        eps = torch.randn_like(data)
    m = loc.detach().clone().requires_grad_(True)
    z = m + scale * eps
    obj = (
        dist.Normal(z, NOISE_SD).log_prob(data).sum()
        + dist.Normal(PRIOR_MEAN, PRIOR_SD).log_prob(z).sum()
        - dist.Normal(m, scale).log_prob(z).sum()
    )
    (reparam,) = torch.autograd.grad(obj, m)
    # BBVI eq. (3) with S = 1: grad_m log q(z) * (log p(x, z) - log q(z)), z held fixed
    zf = z.detach()
    m2 = loc.detach().clone().requires_grad_(True)
    log_q = dist.Normal(m2, scale).log_prob(zf).sum()
    log_w = float(
        dist.Normal(zf, NOISE_SD).log_prob(data).sum()
        + dist.Normal(PRIOR_MEAN, PRIOR_SD).log_prob(zf).sum()
        - log_q.detach()
    )
    (score,) = torch.autograd.grad(log_q, m2)
    score = score * log_w
    pyro.clear_param_store()
    return pyro_grad, reparam, score


def numbers() -> dict:
    """Every number the answer page quotes, as Python floats."""
    with float64():
        data = noisy_image()
        d_pix = data.numel()
        _load_params()
        with seeded(DRAW_SEED):
            terms = decompose(model, guide, data)
        with seeded(DRAW_SEED):
            z = poutine.trace(guide).get_trace(data).nodes["clean"]["value"].detach()
        pyro.clear_param_store()
        constant = -d_pix / 2 * math.log(2 * math.pi * NOISE_SD**2)
        l2 = float(F.mse_loss(z, data, reduction="sum"))
        recon_from_l2 = -l2 / (2 * NOISE_SD**2) + constant
        if not math.isclose(recon_from_l2, terms.reconstruction, rel_tol=1e-9):
            raise IdentityFailed(f"L2 form {recon_from_l2} != Pyro's log p(x|z) {terms.reconstruction}")
        pyro_grad, reparam, score = _gradients(data)
        return {
            "pixels": float(d_pix),
            "sigma": NOISE_SD,
            "fit-steps": float(FIT_STEPS),
            "log-lik": terms.reconstruction,
            "log-prior": terms.log_prior,
            "log-joint": terms.reconstruction + terms.log_prior,
            "log-q": terms.log_q,
            "kl-mc": terms.kl_mc,
            "kl-analytic": terms.kl_analytic,
            "elbo-draw": terms.elbo,
            "elbo-mean-field": terms.elbo_mean_field,
            "l2": l2,
            "l2-term": -l2 / (2 * NOISE_SD**2),
            "l2-constant": constant,
            "grad-pyro-vs-reparam": float((pyro_grad - reparam).abs().max()),
            "grad-pyro-vs-score": float((pyro_grad - score).norm()),  # Euclidean, like grad-norm
            "grad-norm": float(pyro_grad.norm()),
        }
