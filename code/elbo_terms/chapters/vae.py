r"""Chapter ``vae-bridge``: one VAE written twice, as a PyTorch module and as a Pyro model and guide.

The VAE, on scikit-learn's bundled 8x8 digits (``D = 64`` pixels scaled to [0, 1])::

    z_n ~ N(0, I_k),   x_n | z_n ~ Bernoulli(sigmoid(decoder(z_n)))     (model, p)
    q(z_n | x_n) = N(m_n, diag(s_n^2)),  (m_n, log s_n^2) = encoder(x_n)   (guide, q)

:class:`VAE` is the usual PyTorch module (``loss = BCE(sum) + KL``); :func:`make_model` and
:func:`make_guide` register the *same* encoder and decoder with ``pyro.module``. Every check
draws Pyro's and torch's random numbers from one seeded stream, so both sides see the same
``eps`` (and the same minibatch): the comparisons are exact in float64.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import time

import pyro
import pyro.distributions as dist
import sympy as sp
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from torch import nn

from .._util import float64, seeded
from ..build.identity import Identity, exact, inequality, monte_carlo, register

CHAPTER = "vae-bridge"
#: the Part II page with the machinery: learning-rate rules, num_particles, timing, TraceMeanField_ELBO's checks
OPTIONS = "vae-options"

# ---------------------------------------------------------------- the setting
#: pixels per digit, latent dimension, hidden units, the seed of the initial weights
D_PIXELS, Z_DIM, HIDDEN, WEIGHT_SEED = 64, 4, 128, 0
#: beta of the beta-VAE checks, the minibatch size of the subsampling checks
BETA, BATCH = 0.3, 100


def digits() -> torch.Tensor:
    """scikit-learn's bundled 8x8 digits (no download) as a float64 (N, 64) tensor scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().data / 16.0, dtype=torch.float64)


def check_digits(x, where="x"):
    """Refuse anything but a float64 (N, 64) tensor of pixel values in [0, 1], naming what is wrong."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where} must be a torch.Tensor of digits, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[-1] != D_PIXELS:
        raise ValueError(f"{where} must have shape (N, {D_PIXELS}) (one 8x8 digit per row), got {tuple(x.shape)}")
    if x.dtype != torch.float64:
        raise TypeError(f"{where} must be float64 (the checks are exact in float64), got {x.dtype}")
    if len(x) == 0:
        raise ValueError(f"{where} holds no digits")
    if not bool(torch.isfinite(x).all()) or float(x.min()) < 0 or float(x.max()) > 1:
        raise ValueError(f"{where} must hold pixel values in [0, 1] (BCE targets); scale it, e.g. digits / 16")
    return x


class Encoder(nn.Module):
    """x -> (m, log s^2): one hidden ReLU layer and two linear heads."""

    def __init__(self, x_dim=D_PIXELS, z_dim=Z_DIM, hidden=HIDDEN):
        super().__init__()
        self.fc = nn.Linear(x_dim, hidden)
        self.loc = nn.Linear(hidden, z_dim)
        self.logvar = nn.Linear(hidden, z_dim)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        return self.loc(h), self.logvar(h)


class Decoder(nn.Module):
    """z -> the logits of the D Bernoulli pixels."""

    def __init__(self, x_dim=D_PIXELS, z_dim=Z_DIM, hidden=HIDDEN):
        super().__init__()
        self.fc = nn.Linear(z_dim, hidden)
        self.out = nn.Linear(hidden, x_dim)

    def forward(self, z):
        return self.out(torch.relu(self.fc(z)))


class VAE(nn.Module):
    """The usual PyTorch VAE: ``forward`` draws z = m + s * eps, ``eps = randn_like(s)``."""

    def __init__(self, x_dim=D_PIXELS, z_dim=Z_DIM, hidden=HIDDEN):
        super().__init__()
        self.encoder = Encoder(x_dim, z_dim, hidden)
        self.decoder = Decoder(x_dim, z_dim, hidden)

    def forward(self, x):
        mu, logvar = self.encoder(x)
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        z = mu + eps * std
        return self.decoder(z), mu, logvar, z, eps


def bce_sum(logits, x):
    r"""The reconstruction loss: :math:`\sum_{n,d} \mathrm{BCE}(x_{nd}, \sigma(\ell_{nd})) = -\log p(x \mid z)`."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="sum")


def kl_closed_form(mu, logvar):
    r"""Per data point :math:`\mathrm{KL}(q \,\|\, N(0, I)) = -\tfrac12 \sum_j (1 + \log s_j^2 - m_j^2 - s_j^2)`."""
    return -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(-1)


def kl_monte_carlo(z, eps, logvar):
    r"""Per data point, at z = m + s eps:
    :math:`\log q(z) - \log p(z) = \sum_j \tfrac12 (z_j^2 - \varepsilon_j^2) - \log s_j`."""
    return (0.5 * (z**2 - eps**2) - 0.5 * logvar).sum(-1)


def vae_loss(vae, x, kl="closed-form"):
    """``BCE(sum) + KL`` of one forward pass, the KL in closed form or at the sampled z."""
    logits, mu, logvar, z, eps = vae(x)
    kls = kl_closed_form(mu, logvar) if kl == "closed-form" else kl_monte_carlo(z, eps, logvar)
    return bce_sum(logits, x) + kls.sum()


def build_vae(seed=WEIGHT_SEED) -> VAE:
    """A float64 VAE with the initial weights of ``seed`` (drawn from a private stream)."""
    with float64(), seeded(seed):
        return VAE()


# ---------------------------------------------------------------- the Pyro twin
def make_model(vae, scale_latent=True):
    """p(x, z) with ``vae.decoder``; ``scale_latent=False`` leaves out the beta line (a one-sided beta)."""

    def model(x, batch_size=None, beta=1.0):
        pyro.module("decoder", vae.decoder)
        with pyro.plate("data", len(x), subsample_size=batch_size) as idx:
            with poutine.scale(scale=beta if scale_latent else 1.0):
                z = pyro.sample("z", dist.Normal(x.new_zeros(Z_DIM), 1.0).to_event(1))
            logits = vae.decoder(z)
            pyro.sample("x", dist.Bernoulli(logits=logits, validate_args=False).to_event(1), obs=x[idx])

    return model


