r"""Chapter ``likelihoods-as-losses``: the question's own model, an image denoiser.

The clean image ``z`` (``D = H W`` pixels) is latent, the noisy image ``x`` is observed::

    z ~ N(mu0 1, Lambda^-1),   Lambda = alpha I + gamma G      (prior: neighbouring pixels are alike)
    x | z ~ N(z, sigma^2 I)                                     (the observe statement of the question)
    q(z) = prod_d N(z_d; m_d, s_d^2)                             (a mean-field guide over pixels)

``G`` is the Laplacian of the pixel grid, so ``z^T G z = sum over neighbours (z_i - z_j)^2``. The
image is a crop of scikit-learn's bundled ``china.jpg``, turned to gray and block-averaged; the
noise is drawn once with a fixed seed. Because everything is Gaussian, the exact posterior and
the best mean-field guide are known in closed form, which lets the chapter judge the SVI fit.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import sympy as sp
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from torch.distributions import constraints

from .._util import float64, seeded, t64
from ..build.identity import Identity, exact, monte_carlo, register

CHAPTER = "likelihoods-as-losses"

# ---------------------------------------------------------------- the setting
#: rows and columns of the crop of china.jpg, and the block size of the averaging
CROP_ROWS, CROP_COLS, BLOCK = (20, 420), (40, 360), 10
#: observation noise, prior mean, and the two prior precisions (per pixel, per neighbour pair)
NOISE_SD, PRIOR_MEAN, PRIOR_ALPHA, PRIOR_GAMMA = 0.2, 0.5, 1.0, 25.0
DATA_SEED = 0
#: SVI settings of the chapter's fit
FIT_STEPS, FIT_LR, FIT_LR_END, FIT_SEED, FIT_INIT_SCALE = 500, 0.02, 0.002, 0, 0.05


@functools.lru_cache(maxsize=1)
def _clean() -> torch.Tensor:
    from sklearn.datasets import load_sample_image

    rgb = torch.tensor(load_sample_image("china.jpg").copy(), dtype=torch.float64)
    gray = rgb.mean(-1) / 255
    crop = gray[slice(*CROP_ROWS), slice(*CROP_COLS)]
    h, w = crop.shape[0] // BLOCK, crop.shape[1] // BLOCK
    return crop[: h * BLOCK, : w * BLOCK].reshape(h, BLOCK, w, BLOCK).mean((1, 3))


def clean_image() -> torch.Tensor:
    """The clean image: gray levels in [0, 1], float64, shape (H, W)."""
    return _clean().clone()


def noisy_image(sigma: float = NOISE_SD, seed: int = DATA_SEED) -> torch.Tensor:
    """x = clean + sigma * eps, eps ~ N(0, I), drawn once on a private stream seeded with ``seed``."""
    clean = _clean()
    with seeded(seed):
        return clean + sigma * torch.randn(clean.shape, dtype=torch.float64)


def grid_laplacian(h: int, w: int) -> torch.Tensor:
    """G, the (hw x hw) Laplacian of the 4-neighbour grid: z^T G z = sum_{i~j} (z_i - z_j)^2."""
    idx = torch.arange(h * w).reshape(h, w)
    g = torch.zeros(h * w, h * w, dtype=torch.float64)
    for a, b in [(idx[:-1, :], idx[1:, :]), (idx[:, :-1], idx[:, 1:])]:
        a, b = a.reshape(-1), b.reshape(-1)
        g[a, b] -= 1
        g[b, a] -= 1
        g[a, a] += 1
        g[b, b] += 1
    return g


@functools.lru_cache(maxsize=1)
def _prior_parts():
    h, w = _clean().shape
    precision = PRIOR_ALPHA * torch.eye(h * w, dtype=torch.float64) + PRIOR_GAMMA * grid_laplacian(h, w)
    scale_tril = torch.linalg.cholesky(torch.linalg.inv(precision))
    return torch.full((h * w,), PRIOR_MEAN, dtype=torch.float64), precision, scale_tril


def prior() -> dist.MultivariateNormal:
    r"""p(z) = N(mu0 1, Lambda^{-1}) over the D flattened pixels (Cholesky factor computed once)."""
    loc, _, scale_tril = _prior_parts()
    return dist.MultivariateNormal(loc, scale_tril=scale_tril)


def prior_precision() -> torch.Tensor:
    """Lambda = alpha I + gamma G."""
    return _prior_parts()[1]


# ---------------------------------------------------------------- model and guides
def model(data, sigma=NOISE_SD):
    """p(x, z): a latent clean image with a smoothness prior; the noisy image is observed."""
    clean = pyro.sample("clean", prior())  # z: D pixels, flattened
    clean_image = clean.reshape(clean.shape[:-1] + data.shape)
    pyro.sample("obs", dist.Normal(clean_image, sigma).to_event(2), obs=data)


def guide(data, sigma=NOISE_SD):
    """q(z): one independent Normal per pixel, its mean started at the noisy image."""
    loc = pyro.param("loc", lambda: data.reshape(-1).clone())
    scale = pyro.param("scale", lambda: torch.full_like(loc, FIT_INIT_SCALE), constraint=constraints.positive)
    pyro.sample("clean", dist.Normal(loc, scale).to_event(1))


def make_guide(loc, scale):
    """The same mean-field guide with fixed means ``loc`` and standard deviations ``scale``."""

    def fixed_guide(data, *args, **kwargs):
        pyro.sample("clean", dist.Normal(loc, scale).to_event(1))

    return fixed_guide


def posterior(data, sigma=NOISE_SD) -> dist.MultivariateNormal:
    r"""p(z | x) = N(P^{-1}(Lambda mu0 1 + x / sigma^2), P^{-1}),  P = Lambda + I / sigma^2."""
    loc0, lam, _ = _prior_parts()
    p = lam + torch.eye(len(loc0), dtype=torch.float64) / sigma**2
    mean = torch.linalg.solve(p, lam @ loc0 + data.reshape(-1) / sigma**2)
    return dist.MultivariateNormal(mean, precision_matrix=p)


def mean_field_optimum(data, sigma=NOISE_SD):
    r"""The best mean-field guide for a Gaussian posterior N(mu, P^{-1}): m = mu, s_d = P_dd^{-1/2}."""
    post = posterior(data, sigma)
    return post.loc, post.precision_matrix.diagonal().rsqrt()


# ---------------------------------------------------------------- the fit
@dataclass
class Fit:
    loc: torch.Tensor  # learned pixel means m, flattened
    scale: torch.Tensor  # learned pixel standard deviations s, flattened
    losses: torch.Tensor  # Trace_ELBO loss at every step
    state: dict  # the param store's state after the fit: ``pyro.get_param_store().scope(state)`` restores it

    def image(self, shape) -> torch.Tensor:
        """The denoised image: the guide's means, reshaped."""
        return self.loc.reshape(shape)


