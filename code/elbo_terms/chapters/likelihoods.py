r"""Chapter ``likelihoods-as-losses``: Gaussian -> L2, Bernoulli -> BCE, Laplace -> L1, Categorical -> CE.

Every identity here says: the log-probability that Pyro's observed site contributes to the ELBO
is minus a familiar PyTorch loss, up to a constant and a scale. SymPy derives the per-pixel
log-densities from ``sympy.stats`` and sums them over ``D`` pixels; the numeric checks compare the
log-prob of a Pyro observed site with ``torch.nn.functional`` losses, in float64.

The Gaussian checks run on the question's own model (:mod:`elbo_terms.denoising`): ``x`` is the
noisy image, ``mu`` the clean one.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import sympy as sp
import sympy.stats as st
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import Trace_ELBO

from .._util import float64, seeded, t64
from ..build.identity import Identity, exact, register
from . import denoising as dn

CHAPTER = "likelihoods-as-losses"

# ------------------------------------------------------------------- SymPy side
u = sp.Symbol("u", real=True)  #: u = x_d - mu_d, the residual of one pixel
mu = sp.Symbol("mu", real=True)
sigma = sp.Symbol("sigma", positive=True)
kappa = sp.Symbol("kappa", positive=True)  #: the Laplace scale
n_pix = sp.Symbol("D", positive=True, integer=True)
sq_norm = sp.Symbol(r"\lVert x-\mu\rVert^2", positive=True)  #: sum_d (x_d - mu_d)^2
abs_norm = sp.Symbol(r"\lVert x-\mu\rVert_1", positive=True)  #: sum_d |x_d - mu_d|
kl = sp.Symbol(r"\mathrm{KL}", real=True)


def pixel_log_density(rv) -> sp.Expr:
    """log of the density of ``rv`` (a sympy.stats variable with location ``mu``) at x = mu + u."""
    return sp.expand(sp.expand_log(sp.log(st.density(rv)(mu + u)), force=True))


def sum_over_pixels(per_pixel: sp.Expr, g: sp.Expr, total: sp.Expr) -> sp.Expr:
    r"""sum_{d=1}^D of a per-pixel term a g(u_d) + c, which is a (sum_d g(u_d)) + D c; the sum is ``total``.

    Raises ValueError if ``per_pixel`` is not of that form (then the sum would not reduce to ``total``).
    """
    t = sp.Dummy("t")
    e = sp.expand(per_pixel).subs(g, t)
    if u in e.free_symbols:
        raise ValueError(f"{per_pixel} depends on the residual other than through {g}")
    poly = sp.Poly(e, t)
    if poly.degree() != 1:
        raise ValueError(f"{per_pixel} is not affine in {g}")
    return poly.coeff_monomial(t) * total + n_pix * poly.coeff_monomial(1)


def gaussian_log_likelihood():
    r"""sum_d log N(x_d; mu_d, sigma^2) as a function of ||x - mu||^2, D and sigma (derived)."""
    return sum_over_pixels(pixel_log_density(st.Normal("X", mu, sigma)), u**2, sq_norm)


def laplace_log_likelihood():
    r"""sum_d log Laplace(x_d; mu_d, kappa) as a function of ||x - mu||_1, D and kappa (derived)."""
    return sum_over_pixels(pixel_log_density(st.Laplace("X", mu, kappa)), sp.Abs(u), abs_norm)


def gaussian_constant():
    return n_pix / 2 * sp.log(2 * sp.pi * sigma**2)


def gaussian_l2_form(variant=None):
    """-||x - mu||^2 / (2 sigma^2) - D/2 log(2 pi sigma^2), or a wrong variant of it."""
    half = 1 if variant == "missing-half" else sp.Rational(1, 2)
    const = 0 if variant == "missing-constant" else gaussian_constant()
    return -half * sq_norm / sigma**2 - const


def sigma_gradient_form(variant=None):
    """||x - mu||^2 / sigma^3 - D / sigma (variant ``constant-dropped``: without -D/sigma)."""
    return sq_norm / sigma**3 - (0 if variant == "constant-dropped" else n_pix / sigma)


def sigma_hat_by_solving():
    """The stationary points of the Gaussian log-likelihood in sigma, solved by SymPy."""
    return sp.solve(sp.diff(gaussian_log_likelihood(), sigma), sigma)


def sigma_hat_squared():
    """sigma-hat^2 = ||x - mu||^2 / D; the wrong variant puts that value on sigma-hat itself."""
    return sq_norm / n_pix


def mse_mean_factors():
    r"""Solve mse_mean + KL = c (||x-mu||^2 / (2 sigma^2) + beta KL) for c and beta, for all residuals and KLs."""
    c, beta = sp.symbols("c beta", positive=True)
    diff = sp.expand(sq_norm / n_pix + kl - c * (sq_norm / (2 * sigma**2) + beta * kl))
    eqs = [diff.coeff(sq_norm), diff.coeff(kl)]
    (sol,) = sp.solve(eqs, [c, beta], dict=True)
    return sol[c], sol[beta]


def beta_of_sigma(variant=None):
    """beta = D / (2 sigma^2): the KL weight that mse_loss(reduction="mean") + KL implies."""
    return sp.Integer(1) if variant == "beta-one" else n_pix / (2 * sigma**2)


# ----------------------------------------------------------- Pyro / torch side
def site_log_prob(model_fn, *args, site="obs", **kwargs) -> torch.Tensor:
    """log p summed over the sample site ``site`` of one run of ``model_fn`` (differentiable)."""
    tr = poutine.trace(model_fn).get_trace(*args, **kwargs)
    if site not in tr.nodes or tr.nodes[site]["type"] != "sample":
        raise ValueError(f"{getattr(model_fn, '__name__', model_fn)} has no sample site named {site!r}")
    tr.compute_log_prob(lambda name, node: name == site)
    return tr.nodes[site]["log_prob_sum"]


def denoiser_obs_log_prob(clean, data, sigma) -> torch.Tensor:
    """log p(x | z) at the question's observed site "obs", with the latent clean image fixed to ``clean``."""
    conditioned = poutine.condition(dn.model, data={"clean": clean.reshape(-1)})
    return site_log_prob(conditioned, data, sigma, site="obs")