def make_guide(vae, scale_latent=True):
    """q(z | x) with ``vae.encoder``; ``scale_latent=False`` leaves out the beta line (a one-sided beta)."""

    def guide(x, batch_size=None, beta=1.0):
        pyro.module("encoder", vae.encoder)
        with pyro.plate("data", len(x), subsample_size=batch_size) as idx:
            mu, logvar = vae.encoder(x[idx])
            with poutine.scale(scale=beta if scale_latent else 1.0):
                pyro.sample("z", dist.Normal(mu, torch.exp(0.5 * logvar)).to_event(1))

    return guide


@contextlib.contextmanager
def private_param_store():
    """Run a block with an empty Pyro param store, then put the caller's store back."""
    with pyro.get_param_store().scope():
        yield


def pyro_loss(elbo, vae, x, seed, model=None, guide=None, **kwargs) -> float:
    """``elbo.loss(model, guide, x, **kwargs)`` on the private stream ``seed`` (default: the twin of ``vae``)."""
    check_digits(x)
    model = make_model(vae) if model is None else model
    guide = make_guide(vae) if guide is None else guide
    with float64(), private_param_store(), seeded(seed):
        return float(elbo.loss(model, guide, x, **kwargs))


# -------------------------------------------------------- same-draw torch terms
def torch_terms(vae, x, seed, batch_size=None, particles=None):
    """The torch side of one seeded draw, in the order Pyro draws: the batch, then eps.

    Returns per-data-point tensors ``bce``, ``kl_mc``, ``kl_closed``, ``log_q``, ``log_p``, the
    indices ``idx``, the draws ``eps`` and the scale ``N/B``. With ``particles=S`` every tensor has a leading particle
    dimension and eps is drawn as one (S, B, k) block, as ``vectorize_particles=True`` does.
    """
    n = len(check_digits(x))
    with float64(), torch.no_grad(), seeded(seed):
        idx = torch.arange(n) if batch_size is None else torch.randperm(n)[:batch_size]
        xb = x[idx]
        mu, logvar = vae.encoder(xb)
        std = torch.exp(0.5 * logvar)
        shape = std.shape if particles is None else (particles,) + std.shape
        eps = torch.randn(shape, dtype=torch.float64)
        z = mu + eps * std
        logits = vae.decoder(z)
        bce = F.binary_cross_entropy_with_logits(logits, xb.expand_as(logits), reduction="none").sum(-1)
        log_2pi = math.log(2 * math.pi)
        log_q = (-0.5 * (eps**2 + logvar + log_2pi)).sum(-1)
        log_p = (-0.5 * (z**2 + log_2pi)).sum(-1)
        return {
            "bce": bce,
            "kl_mc": log_q - log_p,
            "kl_closed": kl_closed_form(mu, logvar).expand_as(bce),
            "log_q": log_q,
            "log_p": log_p,
            "idx": idx,
            "eps": eps,
            "scale": n / len(idx),
        }


# ------------------------------------------------------------------- SymPy side
xs, l, m, eps_ = sp.symbols("x ell m varepsilon", real=True)
s, beta_ = sp.symbols("s beta", positive=True)
zs = sp.Symbol("z", real=True)


def log_normal(v, mean, sd):
    """log N(v; mean, sd^2) as a SymPy expression."""
    return -sp.log(2 * sp.pi * sd**2) / 2 - (v - mean) ** 2 / (2 * sd**2)


def log_bernoulli_logits(x, logit):
    r"""x log sigma(l) + (1 - x) log(1 - sigma(l)), sigma(l) = e^l / (1 + e^l): Bernoulli's log-pmf."""
    p = sp.exp(logit) / (1 + sp.exp(logit))
    return x * sp.log(p) + (1 - x) * sp.log(1 - p)


def bce_with_logits_symbolic(x, logit):
    """What ``binary_cross_entropy_with_logits`` computes for one pixel: log(1 + e^l) - x l."""
    return sp.log(1 + sp.exp(logit)) - x * logit


def kl_closed_symbolic():
    """-(1 + log s^2 - m^2 - s^2) / 2, one latent coordinate."""
    return -(1 + sp.log(s**2) - m**2 - s**2) / 2


def expected_under_q(expr):
    """E_q[expr] for q = N(m, s^2), integrated over z by SymPy."""
    return sp.integrate(sp.expand(expr * sp.exp(log_normal(zs, m, s))), (zs, -sp.oo, sp.oo), conds="none")


@functools.cache
def expected_log_q():
    """E_q[log q(z)] (minus the entropy), one coordinate, integrated by SymPy once."""
    return expected_under_q(log_normal(zs, m, s))


@functools.cache
def expected_log_prior():
    """E_q[log N(z; 0, 1)] (minus the cross-entropy), one coordinate, integrated by SymPy once."""
    return expected_under_q(log_normal(zs, 0, 1))


# ------------------------------------------------------------------ identities
def sym_loss_monte_carlo_kl(variant=None):
    """One pixel and one latent coordinate at z = m + s eps: Pyro's -(log p(x|z) + log p(z) - log q(z))
    against the PyTorch formulas BCE + (z^2 - eps^2)/2 - log s."""
    z = m + s * eps_
    pyro_side = -(log_bernoulli_logits(xs, l) + log_normal(z, 0, 1) - log_normal(z, m, s))
    kl_mc = (z**2 - eps_**2) / 2 - sp.log(s)
    kl = {"flipped-kl-sign": -kl_mc, "closed-form-kl": kl_closed_symbolic()}.get(variant, kl_mc)
    return pyro_side - (bce_with_logits_symbolic(xs, l) + kl)


def num_loss_monte_carlo_kl(variant=None):
    """Trace_ELBO().loss against BCE(sum) + sum_n (log q - log p) with torch, same eps."""
    vae, x = build_vae(), digits()
    loss = pyro_loss(Trace_ELBO(), vae, x, seed=11)
    t = torch_terms(vae, x, seed=11)
    kl = {"flipped-kl-sign": -t["kl_mc"], "closed-form-kl": t["kl_closed"]}.get(variant, t["kl_mc"])
    return exact(loss, float(t["bce"].sum() + kl.sum()))