def fit(data, sigma=NOISE_SD, steps=FIT_STEPS, lr=FIT_LR, lr_end=FIT_LR_END, seed=FIT_SEED) -> Fit:
    """SVI with Trace_ELBO and ClippedAdam (lr decays from ``lr`` to ``lr_end``).

    Runs in its own param-store scope and on a private random stream: the caller's param store
    and RNG are left as they were. ``Fit.state`` holds the fitted params, to be used with
    ``pyro.get_param_store().scope(fit.state)``.
    """
    if steps < 1:
        raise ValueError(f"fit(): steps must be >= 1, got {steps}")
    if not 0 < lr_end <= lr:
        raise ValueError(f"fit(): need 0 < lr_end <= lr, got lr={lr}, lr_end={lr_end}")
    with pyro.get_param_store().scope() as state, seeded(seed):
        optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": (lr_end / lr) ** (1 / steps)})
        svi = SVI(model, guide, optim, Trace_ELBO())
        losses = torch.tensor([svi.step(data, sigma) for _ in range(steps)], dtype=torch.float64)
        loc, scale = pyro.param("loc").detach().clone(), pyro.param("scale").detach().clone()
    return Fit(loc, scale, losses, state)


# ---------------------------------------------------------------- one draw, term by term
def one_draw(guide_fn, data, sigma=NOISE_SD, seed=0) -> torch.Tensor:
    """The value z that the guide draws on a private stream seeded with ``seed`` (as Trace_ELBO would)."""
    with seeded(seed):
        return poutine.trace(guide_fn).get_trace(data, sigma).nodes["clean"]["value"].detach()