def gaussian_example():
    """(x, mu, sigma): the noisy image, the clean image, the noise level used to make x."""
    return dn.noisy_image(), dn.clean_image(), dn.NOISE_SD


def observe(likelihood, data):
    """A one-line model: ``pyro.sample("obs", likelihood, obs=data)``."""
    pyro.sample("obs", likelihood, obs=data)


def maximize_over_sigma(log_prob, sigma0=1.0, max_iter=200, tol=1e-14) -> float:
    """The maximizer of ``log_prob(sigma)``: damped Newton on t = log sigma, derivatives by autograd."""
    t = torch.tensor(math.log(sigma0), dtype=torch.float64)
    for _ in range(max_iter):
        t = t.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(log_prob(t.exp()), t, create_graph=True)
        (h,) = torch.autograd.grad(g, t)
        if not h < 0:
            raise ValueError(f"maximize_over_sigma(): not concave at sigma = {float(t.detach().exp()):.4g}")
        step = float((g / h).detach().clamp(-1.0, 1.0))
        t = t.detach() - step
        if abs(step) < tol:
            return float(t.exp())
    raise ValueError(f"maximize_over_sigma(): no convergence in {max_iter} Newton steps")


# ------------------------------------------------------------------ identities
def sym_gaussian_to_l2(variant=None):
    return gaussian_log_likelihood() - gaussian_l2_form(variant)


def num_gaussian_to_l2(variant=None):
    """Pyro's observed-site log-prob, twice, against the formula with ||x-mu||^2 and with mse_loss(sum)."""
    with float64():
        x, clean, s = gaussian_example()
        site = float(denoiser_obs_log_prob(clean, x, s))
        half = 1.0 if variant == "missing-half" else 0.5
        const = 0.0 if variant == "missing-constant" else x.numel() / 2 * math.log(2 * math.pi * s**2)
        by_norm = -half * float(torch.linalg.vector_norm(x - clean) ** 2) / s**2 - const
        by_mse = -half * float(F.mse_loss(clean, x, reduction="sum")) / s**2 - const
        return exact(t64([site, site]), t64([by_norm, by_mse]))