register(
    Identity(
        id="vae-loss-monte-carlo-kl",
        chapter=CHAPTER,
        label="vae-loss-monte-carlo-kl",
        statement=r"\begin{aligned}"
        r"\texttt{Trace\_ELBO().loss} &= \sum_{n,d} \mathrm{BCE}\big(x_{nd}, \mathrm{sigmoid}(\ell_{nd})\big)\\"
        r" &\quad + \sum_n \big[\log q(z_n \mid x_n) - \log p(z_n)\big],\\"
        r"z_n &= m_n + s_n \odot \varepsilon_n"
        r"\end{aligned}",
        symbolic=sym_loss_monte_carlo_kl,
        numeric=num_loss_monte_carlo_kl,
        wrong=("flipped-kl-sign", "closed-form-kl"),
        summary="Trace_ELBO's loss on a VAE = BCE(sum) + the KL estimated at the sampled z",
    )
)


def sym_loss_closed_form_kl(variant=None):
    """E_q[log q - log p] for one coordinate, integrated by SymPy, against the closed form."""
    kl = kl_closed_symbolic()
    if variant == "kl-missing-one":
        kl = -(sp.log(s**2) - m**2 - s**2) / 2
    elif variant == "flipped-kl-sign":
        kl = -kl
    return expected_log_q() - expected_log_prior() - kl


def num_loss_closed_form_kl(variant=None):
    """TraceMeanField_ELBO().loss against the PyTorch VAE loss BCE(sum) + closed-form KL, same eps."""
    vae, x = build_vae(), digits()
    loss = pyro_loss(TraceMeanField_ELBO(), vae, x, seed=12)
    t = torch_terms(vae, x, seed=12)
    kl = t["kl_closed"].sum()
    if variant == "kl-missing-one":
        kl = kl + 0.5 * Z_DIM * len(x)
    elif variant == "flipped-kl-sign":
        kl = -kl
    return exact(loss, float(t["bce"].sum() + kl))


register(
    Identity(
        id="vae-loss-closed-form-kl",
        chapter=CHAPTER,
        label="vae-loss-closed-form-kl",
        statement=r"\begin{aligned}"
        r"\texttt{TraceMeanField\_ELBO().loss} &= "
        r"\sum_{n,d} \mathrm{BCE}\big(x_{nd}, \mathrm{sigmoid}(\ell_{nd})\big)\\"
        r" &\quad - \tfrac12 \sum_{n,j} \big(1 + \log s_{nj}^2 - m_{nj}^2 - s_{nj}^2\big)"
        r"\end{aligned}",
        symbolic=sym_loss_closed_form_kl,
        numeric=num_loss_closed_form_kl,
        wrong=("kl-missing-one", "flipped-kl-sign"),
        summary="TraceMeanField_ELBO's loss on a VAE is the standard PyTorch VAE loss, BCE(sum) + KL",
    )
)


# ------------------------------------------------ what TraceMeanField_ELBO checks
def _observe(z):
    pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.5))


def toy_model_two_latents():
    """a, b ~ N(0, 1); x ~ N(a + b, 1) observed."""
    _observe(pyro.sample("a", dist.Normal(0.0, 1.0)) + pyro.sample("b", dist.Normal(0.0, 1.0)))


def toy_guide_reversed():
    """Normal guide sites for b, then a: the model's order reversed."""
    pyro.sample("b", dist.Normal(0.3, 0.8))
    pyro.sample("a", dist.Normal(0.3, 0.8))


def toy_model_bernoulli():
    """c ~ Bernoulli(1/2); x ~ N(c, 1) observed."""
    _observe(pyro.sample("c", dist.Bernoulli(0.5)))


def toy_guide_bernoulli():
    """A Bernoulli guide site: not reparameterizable, yet torch knows KL(Bernoulli || Bernoulli)."""
    pyro.sample("c", dist.Bernoulli(0.3))


def toy_model_normal():
    """z ~ N(0, 1); x ~ N(z, 1) observed."""
    _observe(pyro.sample("z", dist.Normal(0.0, 1.0)))


def toy_model_student():
    """z ~ StudentT(3); x ~ N(z, 1) observed: torch has no KL(Normal || StudentT)."""
    _observe(pyro.sample("z", dist.StudentT(3.0, 0.0, 1.0)))


def toy_guide_normal():
    pyro.sample("z", dist.Normal(0.3, 0.8))


def toy_guide_with_extra_site(marked):
    """A guide-only site u (the model has none), marked auxiliary or not, and z depending on u."""

    def guide():
        u = pyro.sample("u", dist.Normal(0.0, 1.0), infer={"is_auxiliary": True} if marked else {})
        pyro.sample("z", dist.Normal(0.3 + 0.1 * u, 0.8))

    return guide


#: (case, model, guide, validation) -- the programs of :func:`mean_field_behaviour`
MEAN_FIELD_CASES = (
    ("guide samples b before a", toy_model_two_latents, toy_guide_reversed, True),
    ("Bernoulli latent", toy_model_bernoulli, toy_guide_bernoulli, True),
    ("Bernoulli latent, validation off", toy_model_bernoulli, toy_guide_bernoulli, False),
    ("guide-only u, marked auxiliary", toy_model_normal, toy_guide_with_extra_site(True), True),
    ("guide-only u, not marked", toy_model_normal, toy_guide_with_extra_site(False), True),
    ("guide-only u, not marked, validation off", toy_model_normal, toy_guide_with_extra_site(False), False),
    ("model StudentT: no KL registered", toy_model_student, toy_guide_normal, True),
)


def run_loss(elbo, model, guide, validation=True, seed=26) -> dict:
    """``elbo.loss(model, guide)`` on a private stream: ``value`` (or None), ``error`` and ``warnings``.

    ``error`` is ``"ExceptionType: message"`` when the loss raised; ``warnings`` lists the
    ``(category name, message)`` of the warnings it issued.
    """
    import warnings

    out = {"value": None, "error": None, "warnings": []}
    with float64(), private_param_store(), seeded(seed), pyro.validation_enabled(validation):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                out["value"] = float(elbo.loss(model, guide))
            except (AssertionError, NotImplementedError, ValueError) as err:
                out["error"] = f"{type(err).__name__}: {err}".rstrip(": ")
    out["warnings"] = [(w.category.__name__, str(w.message)) for w in caught]
    return out