def loss_terms(z, data, loc, scale, sigma=NOISE_SD) -> dict:
    r"""The terms of -(log p(x|z) + log p(z) - log q(z)) at one draw, computed with torch directly.

    ``l2`` = ||x - z||^2 / (2 sigma^2) (``mse_loss(reduction="sum")``), ``constant`` = D/2 log(2 pi sigma^2),
    ``neg_log_prior`` = -log p(z), ``log_q`` = log q(z).
    """
    n_pix = data.numel()
    return {
        "l2": float(F.mse_loss(z.reshape(data.shape), data, reduction="sum")) / (2 * sigma**2),
        "constant": n_pix / 2 * math.log(2 * math.pi * sigma**2),
        "neg_log_prior": -float(prior().log_prob(z)),
        "log_q": float(torch.distributions.Normal(loc, scale).log_prob(z).sum()),
    }


# ------------------------------------------------------------------ identities
def num_denoising_loss_terms(variant=None):
    """Trace_ELBO().loss of the denoiser against its four terms computed with torch, same draw."""
    with float64():
        x = noisy_image()
        loc, scale = mean_field_optimum(x)
        g = make_guide(loc, scale)
        with seeded(7):
            loss = Trace_ELBO().loss(model, g, x)
        t = loss_terms(one_draw(g, x, seed=7), x, loc, scale)
        sign = -1 if variant == "l2-minus-sign" else 1
        guide_term = 0.0 if variant == "missing-guide-term" else t["log_q"]
        return exact(loss, sign * t["l2"] + t["constant"] + t["neg_log_prior"] + guide_term)


register(
    Identity(
        id="denoising-loss-terms",
        chapter=CHAPTER,
        label="denoising-loss-terms",
        statement=r"\begin{aligned}"
        r"\texttt{Trace\_ELBO().loss} &= \frac{\lVert x - z\rVert^2}{2\sigma^2} + \frac D2\log(2\pi\sigma^2) \\"
        r" &\quad - \log p(z) + \log q(z),\qquad z \sim q"
        r"\end{aligned}",
        numeric=num_denoising_loss_terms,
        wrong=("l2-minus-sign", "missing-guide-term"),
        summary="the denoiser's loss: the L2 enters with a plus sign, the prior and guide terms follow",
    )
)

# SymPy: one pixel's expected squared error under q
_z, _x, _m = sp.symbols("z x m", real=True)
_s = sp.Symbol("s", positive=True)


def expected_sq_error_by_integration():
    """E_q[(x - z)^2] for q = N(m, s^2), integrated by SymPy."""
    q = sp.exp(-((_z - _m) ** 2) / (2 * _s**2)) / sp.sqrt(2 * sp.pi * _s**2)
    return sp.integrate(sp.expand((_x - _z) ** 2 * q), (_z, -sp.oo, sp.oo), conds="none")


def sym_expected_l2(variant=None):
    rhs = (_x - _m) ** 2 + (0 if variant == "missing-variance" else _s**2)
    return expected_sq_error_by_integration() - rhs


#: draws of the Monte Carlo check of the expected L2
EXPECTED_L2_DRAWS = 1000


def sq_error_draws(loc, scale, data, n=EXPECTED_L2_DRAWS, seed=11) -> torch.Tensor:
    """||x - z||^2 for ``n`` draws z ~ q, drawn by running the guide under a Pyro plate."""
    g = make_guide(loc, scale)
    with seeded(seed), pyro.plate("draws", n, dim=-1):
        z = poutine.trace(g).get_trace(data).nodes["clean"]["value"]
    return ((z - data.reshape(-1)) ** 2).sum(-1)


def num_expected_l2(variant=None):
    with float64():
        x = noisy_image()
        loc, scale = mean_field_optimum(x)
        exact_value = float(((x.reshape(-1) - loc) ** 2).sum())
        if variant != "missing-variance":
            exact_value += float((scale**2).sum())
        return monte_carlo(sq_error_draws(loc, scale, x), exact_value)


register(
    Identity(
        id="expected-l2",
        chapter=CHAPTER,
        label="expected-l2",
        statement=r"\mathbb E_{q}\big[\lVert x - z\rVert^2\big] = \lVert x - m\rVert^2 + \sum_{d=1}^{D} s_d^2",
        symbolic=sym_expected_l2,
        numeric=num_expected_l2,
        wrong=("missing-variance",),
        summary="the expected L2 under a mean-field guide is the L2 at its mean plus its total variance",
    )
)


def rmse(a, b) -> float:
    """Root mean squared difference of two images."""
    return float(((t64(a) - t64(b)) ** 2).mean().sqrt())