register(
    Identity(
        id="gaussian-to-l2",
        chapter=CHAPTER,
        label="gaussian-to-l2",
        statement=r"\log p(x \mid z) = \sum_{d=1}^{D} \log \mathcal N(x_d;\ \mu_d,\ \sigma^2)"
        r" = -\frac{\lVert x - \mu\rVert^2}{2\sigma^2} - \frac D2 \log(2\pi\sigma^2)",
        symbolic=sym_gaussian_to_l2,
        numeric=num_gaussian_to_l2,
        wrong=("missing-constant", "missing-half"),
        summary="a Gaussian observe statement scores minus the L2 over 2 sigma^2, minus a constant",
    )
)


def sym_l2_gradient(variant=None):
    x = sp.Symbol("x", real=True)
    log_pdf = sp.log(st.density(st.Normal("X", mu, sigma))(x))
    scale = 1 if variant == "unscaled-l2" else 1 / (2 * sigma**2)
    return sp.diff(log_pdf, mu) - sp.diff(-scale * (x - mu) ** 2, mu)


def num_l2_gradient(variant=None):
    """Gradient in the clean image of Pyro's observed-site log-prob, against that of -mse_loss(sum)/(2 sigma^2)."""
    with float64():
        x, clean, s = gaussian_example()
        clean = clean.requires_grad_(True)
        (g_site,) = torch.autograd.grad(denoiser_obs_log_prob(clean, x, s), clean)
        scale = 1.0 if variant == "unscaled-l2" else 1 / (2 * s**2)
        (g_l2,) = torch.autograd.grad(-scale * F.mse_loss(clean, x, reduction="sum"), clean)
        return exact(g_site, g_l2)


register(
    Identity(
        id="gaussian-l2-gradient",
        chapter=CHAPTER,
        label="gaussian-l2-gradient",
        statement=r"\nabla_\mu \log p(x \mid z) = -\frac{1}{2\sigma^2}\,\nabla_\mu \lVert x - \mu\rVert^2"
        r" = \frac{x - \mu}{\sigma^2}",
        symbolic=sym_l2_gradient,
        numeric=num_l2_gradient,
        wrong=("unscaled-l2",),
        summary="with sigma fixed the constant has no gradient: the term trains like L2 scaled by 1/(2 sigma^2)",
    )
)


def sym_sigma_gradient(variant=None):
    return sp.diff(gaussian_log_likelihood(), sigma) - sigma_gradient_form(variant)


def num_sigma_gradient(variant=None):
    """d/d sigma of Pyro's observed-site log-prob (autograd) against the formula, with mse_loss(sum)."""
    with float64():
        x, clean, s = gaussian_example()
        s_t = t64(s).requires_grad_(True)
        (g_site,) = torch.autograd.grad(denoiser_obs_log_prob(clean, x, s_t), s_t)
        sq = float(F.mse_loss(clean, x, reduction="sum"))
        formula = sq / s**3 - (0.0 if variant == "constant-dropped" else x.numel() / s)
        return exact(float(g_site), formula)


register(
    Identity(
        id="gaussian-sigma-gradient",
        chapter=CHAPTER,
        label="gaussian-sigma-gradient",
        statement=r"\frac{\partial}{\partial\sigma} \log p(x \mid z)"
        r" = \frac{\lVert x - \mu\rVert^2}{\sigma^3} - \frac{D}{\sigma}",
        symbolic=sym_sigma_gradient,
        numeric=num_sigma_gradient,
        wrong=("constant-dropped",),
        summary="with sigma learned the constant matters: it contributes -D/sigma to the gradient",
    )
)


def sym_sigma_mle(variant=None):
    (root,) = sigma_hat_by_solving()
    return (root if variant == "sigma-not-squared" else root**2) - sigma_hat_squared()


def num_sigma_mle(variant=None):
    """Maximize Pyro's observed-site log-prob over sigma by Newton's method; compare with mse_loss(mean)."""
    with float64():
        x, clean, _ = gaussian_example()
        s_hat = maximize_over_sigma(lambda s: denoiser_obs_log_prob(clean, x, s))
        found = s_hat if variant == "sigma-not-squared" else s_hat**2
        return exact(found, float(F.mse_loss(clean, x, reduction="mean")))