def mean_field_behaviour(cases=MEAN_FIELD_CASES) -> list:
    """For each toy program: ``(case, Trace_ELBO result, TraceMeanField_ELBO result)`` (see :func:`run_loss`)."""
    return [
        (case, run_loss(Trace_ELBO(), m, g, v), run_loss(TraceMeanField_ELBO(), m, g, v)) for case, m, g, v in cases
    ]


def describe_outcome(result, width=90, warning_width=50) -> str:
    """A short text for a :func:`run_loss` result: the value or the error, and the first words of each warning."""

    def short(text, n):
        text = " ".join(text.split())
        return text if len(text) <= n else text[: n - 1].rstrip() + "…"

    bits = [f"{result['value']:.4f}" if result["error"] is None else short(result["error"], width)]
    bits += [short(f"{cat}: {msg}", warning_width) for cat, msg in result["warnings"]]
    return "; ".join(bits)


def html_table(header, rows, nowrap=False) -> str:
    """A small HTML table (header cells and rows of cells, already formatted as text or HTML).

    ``nowrap=True`` keeps every data cell on one line (for short numbers).
    """
    style = "padding: 0.15em 0.7em; vertical-align: top;" + (" white-space: nowrap;" if nowrap else "")
    head = "".join(f'<th style="{style}">{h}</th>' for h in header)
    body = "".join("<tr>" + "".join(f'<td style="{style}">{c}</td>' for c in row) + "</tr>" for row in rows)
    return f'<table class="vae-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def site_columns(terms) -> str:
    """A narrow HTML table of a ``decompose`` result's sites: name, role, scale in model / guide, log p, log q."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.1f}" if abs(v) >= 1000 else f"{v:.4g}"
        return "–" if v is None else str(v)

    rows = [
        [
            f"<code>{r.name}</code>",
            r.role,
            fmt(r.scale) + ("" if r.guide_scale is None else " / " + fmt(r.guide_scale)),
            fmt(r.log_p),
            fmt(r.log_q),
        ]
        for r in terms.sites
    ]
    return html_table(["site", "role", "scale p / q", "log p", "log q"], rows, nowrap=True)


def flat_grads(module) -> torch.Tensor:
    """All gradients of a module as one vector (zeros where a parameter got none)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in module.parameters()])


def pyro_grads(elbo, vae, x, seed, **kwargs) -> torch.Tensor:
    """The gradient of ``elbo.differentiable_loss`` with respect to the VAE's weights."""
    vae.zero_grad()
    with float64(), private_param_store(), seeded(seed):
        elbo.differentiable_loss(make_model(vae), make_guide(vae), x, **kwargs).backward()
    grads = flat_grads(vae)
    vae.zero_grad()
    return grads


def torch_grads(vae, x, seed, kl="closed-form", detach_kl=False, divide_by=1.0) -> torch.Tensor:
    """The gradient of the PyTorch loss ``(BCE(sum) + KL) / divide_by`` on the stream ``seed``."""
    vae.zero_grad()
    with float64(), seeded(seed):
        logits, mu, logvar, z, eps = vae(x)
        kls = kl_closed_form(mu, logvar) if kl == "closed-form" else kl_monte_carlo(z, eps, logvar)
        kls = kls.detach() if detach_kl else kls
        ((bce_sum(logits, x) + kls.sum()) / divide_by).backward()
    grads = flat_grads(vae)
    vae.zero_grad()
    return grads


def num_gradients(variant=None):
    """Both pairs of gradients (Monte Carlo KL, closed-form KL) as one vector each."""
    vae, x = build_vae(), digits()
    lhs = torch.cat([pyro_grads(Trace_ELBO(), vae, x, seed=13), pyro_grads(TraceMeanField_ELBO(), vae, x, seed=14)])
    opts = {"detach_kl": variant == "kl-detached", "divide_by": x.numel() if variant == "mean-reduced" else 1.0}
    rhs = torch.cat([torch_grads(vae, x, 13, kl="monte-carlo", **opts), torch_grads(vae, x, 14, **opts)])
    return exact(lhs, rhs)


register(
    Identity(
        id="vae-gradients-equal",
        chapter=CHAPTER,
        label="vae-gradients-equal",
        statement=r"\begin{aligned}"
        r"\nabla_{\theta,\phi}\,\texttt{Trace\_ELBO} &= "
        r"\nabla_{\theta,\phi}\big(\mathrm{BCE} + \widehat{\mathrm{KL}}\big),\\"
        r"\nabla_{\theta,\phi}\,\texttt{TraceMeanField\_ELBO} &= "
        r"\nabla_{\theta,\phi}\big(\mathrm{BCE} + \mathrm{KL}\big)"
        r"\end{aligned}",
        numeric=num_gradients,
        wrong=("kl-detached", "mean-reduced"),
        summary="the gradients Pyro's ELBOs give the VAE's weights are those of the two PyTorch losses",
    )
)


def scaled_twin(vae, beta_model=True, beta_guide=True):
    """The Pyro twin with the beta line kept in the model and/or the guide."""
    return make_model(vae, scale_latent=beta_model), make_guide(vae, scale_latent=beta_guide)


def num_mean_reduced(variant=None):
    """PyTorch's mean-reduced loss against TraceMeanField_ELBO with beta = D, divided by N D."""
    vae, x = build_vae(), digits()
    n, d = x.shape
    with float64(), torch.no_grad(), seeded(15):
        logits, mu, logvar, _, _ = vae(x)
        lhs = F.binary_cross_entropy_with_logits(logits, x, reduction="mean") + kl_closed_form(mu, logvar).mean()
    beta = 1.0 if variant == "beta-one" else float(d)
    rhs = pyro_loss(TraceMeanField_ELBO(), vae, x, seed=15, beta=beta) / (n * d)
    return exact(float(lhs), rhs)


register(
    Identity(
        id="vae-mean-reduced-loss",
        chapter=CHAPTER,
        label="vae-mean-reduced-loss",
        statement=r"\begin{aligned}"
        r"&\tfrac{1}{ND}\sum_{n,d}\mathrm{BCE}_{nd} + \tfrac1N\sum_n \mathrm{KL}_n\\"
        r"&\qquad = \tfrac{1}{ND}\,\big[\texttt{TraceMeanField\_ELBO().loss with } \beta = D\big]"
        r"\end{aligned}",
        numeric=num_mean_reduced,
        wrong=("beta-one",),
        summary="a per-pixel mean BCE plus a per-example KL is a beta-VAE with beta = D, scaled by 1/(ND)",
    )
)


# ------------------------------------------------------------ optimizers and scale
#: learning rates and number of steps of the optimizer checks
SGD_LR, ADAM_LR, OPT_STEPS, ADAM_EPS = 0.5, 0.01, 5, 1e-8


def flat_params(module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def train_pyro_steps(vae, x, optim, steps, seed, elbo=None, **kwargs):
    """``steps`` SVI steps on the Pyro twin of ``vae`` (its weights are trained in place); the losses."""
    elbo = TraceMeanField_ELBO() if elbo is None else elbo
    with float64(), private_param_store(), seeded(seed):
        svi = SVI(make_model(vae), make_guide(vae), optim, elbo)
        return [svi.step(x, **kwargs) for _ in range(steps)]


def train_torch_steps(vae, x, optimizer, steps, seed, divide_by=1.0):
    """``steps`` optimizer steps on the PyTorch loss ``(BCE(sum) + KL) / divide_by``; the losses."""
    losses = []
    with float64(), seeded(seed):
        for _ in range(steps):
            optimizer.zero_grad()
            loss = vae_loss(vae, x) / divide_by
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    return losses


def sgd_pair(pyro_lr, torch_lr, steps=OPT_STEPS, seed=16):
    """Pyro SGD on the summed loss and torch SGD on the mean loss from the same weights: their weights after.

    If the Pyro run diverges (the encoder's scale underflows to 0 and the guide's Normal
    refuses it), its weights are reported as infinite.
    """
    x = digits()
    a, b = build_vae(), build_vae()
    try:
        train_pyro_steps(a, x, pyro.optim.SGD({"lr": pyro_lr}), steps, seed)
    except ValueError:
        return torch.full_like(flat_params(a), math.inf), flat_params(b)
    train_torch_steps(b, x, torch.optim.SGD(b.parameters(), lr=torch_lr), steps, seed, divide_by=x.numel())
    return flat_params(a), flat_params(b)


def num_sgd(variant=None):
    c = digits().numel()
    pyro_lr = SGD_LR if variant == "same-lr" else SGD_LR / c
    return exact(*sgd_pair(pyro_lr, SGD_LR))


register(
    Identity(
        id="vae-sgd-lr-scaling",
        chapter=OPTIONS,
        label="vae-sgd-lr-scaling",
        statement=r"\mathrm{SGD}\big(ND\,f,\ \eta/(ND)\big) = \mathrm{SGD}\big(f,\ \eta\big)",
        numeric=num_sgd,
        wrong=("same-lr",),
        summary="SGD on Pyro's summed loss needs the mean-loss learning rate divided by N D",
    )
)


def adam_pair(pyro_lr, pyro_eps, torch_lr=ADAM_LR, torch_eps=ADAM_EPS, steps=OPT_STEPS, seed=17):
    """Pyro Adam on the summed loss and torch Adam on the mean loss from the same weights: their weights after."""
    x = digits()
    a, b = build_vae(), build_vae()
    train_pyro_steps(a, x, pyro.optim.Adam({"lr": pyro_lr, "eps": pyro_eps}), steps, seed)
    opt = torch.optim.Adam(b.parameters(), lr=torch_lr, eps=torch_eps)
    train_torch_steps(b, x, opt, steps, seed, divide_by=x.numel())
    return flat_params(a), flat_params(b)


def num_adam(variant=None):
    c = digits().numel()
    pyro_lr = ADAM_LR / c if variant == "lr-divided-by-nd" else ADAM_LR
    return exact(*adam_pair(pyro_lr, ADAM_EPS * c))


register(
    Identity(
        id="vae-adam-scale-invariance",
        chapter=OPTIONS,
        label="vae-adam-scale-invariance",
        statement=r"\mathrm{Adam}\big(ND\,f,\ \eta,\ ND\,\delta\big) = \mathrm{Adam}\big(f,\ \eta,\ \delta\big)",
        numeric=num_adam,
        wrong=("lr-divided-by-nd",),
        summary="Adam takes the same steps on the summed and the mean loss (with eps scaled alike)",
    )
)


def adam_moves(pyro_lr, steps=OPT_STEPS, seed=17) -> torch.Tensor:
    """How far each weight moves in ``steps`` Adam steps (default eps) on the summed loss at ``pyro_lr``."""
    start = flat_params(build_vae())
    moved, _ = adam_pair(pyro_lr, ADAM_EPS, steps=steps, seed=seed)
    return (moved - start).abs()


def num_adam_lr_divided(variant=None):
    """Claim: with the SGD rule (lr / ND) Adam on the summed loss moves every weight less than the
    median weight moves at the undivided rate. Wrong variant ``same-lr`` keeps the rate."""
    c = digits().numel()
    lr = ADAM_LR if variant == "same-lr" else ADAM_LR / c
    return inequality(
        float(adam_moves(lr).max()),
        float(adam_moves(ADAM_LR).median()),
        "<",
        lhs_is=f"largest |w - w_start| after {OPT_STEPS} Adam steps on the summed loss at lr / ND"
        if variant != "same-lr"
        else f"largest |w - w_start| after {OPT_STEPS} Adam steps on the summed loss at lr",
        rhs_is=f"median |w - w_start| after {OPT_STEPS} Adam steps on the summed loss at lr",
    )


register(
    Identity(
        id="vae-adam-lr-divided-freezes",
        kind="claim",
        chapter=OPTIONS,
        label=None,
        statement=r"\max_i |\Delta w_i|\big(\mathrm{Adam},\ \eta/(ND)\big)"
        r" < \operatorname{median}_i |\Delta w_i|\big(\mathrm{Adam},\ \eta\big)",
        numeric=num_adam_lr_divided,
        wrong=("same-lr",),
        summary="the SGD rule applied to Adam (lr divided by ND) nearly freezes every weight",
    )
)


#: Pyro's ClippedAdam: gradient clamp and weight decay of the check (the clamp is Pyro's default)
CLIP_NORM, WEIGHT_DECAY = 10.0, 1e-3


def clipped_adam_pair(sum_scale=None, steps=OPT_STEPS, seed=17, variant=None):
    """Pyro's ``ClippedAdam`` on the summed loss (through SVI) and on the mean loss (a plain torch loop).

    The mean-loss run uses ``lr``, ``eps``, ``clip_norm`` and ``weight_decay`` =
    ``ADAM_LR, ADAM_EPS, CLIP_NORM, WEIGHT_DECAY``; the summed-loss run multiplies ``eps``,
    ``clip_norm`` and ``weight_decay`` by ``sum_scale`` (default N D, the factor between the losses).
    Variants leave one of them at the mean-loss value: ``default-clip``, ``weight-decay-unscaled``.
    Returns the weights after ``steps`` steps of each run.
    """
    from pyro.optim.clipped_adam import ClippedAdam

    x = digits()
    c = float(x.numel()) if sum_scale is None else float(sum_scale)
    mean_args = {"lr": ADAM_LR, "eps": ADAM_EPS, "clip_norm": CLIP_NORM, "weight_decay": WEIGHT_DECAY}
    sum_args = dict(mean_args, eps=c * ADAM_EPS, clip_norm=c * CLIP_NORM, weight_decay=c * WEIGHT_DECAY)
    if variant == "default-clip":
        sum_args["clip_norm"] = CLIP_NORM
    if variant == "weight-decay-unscaled":
        sum_args["weight_decay"] = WEIGHT_DECAY
    a, b = build_vae(), build_vae()
    train_pyro_steps(a, x, pyro.optim.ClippedAdam(sum_args), steps, seed)
    train_torch_steps(b, x, ClippedAdam(b.parameters(), **mean_args), steps, seed, divide_by=x.numel())
    return flat_params(a), flat_params(b)


def num_clipped_adam(variant=None):
    return exact(
        *clipped_adam_pair(variant=variant),
        lhs_is="Euclidean norm of the weights after ClippedAdam on the summed loss (eps, clip_norm, weight_decay x ND)",
        rhs_is="Euclidean norm of the weights after ClippedAdam on the per-pixel mean loss",
    )


register(
    Identity(
        id="vae-clipped-adam-scaling",
        chapter=OPTIONS,
        label="vae-clipped-adam-scaling",
        statement=r"\begin{aligned}"
        r"&\mathrm{ClippedAdam}\big(ND\,f;\ \eta,\ ND\,\delta,\ ND\,\kappa,\ ND\,w\big)\\"
        r"&\qquad = \mathrm{ClippedAdam}\big(f;\ \eta,\ \delta,\ \kappa,\ w\big)"
        r"\end{aligned}",
        numeric=num_clipped_adam,
        wrong=("default-clip", "weight-decay-unscaled"),
        summary="Pyro's ClippedAdam follows the mean-loss run only with eps, the clamp and weight decay"
        " all multiplied by the factor between the losses",
    )
)


def clipped_fraction(seed=17) -> float:
    """The fraction of the summed loss's first gradient entries that ClippedAdam's default clamp (10) changes."""
    g = torch_grads(build_vae(), digits(), seed=seed)
    return float((g.abs() > CLIP_NORM).double().mean())


# ------------------------------------------------------------------ minibatches
def num_subsample_scaling(variant=None):
    """Trace_ELBO with subsample_size=B against (N/B) (BCE + KL) of the same batch and eps."""
    vae, x = build_vae(), digits()
    loss = pyro_loss(Trace_ELBO(), vae, x, seed=18, batch_size=BATCH)
    t = torch_terms(vae, x, seed=18, batch_size=BATCH)
    scale = 1.0 if variant == "no-rescaling" else t["scale"]
    return exact(loss, scale * float(t["bce"].sum() + t["kl_mc"].sum()))


register(
    Identity(
        id="vae-subsample-scaling",
        chapter=CHAPTER,
        label="vae-subsample-scaling",
        statement=r"\begin{aligned}"
        r"\texttt{Trace\_ELBO().loss} &= \frac{N}{B}\sum_{n \in \mathcal I}\Big[\sum_d \mathrm{BCE}_{nd}\\"
        r"&\qquad\qquad + \log q(z_n \mid x_n) - \log p(z_n)\Big],\\"
        r"\mathcal I &= \text{the plate's random batch of } B \text{ indices}"
        r"\end{aligned}",
        numeric=num_subsample_scaling,
        wrong=("no-rescaling",),
        summary="plate subsampling multiplies the batch's reconstruction and local KL by N/B",
    )
)

#: how many random batches the unbiasedness check averages
SUBSAMPLE_DRAWS = 400


def minibatch_minus_full(vae, x, seed, rescale=True):
    """Pyro's minibatch loss minus a full-data loss that uses the same eps on the batch's digits.

    The batch and its eps are re-drawn on the torch side from the same seed (the per-batch
    identity shows they are Pyro's); the other digits get fresh eps.
    """
    loss = pyro_loss(Trace_ELBO(), vae, x, seed=seed, batch_size=BATCH)
    t = torch_terms(vae, x, seed=seed, batch_size=BATCH)
    with float64(), torch.no_grad(), seeded(seed + 10**6):
        eps = torch.randn(len(x), Z_DIM, dtype=torch.float64)
        eps[t["idx"]] = t["eps"]
        mu, logvar = vae.encoder(x)
        z = mu + eps * torch.exp(0.5 * logvar)
        full = bce_sum(vae.decoder(z), x) + kl_monte_carlo(z, eps, logvar).sum()
    return (loss if rescale else loss / t["scale"]) - float(full)


@functools.cache
def subsample_differences(rescale=True, draws=SUBSAMPLE_DRAWS) -> tuple:
    """``draws`` values of :func:`minibatch_minus_full` (seeds 1000, 1001, ...); computed once."""
    vae, x = build_vae(), digits()
    return tuple(minibatch_minus_full(vae, x, 1000 + i, rescale) for i in range(draws))


def num_subsample_unbiased(variant=None):
    """The differences average to 0 within 5 standard errors; the bound is judged against the full-data loss."""
    diffs = subsample_differences(rescale=variant != "no-rescaling")
    scale = pyro_loss(Trace_ELBO(), build_vae(), digits(), seed=19)
    return monte_carlo(
        diffs,
        0.0,
        scale=abs(scale),
        lhs_is=f"mean over {len(diffs)} random batches of (left side - right side): the minibatch loss minus"
        " the full-data loss on the same eps for the batch's digits",
        rhs_is="0, the difference of the two sides in expectation",
    )


register(
    Identity(
        id="vae-subsample-unbiased",
        chapter=CHAPTER,
        label="vae-subsample-unbiased",
        statement=r"\begin{aligned}"
        r"&\mathbb E_{\mathcal I,\varepsilon}\big[\texttt{Trace\_ELBO().loss with subsample\_size=}B\big]\\"
        r"&\qquad = \mathbb E_{\varepsilon}\big[\texttt{Trace\_ELBO().loss on all } N\big]"
        r"\end{aligned}",
        numeric=num_subsample_unbiased,
        wrong=("no-rescaling",),
        summary="averaged over Pyro's random batches, the rescaled minibatch loss is the full-data loss",
    )
)


# ------------------------------------------------------------------ beta
def beta_losses(beta_model, beta_guide, beta=BETA, seed=20):
    """Trace_ELBO and TraceMeanField_ELBO losses with the beta line in the model and/or the guide."""
    vae, x = build_vae(), digits()
    model, guide = scaled_twin(vae, beta_model, beta_guide)
    return [
        pyro_loss(e, vae, x, seed=seed, model=model, guide=guide, beta=beta)
        for e in (Trace_ELBO(), TraceMeanField_ELBO())
    ]


def num_beta_both(variant=None):
    """beta in both model and guide: BCE + beta (log q - log p) and BCE + beta KL."""
    vae, x = build_vae(), digits()
    sides = {"model-only": (True, False), "guide-only": (False, True)}.get(variant, (True, True))
    lhs = beta_losses(*sides)
    t = torch_terms(vae, x, seed=20)
    rhs = [float(t["bce"].sum() + BETA * t["kl_mc"].sum()), float(t["bce"].sum() + BETA * t["kl_closed"].sum())]
    return exact(lhs, rhs)


register(
    Identity(
        id="vae-beta-both-sides",
        chapter=CHAPTER,
        label="vae-beta-both-sides",
        statement=r"\begin{aligned}"
        r"&\texttt{poutine.scale}(\beta) \text{ on } z \text{ in the model and in the guide:}\\"
        r"&\qquad \texttt{Trace\_ELBO} = \mathrm{BCE} + \beta\,\widehat{\mathrm{KL}},\\"
        r"&\qquad \texttt{TraceMeanField\_ELBO} = \mathrm{BCE} + \beta\,\mathrm{KL}"
        r"\end{aligned}",
        numeric=num_beta_both,
        wrong=("model-only", "guide-only"),
        summary="scaling the latent site by beta in both programs gives the beta-VAE loss",
    )
)


def sym_beta_one_sided(variant=None):
    """Expected per-coordinate losses of one-sided scaling (SymPy integrates over q) against the closed forms."""
    kl = kl_closed_symbolic()
    entropy = sp.log(2 * sp.pi * sp.E * s**2) / 2
    cross_entropy = sp.log(2 * sp.pi) / 2 + (m**2 + s**2) / 2
    # E_q is linear: E_q[a log q + b log p] = a E_q[log q] + b E_q[log p]
    model_only = expected_log_q() - beta_ * expected_log_prior()
    guide_only = beta_ * expected_log_q() - expected_log_prior()
    if variant == "as-if-both-sides":
        return (model_only - beta_ * kl) + (guide_only - beta_ * kl)
    model_only_claim = beta_ * kl - (1 - beta_) * entropy
    guide_only_claim = beta_ * kl + (1 - beta_) * cross_entropy
    return (model_only - model_only_claim) + (guide_only - guide_only_claim)


def num_beta_one_sided(variant=None):
    """Model-only and guide-only beta: the four losses against their torch formulas on the same eps."""
    vae, x = build_vae(), digits()
    lhs = beta_losses(True, False) + beta_losses(False, True)
    t = torch_terms(vae, x, seed=20)
    bce, lq, lp, kl = t["bce"].sum(), t["log_q"].sum(), t["log_p"].sum(), t["kl_closed"].sum()
    if variant == "as-if-both-sides":
        rhs = [bce + BETA * (lq - lp), bce + BETA * kl] * 2
    else:
        rhs = [bce + lq - BETA * lp, bce + kl, bce + BETA * lq - lp, bce + BETA * kl]
    return exact(lhs, [float(r) for r in rhs])


register(
    Identity(
        id="vae-beta-one-sided",
        chapter=CHAPTER,
        label="vae-beta-one-sided",
        statement=r"\begin{aligned}"
        r"\text{model only:}\quad \texttt{Trace\_ELBO} &= \mathrm{BCE} + \log q - \beta\log p,\\"
        r"\mathbb E_q[\texttt{Trace\_ELBO}] &= -\mathrm{rec} + \beta\,\mathrm{KL} - (1-\beta)\,\mathrm H[q],\\"
        r"\texttt{TraceMeanField\_ELBO} &= \mathrm{BCE} + \mathrm{KL};\\[6pt]"
        r"\text{guide only:}\quad \texttt{Trace\_ELBO} &= \mathrm{BCE} + \beta\log q - \log p,\\"
        r"\mathbb E_q[\texttt{Trace\_ELBO}] &= -\mathrm{rec} + \beta\,\mathrm{KL} + (1-\beta)\,\mathrm H[q, p],\\"
        r"\texttt{TraceMeanField\_ELBO} &= \mathrm{BCE} + \beta\,\mathrm{KL}"
        r"\end{aligned}",
        symbolic=sym_beta_one_sided,
        numeric=num_beta_one_sided,
        wrong=("as-if-both-sides",),
        summary="scaling only one side is not a beta-VAE, and the two ELBO classes then disagree",
    )
)


# ------------------------------------------------------------------ particles
#: particles and batch of the num_particles check (100 digits x 4 latents)
PARTICLES, PARTICLE_BATCH = 8, 100


def particle_losses(vectorize, particles=PARTICLES, n=PARTICLE_BATCH, seed=21):
    """Trace_ELBO(num_particles=S, vectorize_particles=v).loss on the first n digits."""
    vae, x = build_vae(), digits()[:n]
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=vectorize, max_plate_nesting=1)
    return pyro_loss(elbo, vae, x, seed=seed)