register(
    Identity(
        id="gaussian-sigma-mle",
        chapter=CHAPTER,
        label="gaussian-sigma-mle",
        statement=r"\begin{aligned}"
        r"\hat\sigma^2 &= \arg\max_{\sigma^2} \log p(x \mid z) = \frac{\lVert x - \mu\rVert^2}{D} \\"
        r' &= \texttt{mse\_loss(mu, x, reduction="mean")}'
        r"\end{aligned}",
        symbolic=sym_sigma_mle,
        numeric=num_sigma_mle,
        wrong=("sigma-not-squared",),
        summary="the noise level that maximizes the Gaussian term is the mean squared error",
    )
)


def profile_form(variant=None):
    """log p(x|z) at sigma-hat: -D/2 (1 + log(2 pi ||x-mu||^2 / D)) (variant ``missing-one``)."""
    one = 0 if variant == "missing-one" else 1
    return -n_pix / 2 * (one + sp.log(2 * sp.pi * sq_norm / n_pix))


def sym_profile(variant=None):
    (root,) = sigma_hat_by_solving()
    return gaussian_log_likelihood().subs(sigma, root) - profile_form(variant)


def num_profile(variant=None):
    with float64():
        x, clean, _ = gaussian_example()
        mse = float(F.mse_loss(clean, x, reduction="mean"))
        site = float(denoiser_obs_log_prob(clean, x, t64(math.sqrt(mse))))
        one = 0.0 if variant == "missing-one" else 1.0
        return exact(site, -x.numel() / 2 * (one + math.log(2 * math.pi * mse)))


register(
    Identity(
        id="gaussian-profile-likelihood",
        chapter=CHAPTER,
        label="gaussian-profile-likelihood",
        statement=r"\max_\sigma \log p(x \mid z)"
        r" = -\frac D2\Big(1 + \log\big(2\pi\,\tfrac{\lVert x-\mu\rVert^2}{D}\big)\Big)",
        symbolic=sym_profile,
        numeric=num_profile,
        wrong=("missing-one",),
        summary="with one learned sigma, the Gaussian term becomes -D/2 log(MSE) plus a constant",
    )
)


# ------------------------------------------------ mse_loss(reduction="mean") as a sigma and a beta
def sym_mse_mean(variant=None):
    c = 2 * sigma**2 / n_pix
    neg_log_lik = -gaussian_log_likelihood()
    return sq_norm / n_pix + kl - c * (neg_log_lik - gaussian_constant() + beta_of_sigma(variant) * kl)


def beta_model(data, sigma=dn.NOISE_SD, beta=1.0):
    """The denoiser with its prior site scaled by ``beta`` (the guide must be scaled alike)."""
    with poutine.scale(scale=beta):
        clean = pyro.sample("clean", dn.prior())
    pyro.sample("obs", dist.Normal(clean.reshape(data.shape), sigma).to_event(2), obs=data)


#: the sigma at which the mse-mean check runs (a unit-variance decoder, the usual reading)
MSE_MEAN_SIGMA = 1.0


def num_mse_mean(variant=None):
    """mse_loss(mean) + (log q - log p) at one draw, against (2 sigma^2/D)(beta-scaled Trace_ELBO loss - constant)."""
    with float64():
        x, s = dn.noisy_image(), MSE_MEAN_SIGMA
        n = x.numel()
        beta = 1.0 if variant == "beta-one" else n / (2 * s**2)
        loc, scale = dn.mean_field_optimum(x)
        g = poutine.scale(dn.make_guide(loc, scale), scale=beta)
        with seeded(5):
            loss = Trace_ELBO().loss(beta_model, g, x, s, beta)
        z = dn.one_draw(dn.make_guide(loc, scale), x, s, seed=5)
        kl_draw = float(torch.distributions.Normal(loc, scale).log_prob(z).sum() - dn.prior().log_prob(z))
        lhs = float(F.mse_loss(z.reshape(x.shape), x, reduction="mean")) + kl_draw
        return exact(lhs, 2 * s**2 / n * (loss - n / 2 * math.log(2 * math.pi * s**2)))