def sequential_particle_terms(vae, x, particles, seed):
    """The S sequential draws of ``vectorize_particles=False`` on one stream (helper of the check)."""
    with float64(), torch.no_grad(), seeded(seed):
        out = []
        for _ in range(particles):
            mu, logvar = vae.encoder(x)
            eps = torch.randn_like(mu)
            z = mu + eps * torch.exp(0.5 * logvar)
            out.append(float(bce_sum(vae.decoder(z), x) + kl_monte_carlo(z, eps, logvar).sum()))
        return torch.tensor(out, dtype=torch.float64)


def num_particles(variant=None):
    """Both Pyro losses against the particle average of the torch terms on the same draws."""
    vae, x = build_vae(), digits()[:PARTICLE_BATCH]
    lhs = [particle_losses(False), particle_losses(True)]
    seq = sequential_particle_terms(vae, x, PARTICLES, seed=21)
    t = torch_terms(vae, x, seed=21, particles=PARTICLES)
    vec = (t["bce"] + t["kl_mc"]).sum(-1)
    div = 1.0 if variant == "sum-over-particles" else float(PARTICLES)
    return exact(lhs, [float(seq.sum()) / div, float(vec.sum()) / div])


register(
    Identity(
        id="vae-particles-average",
        chapter=OPTIONS,
        label="vae-particles-average",
        statement=r"\begin{aligned}"
        r"\texttt{loss}_S &= \frac1S\sum_{k=1}^S"
        r"\Big[\mathrm{BCE}^{(k)} + \log q(z^{(k)}) - \log p(z^{(k)})\Big]\\"
        r"&\quad \text{with or without } \texttt{vectorize\_particles}"
        r"\end{aligned}",
        numeric=num_particles,
        wrong=("sum-over-particles",),
        summary="num_particles averages S single-draw losses, drawn one by one or as one block",
    )
)


def time_particles(particles=32, n=None, repeats=5, seed=22, keep_all=False) -> dict:
    """Seconds per ``Trace_ELBO(num_particles=S).loss`` on the first ``n`` digits (default all),
    sequential and vectorized (best of ``repeats``; with ``keep_all``, the list of all runs)."""
    vae, x = build_vae(), digits()
    x = x if n is None else x[:n]
    out = {}
    for v in (False, True):
        elbo = Trace_ELBO(num_particles=particles, vectorize_particles=v, max_plate_nesting=1)
        runs = []
        for r in range(repeats):
            t0 = time.perf_counter()
            pyro_loss(elbo, vae, x, seed=seed + r)
            runs.append(time.perf_counter() - t0)
        out["vectorized" if v else "sequential"] = runs if keep_all else min(runs)
    return out


# ------------------------------------------------------------------ training both
#: training: epochs, minibatch size, Adam learning rate, seed of batches and eps
EPOCHS, TRAIN_BATCH, TRAIN_LR, TRAIN_SEED = 100, 128, 3e-3, 23


def steps_per_epoch(n, batch=TRAIN_BATCH) -> int:
    return n // batch


def train_pyro(vae, x, epochs=EPOCHS, batch=TRAIN_BATCH, lr=TRAIN_LR, seed=TRAIN_SEED, elbo=None):
    """SVI with Adam and plate subsampling; trains ``vae`` in place.

    Returns the per-step losses and a copy of the weights after each epoch (the first is
    the initial one).
    """
    check_digits(x)
    elbo = TraceMeanField_ELBO() if elbo is None else elbo
    model, guide = make_model(vae), make_guide(vae)
    losses, snapshots = [], [copy.deepcopy(vae.state_dict())]
    with float64(), private_param_store(), seeded(seed):
        svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), elbo)
        for _ in range(epochs):
            for _ in range(steps_per_epoch(len(x), batch)):
                losses.append(svi.step(x, batch_size=batch))
            snapshots.append(copy.deepcopy(vae.state_dict()))
    return losses, snapshots