register(
    Identity(
        id="mse-mean-as-beta",
        chapter=CHAPTER,
        label="mse-mean-as-beta",
        statement=r"\begin{aligned}"
        r"\frac{\lVert x - \mu\rVert^2}{D} + \mathrm{KL}"
        r" &= \frac{2\sigma^2}{D}\Big(-\log p(x \mid z) - \frac D2\log(2\pi\sigma^2) \\"
        r" &\qquad\qquad + \beta\,\mathrm{KL}\Big),\qquad \beta = \frac{D}{2\sigma^2}"
        r"\end{aligned}",
        symbolic=sym_mse_mean,
        numeric=num_mse_mean,
        wrong=("beta-one",),
        summary="mse_loss(reduction='mean') + KL is a beta-VAE loss with beta = D/(2 sigma^2), rescaled",
    )
)


# ------------------------------------------------------------ Bernoulli -> binary cross-entropy
#: the binary pattern of SymPy's Bernoulli check (both values occur)
BERNOULLI_PATTERN = (1, 0, 1, 1)


def sym_bernoulli(variant=None):
    """On len(BERNOULLI_PATTERN) pixels: sum of log Bernoulli pmfs (sympy.stats) against -BCE(sum)."""
    ps = sp.symbols(f"p_1:{len(BERNOULLI_PATTERN) + 1}", positive=True)
    pairs = list(zip(ps, BERNOULLI_PATTERN, strict=True))
    lhs = sum(sp.log(st.density(st.Bernoulli(f"B{i}", p))(v)) for i, (p, v) in enumerate(pairs))
    bce = sum(-(v * sp.log(p) + (1 - v) * sp.log(1 - p)) for p, v in pairs)  # torch's formula
    if variant == "mean-reduction":
        bce = bce / len(ps)
    return lhs - (-bce)


def digits(n=None):
    """scikit-learn's bundled digits: images (n, 8, 8) scaled to [0, 1] and labels, float64 / int64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.as_tensor(d.images, dtype=torch.float64) / 16
    labels = torch.as_tensor(d.target, dtype=torch.int64)
    return (images, labels) if n is None else (images[:n], labels[:n])


def class_means(images, labels) -> torch.Tensor:
    """The average image of each class, shape (10, 8, 8)."""
    return torch.stack([images[labels == k].mean(0) for k in range(10)])


#: how many digits the Bernoulli and Categorical checks use
N_DIGITS = 100


def bernoulli_example():
    """Binarized digits x and probabilities p: the mean image of each digit's class, kept inside [0.02, 0.98]."""
    images, labels = digits()
    probs = class_means(images, labels)[labels[:N_DIGITS]].clamp(0.02, 0.98)
    return (images[:N_DIGITS] > 0.5).to(torch.float64), probs


def num_bernoulli(variant=None):
    """Pyro's Bernoulli site (probs and logits) against binary_cross_entropy(_with_logits)(sum)."""
    with float64():
        x, p = bernoulli_example()
        site_p = float(site_log_prob(observe, dist.Bernoulli(probs=p).to_event(3), x))
        logits = torch.logit(p)
        site_l = float(site_log_prob(observe, dist.Bernoulli(logits=logits).to_event(3), x))
        red = "mean" if variant == "mean-reduction" else "sum"
        bce_p = float(F.binary_cross_entropy(p, x, reduction=red))
        bce_l = float(F.binary_cross_entropy_with_logits(logits, x, reduction=red))
        return exact(t64([site_p, site_l]), t64([-bce_p, -bce_l]))


register(
    Identity(
        id="bernoulli-to-bce",
        chapter=CHAPTER,
        label="bernoulli-to-bce",
        statement=r"\begin{aligned}"
        r"&\sum_{d=1}^{D} \log \mathrm{Bernoulli}(x_d;\ p_d) \\"
        r" &\quad= \sum_{d=1}^{D} \big(x_d \log p_d + (1 - x_d)\log(1 - p_d)\big) \\"
        r' &\quad= -\texttt{binary\_cross\_entropy(p, x, reduction="sum")}'
        r"\end{aligned}",
        symbolic=sym_bernoulli,
        numeric=num_bernoulli,
        wrong=("mean-reduction",),
        summary="a Bernoulli observe statement scores minus the binary cross-entropy, summed",
    )
)