def train_torch(vae, x, epochs=EPOCHS, batch=TRAIN_BATCH, lr=TRAIN_LR, seed=TRAIN_SEED):
    """The usual PyTorch loop (Adam, BCE(sum) + KL of each batch); batches drawn as Pyro's plate draws them."""
    check_digits(x)
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    losses, snapshots = [], [copy.deepcopy(vae.state_dict())]
    with float64(), seeded(seed):
        for _ in range(epochs):
            for _ in range(steps_per_epoch(len(x), batch)):
                idx = torch.randperm(len(x))[:batch]
                opt.zero_grad()
                loss = vae_loss(vae, x[idx])
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            snapshots.append(copy.deepcopy(vae.state_dict()))
    return losses, snapshots


def with_weights(state_dict) -> VAE:
    """A fresh float64 VAE holding ``state_dict``."""
    vae = build_vae()
    vae.load_state_dict(state_dict)
    return vae


def torch_split(vae, x, seed=24) -> dict:
    """Per data point: reconstruction log p(x|z) (one draw), closed-form KL and their difference."""
    t = torch_terms(vae, x, seed=seed)
    rec, kl = -float(t["bce"].sum()) / len(x), float(t["kl_closed"].sum()) / len(x)
    return {"reconstruction": rec, "kl": kl, "elbo": rec - kl}


def decoded_samples(vae, n=32, seed=25) -> torch.Tensor:
    """Pixel probabilities sigmoid(decoder(z)) for n draws z ~ N(0, I), shaped (n, 8, 8)."""
    with float64(), torch.no_grad(), seeded(seed):
        z = torch.randn(n, Z_DIM, dtype=torch.float64)
        return torch.sigmoid(vae.decoder(z)).reshape(n, 8, 8)