# ------------------------------------------------------------------- Laplace -> L1
#: the Laplace scale of the check
LAPLACE_SCALE = 0.15


def sym_laplace(variant=None):
    const = 0 if variant == "missing-constant" else n_pix * sp.log(2 * kappa)
    return laplace_log_likelihood() - (-abs_norm / kappa - const)


def num_laplace(variant=None):
    with float64():
        x, clean, _ = gaussian_example()
        site = float(site_log_prob(observe, dist.Laplace(clean, LAPLACE_SCALE).to_event(2), x))
        const = 0.0 if variant == "missing-constant" else x.numel() * math.log(2 * LAPLACE_SCALE)
        return exact(site, -float(F.l1_loss(clean, x, reduction="sum")) / LAPLACE_SCALE - const)


register(
    Identity(
        id="laplace-to-l1",
        chapter=CHAPTER,
        label="laplace-to-l1",
        statement=r"\sum_{d=1}^{D} \log \mathrm{Laplace}(x_d;\ \mu_d,\ \kappa)"
        r" = -\frac{\lVert x - \mu\rVert_1}{\kappa} - D\log(2\kappa)",
        symbolic=sym_laplace,
        numeric=num_laplace,
        wrong=("missing-constant",),
        summary="a Laplace observe statement scores minus the L1 over kappa, minus a constant",
    )
)


# -------------------------------------------------------------- Categorical -> cross-entropy
#: SymPy's Categorical check: labels of two items, three classes
CATEGORICAL_LABELS, CATEGORICAL_CLASSES = (2, 0), 3


def sym_categorical(variant=None):
    """log of the softmax probability of each label (the pmf Categorical(logits=l) uses) against -CE(sum)."""
    k = CATEGORICAL_CLASSES
    lhs, ce = 0, 0
    for i, y in enumerate(CATEGORICAL_LABELS):
        logit = sp.symbols(f"l_{i}_0:{k}", real=True)
        probs = {c: sp.exp(logit[c]) / sum(sp.exp(v) for v in logit) for c in range(k)}
        lhs += sp.log(st.P(sp.Eq(st.FiniteRV(f"Y{i}", probs), y)))
        ce += -logit[y] + sp.log(sum(sp.exp(v) for v in logit))  # torch's cross_entropy formula
    if variant == "mean-reduction":
        ce = ce / len(CATEGORICAL_LABELS)
    return lhs - (-ce)


#: temperature of the nearest-class-mean logits
CATEGORICAL_TEMPERATURE = 4.0


def categorical_example():
    """Digit labels y and logits l_{nk} = -||x_n - mean_k||^2 / T (a nearest-class-mean classifier)."""
    images, labels = digits()
    means = class_means(images, labels)
    x = images[:N_DIGITS].reshape(N_DIGITS, 1, -1)
    logits = -((x - means.reshape(1, 10, -1)) ** 2).sum(-1) / CATEGORICAL_TEMPERATURE
    return labels[:N_DIGITS], logits


def classifier(logits, labels):
    """Labels observed under a plate: ``pyro.sample("y", Categorical(logits=l), obs=y)``."""
    with pyro.plate("items", len(labels)):
        pyro.sample("y", dist.Categorical(logits=logits), obs=labels)


def num_categorical(variant=None):
    with float64():
        y, logits = categorical_example()
        site = float(site_log_prob(classifier, logits, y, site="y"))
        red = "mean" if variant == "mean-reduction" else "sum"
        return exact(site, -float(F.cross_entropy(logits, y, reduction=red)))


register(
    Identity(
        id="categorical-to-cross-entropy",
        chapter=CHAPTER,
        label="categorical-to-cross-entropy",
        statement=r"\begin{aligned}"
        r"&\sum_{n=1}^{N} \log \mathrm{Categorical}\big(y_n;\ \mathrm{softmax}(\ell_n)\big) \\"
        r' &\quad= -\texttt{cross\_entropy(l, y, reduction="sum")}'
        r"\end{aligned}",
        symbolic=sym_categorical,
        numeric=num_categorical,
        wrong=("mean-reduction",),
        summary="a Categorical observe statement with logits scores minus the cross-entropy, summed",
    )
)
