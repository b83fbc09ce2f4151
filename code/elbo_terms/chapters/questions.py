r"""Part III, "Questions": the questions Pyro users ask about this loss, answered and checked.

One section per theme page (``questions-*.md``). Every function here runs the installed
Pyro on a tiny model (most reuse the conjugate model of :mod:`.conjugate`); the identities
and claims registered below back the equations and comparisons of the question pages.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings

import pyro
import pyro.distributions as dist
import sympy as sp
import torch
from pyro import poutine
from pyro.infer import (
    SVI,
    JitTrace_ELBO,
    JitTraceEnum_ELBO,
    JitTraceGraph_ELBO,
    JitTraceMeanField_ELBO,
    RenyiELBO,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceGraph_ELBO,
    TraceMeanField_ELBO,
)
from pyro.nn import PyroModule, PyroParam
from torch.distributions import constraints

from .._util import float64, seeded, t64
from ..build.identity import Identity, exact, inequality, monte_carlo, register
from . import conjugate as C

LOSS_PAGE = "questions-loss-values"
MASKS_PAGE = "questions-masks"
DISCRETE_PAGE = "questions-discrete"
BOUNDS_PAGE = "questions-bounds"
CUSTOM_PAGE = "questions-custom"
GUIDES_PAGE = "questions-guides"


@contextlib.contextmanager
def quiet():
    """Silence Pyro's and the JIT's warnings inside a check (the pages show the ones that matter)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def caught_warnings(fn, *args, **kwargs) -> list[str]:
    """Run ``fn`` with validation on and return the first line of every warning it raised."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fn(*args, **kwargs)
    return [str(w.message).splitlines()[0] for w in record if not issubclass(w.category, torch.jit.TracerWarning)]


def first_error_line(fn, *args, **kwargs) -> str | None:
    """Run ``fn``; return ``"<ErrorType>: <first line of its message>"`` (plus Pyro's "Expected ..." line), or None."""
    try:
        with quiet():
            fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001  (the pages show which error Pyro raises)
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        text = lines[0]
        detail = next((ln for ln in lines[1:] if ln.startswith("Expected")), None)
        if text.endswith(":") and detail:
            text += " " + detail.split(", but found")[0]
        return f"{type(exc).__name__}: {text}"
    return None


def _normal_log_prob(v, loc, scale) -> float:
    return float(dist.Normal(t64(loc), t64(scale)).log_prob(t64(v)).sum())


def param_guide(loc, scale):
    """q(z) = N(m, s^2) with m and s as ``pyro.param``s initialised at ``loc`` and ``scale``."""
    loc, scale = float(loc), float(scale)

    def guide(x):
        m = pyro.param("q_m", lambda: t64(loc))
        s = pyro.param("q_s", lambda: t64(scale), constraint=constraints.positive)
        pyro.sample("z", dist.Normal(m, s))

    return guide


# ======================================================================= loss values
#: the ELBO classes whose every method returns one draw of -(log p(x, z) - log q(z))
SAMPLE_PATH_CLASSES = (
    Trace_ELBO,
    TraceGraph_ELBO,
    TraceEnum_ELBO,
    JitTrace_ELBO,
    JitTraceGraph_ELBO,
    JitTraceEnum_ELBO,
)
MEAN_FIELD_CLASSES = (TraceMeanField_ELBO, JitTraceMeanField_ELBO)
METHODS = ("loss", "loss_and_grads", "differentiable_loss", "svi.evaluate_loss", "svi.step")


def _call(elbo, method, model, guide, x):
    if method == "svi.evaluate_loss":
        return SVI(model, guide, pyro.optim.SGD({"lr": 0.0}), elbo).evaluate_loss(x)
    if method == "svi.step":
        return SVI(model, guide, pyro.optim.SGD({"lr": 0.0}), elbo).step(x)
    return getattr(elbo, method)(model, guide, x)


def loss_table(classes=SAMPLE_PATH_CLASSES + MEAN_FIELD_CLASSES, seed=0) -> dict:
    """What every method of every ELBO class returns, with q(z) = the exact posterior.

    Keys are ``(class name, method)``; values are floats, or the error's first line when the
    class has no such method. At the posterior, log p(x, z) - log q(z) = log p(x) for every z.
    One ELBO object per class serves all its methods (a JIT class compiles once).
    """
    out = {}
    with float64(), quiet():
        x = C.data()
        post = C.posterior(x)
        for cls in classes:
            pyro.clear_param_store()
            elbo = cls(max_plate_nesting=1)
            guide = param_guide(post.loc, post.scale)
            for method in METHODS:
                try:
                    with seeded(seed):
                        out[cls.__name__, method] = float(_call(elbo, method, C.model, guide, x))
                except AttributeError as exc:
                    out[cls.__name__, method] = f"AttributeError: {exc}"
        pyro.clear_param_store()
    return out


#: short column headings for :func:`format_loss_table`
METHOD_HEADINGS = ("loss", "l_and_g", "diff_loss", "evaluate", "step")


def format_loss_table(table: dict) -> str:
    """The table of :func:`loss_table` as text: one row per class, one column per method.

    Columns: loss, loss_and_grads, differentiable_loss, svi.evaluate_loss, svi.step.
    """
    lines = [" " * 23 + "".join(f"{h:>10s}" for h in METHOD_HEADINGS)]
    for cls in dict.fromkeys(name for name, _ in table):
        cells = [table[cls, m] for m in METHODS]
        lines.append(
            f"{cls:23s}" + "".join(f"{v:10.4f}" if isinstance(v, float) else f"{'(none)':>10s}" for v in cells)
        )
    return "\n".join(lines)


def num_loss_sign(variant=None):
    """Every method of the sample-path classes returns -log p(x) at the posterior guide."""
    table = loss_table(SAMPLE_PATH_CLASSES)
    values = [v for v in table.values() if isinstance(v, float)]
    target = C.log_evidence() * (1 if variant == "elbo-not-loss" else -1)
    return exact(
        t64(values),
        torch.full((len(values),), target, dtype=torch.float64),
        lhs_is=f"Euclidean norm of the {len(values)} values the methods return",
        rhs_is=f"Euclidean norm of {len(values)} copies of -log p(x)",
    )


register(
    Identity(
        id="q-loss-sign",
        chapter=LOSS_PAGE,
        label="q-loss-sign",
        statement=r"\texttt{loss} = \texttt{loss\_and\_grads} = \texttt{differentiable\_loss}"
        r" = \texttt{evaluate\_loss} = \texttt{step} = -\big(\log p(x, z) - \log q(z)\big)",
        numeric=num_loss_sign,
        wrong=("elbo-not-loss",),
        summary="every method of Trace, TraceGraph, TraceEnum and their JIT variants returns minus an ELBO draw",
    )
)

MEAN_FIELD_DRAWS = 400


def mean_field_losses(cls=TraceMeanField_ELBO, draws=MEAN_FIELD_DRAWS, seed=1) -> torch.Tensor:
    """``draws`` values of ``cls().loss`` with q(z) = the exact posterior."""
    with float64(), quiet():
        x = C.data()
        post = C.posterior(x)
        guide = C.make_guide(float(post.loc), float(post.scale))
        elbo = cls(max_plate_nesting=1)
        with seeded(seed):
            return t64([elbo.loss(C.model, guide, x) for _ in range(draws)])


def num_mean_field_loss(variant=None):
    target = C.log_evidence() * (1 if variant == "elbo-not-loss" else -1)
    return monte_carlo(mean_field_losses(), target, lhs_is="mean of TraceMeanField_ELBO().loss", rhs_is="-log p(x)")


register(
    Identity(
        id="q-mean-field-loss-sign",
        chapter=LOSS_PAGE,
        label="q-mean-field-loss-sign",
        statement=r"\mathbb E\big[\texttt{TraceMeanField\_ELBO().loss}\big] = -\mathcal L(q)",
        numeric=num_mean_field_loss,
        wrong=("elbo-not-loss",),
        summary="TraceMeanField_ELBO's loss is minus an (other) unbiased ELBO estimate",
    )
)


# ---- per-example values on digits
def digits(binarize=True) -> torch.Tensor:
    """scikit-learn's 8x8 digits in [0, 1] (grey levels / 16), or binarized at one half."""
    from sklearn.datasets import load_digits

    x = torch.as_tensor(load_digits().data, dtype=torch.float64) / 16.0
    return (x > 0.5).to(torch.float64) if binarize else x


def pixel_mean_model(x, probs):
    """A 'VAE' whose decoder ignores z and predicts each pixel's mean: the baseline to beat."""
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(t64(0.0), t64(1.0)).expand([2]).to_event(1))
        pyro.sample("x", dist.Bernoulli(probs=probs.expand(len(x), -1)).to_event(1), obs=x)


def prior_guide(x, probs):
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(t64(0.0), t64(1.0)).expand([2]).to_event(1))


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """H_b(p) = -p log p - (1 - p) log(1 - p), with 0 log 0 = 0."""
    return -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p))


def per_example_baseline(variant=None):
    """evaluate_loss / N of the pixel-mean decoder with q = prior, and sum_d H_b(mean_d)."""
    with float64():
        x = digits()
        probs = x.mean(0)
        svi = SVI(pixel_mean_model, prior_guide, pyro.optim.Adam({"lr": 0.0}), Trace_ELBO())
        with seeded(0):
            total = svi.evaluate_loss(x, probs)
        per_example = total if variant == "not-divided" else total / len(x)
        return per_example, float(binary_entropy(probs).sum()), len(x)


def num_per_example(variant=None):
    per_example, entropy, _ = per_example_baseline(variant)
    return exact(per_example, entropy, lhs_is="svi.evaluate_loss(x) / N", rhs_is="sum over pixels of H_b(mean)")


register(
    Identity(
        id="q-per-example-baseline",
        chapter=LOSS_PAGE,
        label="q-per-example-baseline",
        statement=r"\frac{\texttt{svi.evaluate\_loss(x)}}{N} = \sum_{d=1}^{D} H_b(\bar x_d)"
        r"\quad\text{(decoder } \bar x,\ q = p(z))",
        numeric=num_per_example,
        wrong=("not-divided",),
        summary="the per-example loss of a decoder that ignores z is the pixels' summed binary entropy",
    )
)

x_, p_ = sp.symbols("x p", positive=True)


def sym_grey(variant=None):
    nll = -(x_ * sp.log(p_) + (1 - x_) * sp.log(1 - p_))
    entropy = -(x_ * sp.log(x_) + (1 - x_) * sp.log(1 - x_))
    kl = x_ * sp.log(x_ / p_) + (1 - x_) * sp.log((1 - x_) / (1 - p_))
    return nll - ((0 if variant == "no-floor" else entropy) + kl)


def grey_level_terms(variant=None):
    """-sum log Bernoulli(x; p) on grey-level digits, against sum H_b(x) + sum KL_b(x || p)."""
    with float64():
        x = digits(binarize=False)
        p = x.mean(0).clamp(1e-3, 1 - 1e-3).expand_as(x)
        nll = -float(dist.Bernoulli(probs=p, validate_args=False).log_prob(x).sum())
        floor = float(binary_entropy(x).sum())
        kl = float(
            (
                torch.special.xlogy(x, x) - x * p.log() + torch.special.xlogy(1 - x, 1 - x) - (1 - x) * (1 - p).log()
            ).sum()
        )
        return nll, floor, kl, len(x)


def num_grey(variant=None):
    nll, floor, kl, _ = grey_level_terms()
    return exact(nll, (0.0 if variant == "no-floor" else floor) + kl)


register(
    Identity(
        id="q-bernoulli-grey-floor",
        chapter=LOSS_PAGE,
        label="q-bernoulli-grey-floor",
        statement=r"-\big[x\log p + (1-x)\log(1-p)\big] = H_b(x) + \mathrm{KL}_b(x\,\|\,p) \ \ge\ H_b(x)",
        symbolic=sym_grey,
        numeric=num_grey,
        wrong=("no-floor",),
        summary="on grey levels the Bernoulli loss cannot go below the grey levels' binary entropy",
    )
)


def grey_level_error() -> str | None:
    """Grey levels observed under a Bernoulli with validation on: Pyro's error."""

    def model(x):
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Bernoulli(probs=x.mean(0).clamp(1e-3, 1 - 1e-3)).to_event(1), obs=x)

    with float64():
        return first_error_line(Trace_ELBO().loss, model, lambda x: None, digits(binarize=False)[:3])


# ---- the joint at the sample need not rise
def joint_and_elbo(sd_factor: float) -> tuple[float, float]:
    """E_q[log p(x, z)] and the ELBO for q = N(mu_n, (sd_factor * posterior sd)^2), in closed form."""
    with float64():
        x = C.data()
        post = C.posterior(x)
        sd = sd_factor * float(post.scale)
        elbo = C.elbo_value(float(post.loc), sd, x)
        entropy = 0.5 * math.log(2 * math.pi * math.e * sd**2)
        return elbo - entropy, elbo


SHARP_FACTOR = 0.1


def num_joint_falls(variant=None):
    joint_sharp, _ = joint_and_elbo(SHARP_FACTOR)
    joint_post, _ = joint_and_elbo(1.0)
    return inequality(
        joint_post,
        joint_sharp,
        ">" if variant == "joint-rises" else "<",
        lhs_is="E_q[log p(x,z)] at q = posterior (the optimum)",
        rhs_is="E_q[log p(x,z)] at the sharp start",
    )


register(
    Identity(
        id="q-joint-falls-as-elbo-rises",
        chapter=LOSS_PAGE,
        label="q-joint-falls",
        kind="claim",
        statement=r"\mathbb E_{q^\star}[\log p(x, z)] < \mathbb E_{q_0}[\log p(x, z)]"
        r"\quad\text{while}\quad \mathcal L(q^\star) > \mathcal L(q_0)",
        numeric=num_joint_falls,
        wrong=("joint-rises",),
        summary="from a too-sharp guide, the ELBO rises to its maximum while E_q[log p(x,z)] falls",
    )
)


def svi_joint_trace(steps=300, seed=0, lr=0.02):
    """Fit q from the sharp start with SVI; per step: the loss and log p(x, z) at the guide's draw."""
    with float64(), quiet():
        x = C.data()
        post = C.posterior(x)
        pyro.clear_param_store()
        guide = param_guide(post.loc, SHARP_FACTOR * float(post.scale))
        svi = SVI(C.model, guide, pyro.optim.Adam({"lr": lr}), Trace_ELBO())
        losses, joints = [], []
        with seeded(seed):
            for _ in range(steps):
                gtr = poutine.trace(guide).get_trace(x)
                mtr = poutine.trace(poutine.replay(C.model, trace=gtr)).get_trace(x)
                joints.append(float(mtr.log_prob_sum()))
                losses.append(svi.step(x))
        s_end = float(pyro.param("q_s"))
        pyro.clear_param_store()
        return t64(losses), t64(joints), s_end


# ============================================================================ masks
NOISE = C.NOISE_SD


def masked_model(x, wrap="none"):
    """The conjugate model; the observe statement optionally under poutine.mask(False) or poutine.block()."""
    z = pyro.sample("z", dist.Normal(t64(0.0), t64(1.0)))
    ctx = {"none": contextlib.nullcontext(), "mask": poutine.mask(mask=False), "block": poutine.block()}[wrap]
    with pyro.plate("data", len(x)), ctx:
        pyro.sample("x", dist.Normal(z, t64(NOISE)), obs=x)


def latent_guide(x, *args):
    pyro.sample("z", dist.Normal(t64(C.GUIDE_MEAN), t64(C.GUIDE_SD)))


def _guide_z(seed, *args):
    with seeded(seed):
        return float(poutine.trace(latent_guide).get_trace(*args).nodes["z"]["value"])


def num_mask_block(variant=None):
    """loss with the observe statement masked, and with it blocked, against -(log p(z) - log q(z))."""
    with float64(), quiet():
        x = C.data()
        losses = []
        for wrap in ("mask", "block"):
            with seeded(5):
                losses.append(Trace_ELBO().loss(masked_model, latent_guide, x, wrap))
        z = _guide_z(5, x)
        rhs = _normal_log_prob(z, 0.0, 1.0) - _normal_log_prob(z, C.GUIDE_MEAN, C.GUIDE_SD)
        if variant == "mask-keeps-likelihood":
            rhs += _normal_log_prob(x, z, NOISE)
        return exact(t64(losses), t64([-rhs, -rhs]))


register(
    Identity(
        id="q-mask-drops-site",
        chapter=MASKS_PAGE,
        label="q-mask-drops-site",
        statement=r"\texttt{mask(False)}\ \text{or}\ \texttt{block()}\ \text{on } x:\quad"
        r"\texttt{loss} = -\big(\log p(z) - \log q(z)\big)",
        numeric=num_mask_block,
        wrong=("mask-keeps-likelihood",),
        summary="masking or blocking an observed site removes its log-likelihood from the loss, nothing else",
    )
)


def blocked_latent_model(x):
    """The conjugate model with the latent z under poutine.block(): replay cannot reach it."""
    with poutine.block():
        z = pyro.sample("z", dist.Normal(t64(0.0), t64(1.0)))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(z, t64(NOISE)), obs=x)
    return z


def blocked_latent_demo(seed=5):
    """The guide's z, the z the blocked model used, and the warnings Pyro gives."""
    with float64():
        x = C.data()
        with seeded(seed):
            gtr = poutine.trace(latent_guide).get_trace(x)
            z_model = poutine.replay(blocked_latent_model, trace=gtr)(x)
        with seeded(seed):
            warns = caught_warnings(Trace_ELBO().loss, blocked_latent_model, latent_guide, x)
        return float(gtr.nodes["z"]["value"]), float(z_model), warns


# ---- NaN entries
def with_missing():
    """The conjugate data with entries 1 and 3 missing (NaN)."""
    x = C.data().clone()
    x[[1, 3]] = float("nan")
    return x


def nan_model(x, use_mask=True):
    """Missing entries filled with 0 (any value in the support) and masked out of the likelihood."""
    missing = x.isnan()
    filled = torch.where(missing, torch.zeros_like(x), x)
    ctx = poutine.mask(mask=~missing) if use_mask else contextlib.nullcontext()
    z = pyro.sample("z", dist.Normal(t64(0.0), t64(1.0)))
    with pyro.plate("data", len(x)), ctx:
        pyro.sample("x", dist.Normal(z, t64(NOISE)), obs=filled)


def num_nan_mask(variant=None):
    """The masked loss on the NaN data against the loss on the observed entries alone."""
    with float64(), quiet():
        x = with_missing()
        with seeded(6):
            masked = Trace_ELBO().loss(nan_model, latent_guide, x, variant != "fill-counted")
        with seeded(6):
            subset = Trace_ELBO().loss(C.model, latent_guide, x[~x.isnan()])
        return exact(masked, subset)


register(
    Identity(
        id="q-nan-mask-subset",
        chapter=MASKS_PAGE,
        label="q-nan-mask-subset",
        statement=r"\texttt{loss}\big(x \text{ with NaNs filled and masked}\big)"
        r" = \texttt{loss}\big(x_{\text{observed}}\big)",
        numeric=num_nan_mask,
        wrong=("fill-counted",),
        summary="filling missing entries and masking them gives the loss of the observed entries alone",
    )
)


def nan_gradient_demo():
    """Masked NaNs without filling: the error with validation, the NaN gradient without."""

    def raw_model(x):
        z = pyro.sample("z", dist.Normal(t64(0.0), t64(1.0)))
        with pyro.plate("data", len(x)), poutine.mask(mask=~x.isnan()):
            pyro.sample("x", dist.Normal(z, t64(NOISE)), obs=x)

    def guide(x):
        pyro.sample("z", dist.Normal(pyro.param("q_m", lambda: t64(0.3)), t64(0.4)))

    with float64():
        x = with_missing()
        pyro.clear_param_store()
        error = first_error_line(Trace_ELBO().differentiable_loss, raw_model, guide, x)
        pyro.enable_validation(False)
        try:
            with seeded(0), quiet():
                loss = Trace_ELBO().differentiable_loss(raw_model, guide, x)
                loss.backward()
            grad_raw = float(pyro.param("q_m").grad)
        finally:
            pyro.enable_validation(True)
        pyro.clear_param_store()
        with seeded(0), quiet():
            loss = Trace_ELBO().differentiable_loss(nan_model, guide, x)
            loss.backward()
        grad_filled = float(pyro.param("q_m").grad)
        pyro.clear_param_store()
        return error, float(loss.detach()), grad_raw, grad_filled


def num_masked_latent_kl(variant=None):
    """TraceMeanField_ELBO with every observation masked: the loss is KL(q || p), exactly."""
    with float64(), quiet():
        x = C.data()
        loss = TraceMeanField_ELBO().loss(masked_model, latent_guide, x, "mask")
        q = dist.Normal(t64(C.GUIDE_MEAN), t64(C.GUIDE_SD))
        kl = float(torch.distributions.kl_divergence(q, dist.Normal(t64(0.0), t64(1.0))))
        return exact(
            loss, 0.0 if variant == "masked-to-zero" else kl, lhs_is="TraceMeanField_ELBO().loss", rhs_is="KL(q||p)"
        )


register(
    Identity(
        id="q-masked-latent-kl",
        chapter=MASKS_PAGE,
        label="q-masked-latent-kl",
        statement=r"\text{every observation of } z \text{ masked}:\quad"
        r"\texttt{TraceMeanField\_ELBO().loss} = \mathrm{KL}\big(q(z)\,\|\,p(z)\big)",
        numeric=num_masked_latent_kl,
        wrong=("masked-to-zero",),
        summary="masking a latent's observations leaves its KL term in the loss",
    )
)


# ---- obs_mask
OBS_MASK = (True, False, True, False, True)


def obs_mask_model(x, obs_mask):
    z = pyro.sample("z", dist.Normal(t64(0.0), t64(1.0)))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(z, t64(NOISE)), obs=x, obs_mask=obs_mask)


def obs_mask_guide(x, obs_mask, impute=True):
    """q(z) and, for the missing entries, q(x_unobserved | z) = p(x | z)."""
    z = pyro.sample("z", dist.Normal(t64(C.GUIDE_MEAN), t64(C.GUIDE_SD)))
    if impute:
        with pyro.plate("data", len(x)), poutine.mask(mask=~obs_mask):
            pyro.sample("x_unobserved", dist.Normal(z, t64(NOISE)))


def obs_mask_sites():
    """The sample sites of the model's trace with obs_mask, and whether each is observed."""
    with float64():
        x, m = C.data(), torch.tensor(OBS_MASK)
        with seeded(0):
            tr = poutine.trace(obs_mask_model).get_trace(x, m)
        return [(n, bool(s["is_observed"])) for n, s in tr.nodes.items() if s["type"] == "sample" and n != "data"]


def num_obs_mask(variant=None):
    """obs_mask with q(x_unobserved | z) = p(x | z): the same loss as poutine.mask on the same draw."""
    with float64(), quiet():
        x, m = C.data(), torch.tensor(OBS_MASK)
        with seeded(7):
            with_obs_mask = Trace_ELBO().loss(obs_mask_model, obs_mask_guide, x, m)
        with seeded(7):
            gtr = poutine.trace(obs_mask_guide).get_trace(x, m)
        z, x_mis = gtr.nodes["z"]["value"], gtr.nodes["x_unobserved"]["value"]
        log_lik = float(dist.Normal(z, t64(NOISE)).log_prob(x)[m].sum())
        log_mis = float(dist.Normal(z, t64(NOISE)).log_prob(x_mis)[~m].sum())
        elbo = log_lik + _normal_log_prob(z, 0.0, 1.0) - _normal_log_prob(z, C.GUIDE_MEAN, C.GUIDE_SD)
        if variant == "no-guide-term":
            elbo += log_mis  # the imputed values' log p without their -log q
        return exact(
            with_obs_mask, -elbo, lhs_is="Trace_ELBO().loss with obs_mask", rhs_is="-(ELBO of the observed entries)"
        )


register(
    Identity(
        id="q-obs-mask-imputation",
        chapter=MASKS_PAGE,
        label="q-obs-mask-imputation",
        statement=r"q(x_{\text{mis}} \mid z) = p(x_{\text{mis}} \mid z) \implies"
        r"\ \texttt{loss}_{\texttt{obs\_mask}} = -\big(\log p(x_{\text{obs}} \mid z) + \log p(z) - \log q(z)\big)",
        numeric=num_obs_mask,
        wrong=("no-guide-term",),
        summary="obs_mask adds latent imputation sites; imputed from p(x|z), they cancel out of the loss",
    )
)


# ---- one-sided masks
def one_sided_model(x, side="none"):
    with poutine.mask(mask=side != "model"):
        z = pyro.sample("z", dist.Normal(t64(0.0), t64(1.0)))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(z, t64(NOISE)), obs=x)


def one_sided_guide(x, side="none"):
    with poutine.mask(mask=side != "guide"):
        pyro.sample("z", dist.Normal(t64(C.GUIDE_MEAN), t64(C.GUIDE_SD)))


def num_one_sided(variant=None):
    """Mask z in the model only: -(log p(x|z) - log q(z)); in the guide only: -(log p(x|z) + log p(z))."""
    with float64(), quiet():
        x = C.data()
        losses, rhs = [], []
        for side in ("model", "guide"):
            with seeded(8):
                losses.append(Trace_ELBO().loss(one_sided_model, one_sided_guide, x, side))
            z = _guide_z(8, x)
            log_lik = _normal_log_prob(x, z, NOISE)
            log_p, log_q = _normal_log_prob(z, 0.0, 1.0), _normal_log_prob(z, C.GUIDE_MEAN, C.GUIDE_SD)
            if variant == "drops-both":
                rhs.append(-log_lik)
            else:
                rhs.append(-(log_lik - log_q) if side == "model" else -(log_lik + log_p))
        return exact(t64(losses), t64(rhs))


register(
    Identity(
        id="q-one-sided-mask",
        chapter=MASKS_PAGE,
        label="q-one-sided-mask",
        statement=r"\begin{aligned}\text{mask } z \text{ in the model}:&\ \ \texttt{loss} = -\big(\log p(x\mid z)"
        r" - \log q(z)\big)\\ \text{mask } z \text{ in the guide}:&\ \ \texttt{loss} = -\big(\log p(x\mid z)"
        r" + \log p(z)\big)\end{aligned}",
        numeric=num_one_sided,
        wrong=("drops-both",),
        summary="a mask on one side removes only that side's term: no prior, or no entropy",
    )
)


# ========================================================================= discrete
MIX_LOCS, MIX_WEIGHTS, MIX_SD = (-1.0, 1.0), (0.3, 0.7), 0.5
MIX_DATA = (-1.3, -0.6, 0.4, 0.9, 1.4, 1.1)
SHIFT_GUIDE = (0.1, 0.3)


def mix_model(x):
    """x_n ~ N(mu_{c_n} + g, sd^2), c_n ~ Categorical(w), g ~ N(0, 1); c enumerated in the model."""
    g = pyro.sample("g", dist.Normal(t64(0.0), t64(1.0)))
    with pyro.plate("data", len(x)):
        c = pyro.sample("c", dist.Categorical(t64(MIX_WEIGHTS)), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(t64(MIX_LOCS)[c] + g, t64(MIX_SD)), obs=x)


def mix_guide(x):
    """A guide for g only: the enumerated c has no guide site."""
    pyro.sample("g", dist.Normal(t64(SHIFT_GUIDE[0]), t64(SHIFT_GUIDE[1])))


def num_enum_exact(variant=None):
    """TraceEnum_ELBO().loss against the mixture's log-likelihood summed over c by hand, same g."""
    with float64(), quiet():
        x = t64(MIX_DATA)
        with seeded(9):
            loss = TraceEnum_ELBO(max_plate_nesting=1).loss(mix_model, mix_guide, x)
        with seeded(9):
            g = poutine.trace(mix_guide).get_trace(x).nodes["g"]["value"]
        per_c = t64(MIX_WEIGHTS).log() + dist.Normal(t64(MIX_LOCS) + g, t64(MIX_SD)).log_prob(x[:, None])
        reduce = per_c.max(-1).values if variant == "max-not-sum" else per_c.logsumexp(-1)
        elbo = float(reduce.sum()) + _normal_log_prob(g, 0.0, 1.0) - _normal_log_prob(g, *SHIFT_GUIDE)
        return exact(
            loss, -elbo, lhs_is="TraceEnum_ELBO().loss", rhs_is="-(sum_n log sum_c p(x_n, c | g) + log p(g) - log q(g))"
        )


register(
    Identity(
        id="q-enum-exact-marginal",
        chapter=DISCRETE_PAGE,
        label="q-enum-exact-marginal",
        statement=r"\texttt{TraceEnum\_ELBO().loss} = -\Big(\sum_n \log \sum_{c} p(c)\, p(x_n \mid c, g)"
        r" + \log p(g) - \log q(g)\Big),\ g \sim q",
        numeric=num_enum_exact,
        wrong=("max-not-sum",),
        summary="TraceEnum_ELBO sums an enumerated discrete latent out exactly",
    )
)


def sf_model(x, scale=1.0):
    """One binary latent b with a Normal observation; everything under poutine.scale(scale)."""
    with poutine.scale(scale=scale):
        b = pyro.sample("b", dist.Bernoulli(t64(0.3)))
        pyro.sample("x", dist.Normal(t64(MIX_LOCS)[b.long()], t64(MIX_SD)), obs=x)


def sf_guide(x, scale=1.0, enumerate_=False):
    theta = pyro.param("theta", lambda: t64(0.4))
    infer = {"enumerate": "parallel"} if enumerate_ else {}
    with poutine.scale(scale=scale):
        pyro.sample("b", dist.Bernoulli(logits=theta), infer=infer)


SF_X = 0.6


@functools.cache
def score_gradient_samples(draws=2000, seed=10) -> tuple:
    """``draws`` single-draw values of Trace_ELBO's d loss / d theta (a score-function gradient)."""
    with float64(), quiet():
        x = t64(SF_X)
        pyro.clear_param_store()
        elbo = Trace_ELBO(max_plate_nesting=0)
        out = []
        with seeded(seed):
            for _ in range(draws):
                loss = elbo.differentiable_loss(sf_model, sf_guide, x)
                (grad,) = torch.autograd.grad(loss, [pyro.param("theta")])
                out.append(float(grad))
        pyro.clear_param_store()
        return tuple(out)


@functools.cache
def exact_score_gradient() -> float:
    """TraceEnum_ELBO with the guide's b enumerated: the exact d loss / d theta."""
    with float64(), quiet():
        pyro.clear_param_store()
        loss = TraceEnum_ELBO(max_plate_nesting=0).differentiable_loss(
            sf_model, functools.partial(sf_guide, enumerate_=True), t64(SF_X)
        )
        (grad,) = torch.autograd.grad(loss, [pyro.param("theta")])
        pyro.clear_param_store()
        return float(grad)


def num_score_unbiased(variant=None):
    samples = t64(score_gradient_samples())
    target = exact_score_gradient() * (-1 if variant == "flipped-sign" else 1)
    return monte_carlo(
        samples,
        target,
        max_rel_width=0.25,
        lhs_is="mean of Trace_ELBO's d loss/d theta (score function)",
        rhs_is="TraceEnum_ELBO's exact d loss/d theta",
    )


register(
    Identity(
        id="q-score-function-unbiased",
        chapter=DISCRETE_PAGE,
        label="q-score-function-unbiased",
        statement=r"\mathbb E\Big[\tfrac{\partial}{\partial\theta}\texttt{Trace\_ELBO}\Big]"
        r" = \tfrac{\partial}{\partial\theta}\texttt{TraceEnum\_ELBO}",
        numeric=num_score_unbiased,
        wrong=("flipped-sign",),
        summary="Trace_ELBO's score-function gradient at a discrete site is unbiased for TraceEnum's exact one",
    )
)


def sequential_enum_error():
    def model(x):
        with pyro.plate("data", len(x)):
            c = pyro.sample("c", dist.Categorical(t64(MIX_WEIGHTS)), infer={"enumerate": "sequential"})
            pyro.sample("x", dist.Normal(t64(MIX_LOCS)[c], t64(MIX_SD)), obs=x)

    with float64():
        return first_error_line(TraceEnum_ELBO(max_plate_nesting=1).loss, model, lambda x: None, t64(MIX_DATA))


def mixed_scale_error():
    """A global enumerated site upstream of observations in a subsampled plate: two scales."""

    def model(x):
        c = pyro.sample("c", dist.Categorical(t64(MIX_WEIGHTS)), infer={"enumerate": "parallel"})
        with pyro.plate("data", len(x), subsample_size=2) as idx:
            pyro.sample("x", dist.Normal(t64(MIX_LOCS)[c], t64(MIX_SD)), obs=x[idx])

    with float64():
        return first_error_line(TraceEnum_ELBO(max_plate_nesting=1).loss, model, lambda x: None, t64(MIX_DATA))


SCALE = 7.0


def score_gradient_at(scale, seed=11) -> tuple[float, float]:
    """d differentiable_loss / d theta for one draw of b under poutine.scale(scale), and the same by hand.

    By hand: -scale * (log p(x, b) - log q(b)) * d log q(b) / d theta, at the b the guide drew.
    """
    with float64(), quiet():
        x = t64(SF_X)
        pyro.clear_param_store()
        with seeded(seed):
            loss = Trace_ELBO().differentiable_loss(sf_model, sf_guide, x, scale)
        theta = pyro.param("theta")
        (grad,) = torch.autograd.grad(loss, [theta])
        with seeded(seed):
            b = poutine.trace(sf_guide).get_trace(x, scale).nodes["b"]["value"].detach()
        log_q = dist.Bernoulli(logits=theta).log_prob(b)
        (score,) = torch.autograd.grad(log_q, [theta])
        log_p = dist.Bernoulli(t64(0.3)).log_prob(b) + dist.Normal(t64(MIX_LOCS)[b.long()], t64(MIX_SD)).log_prob(x)
        by_hand = -scale * float(log_p - log_q.detach()) * float(score)
        pyro.clear_param_store()
        return float(grad), by_hand


def num_scale_once(variant=None):
    power = 2 if variant == "scale-squared" else 1
    grad_c, by_hand_c = score_gradient_at(SCALE)
    grad_1, _ = score_gradient_at(1.0)
    return exact(
        t64([grad_c, grad_c]),
        t64([SCALE**power * grad_1, by_hand_c]),
        lhs_is="norm of (gradient with scale c, twice)",
        rhs_is="norm of (c x gradient without scale, the formula by hand)",
    )


register(
    Identity(
        id="q-score-scale-once",
        chapter=DISCRETE_PAGE,
        label="q-score-scale-once",
        statement=r"\tfrac{\partial}{\partial\theta}\,\texttt{loss}_{c}"
        r" = -\,c\,\big(\log p(x, b) - \log q_\theta(b)\big)\,\tfrac{\partial}{\partial\theta}\log q_\theta(b)"
        r" = c\,\tfrac{\partial}{\partial\theta}\,\texttt{loss}_{1}",
        numeric=num_scale_once,
        wrong=("scale-squared",),
        summary="a scale c multiplies a score-function site's gradient once, through log r, not twice",
    )
)


# =========================================================================== bounds
IWAE_KS = (2, 5)
IWAE_BATCHES = 1000


@functools.cache
def iwae_estimates(k: int, batches=IWAE_BATCHES, seed=12) -> tuple:
    """``batches`` independent values of -RenyiELBO(alpha=0, num_particles=k).loss on the conjugate model."""
    with float64(), quiet():
        x = C.data()
        elbo = RenyiELBO(alpha=0.0, num_particles=k, vectorize_particles=k > 1, max_plate_nesting=1)
        with seeded(seed + k):
            return tuple(-elbo.loss(C.model, C.make_guide(), x) for _ in range(batches))


def iwae_summary() -> dict:
    """Mean and standard error of the IWAE_K estimates for each K, with the exact ELBO and log p(x)."""
    out = {"elbo": C.elbo_value(), "log_evidence": C.log_evidence()}
    for k in IWAE_KS:
        s = t64(iwae_estimates(k))
        out[k] = (float(s.mean()), float(s.std()) / math.sqrt(len(s)))
    return out


def num_iwae_one(variant=None):
    """RenyiELBO(alpha=0, num_particles=1).loss against Trace_ELBO().loss on the same draw."""
    with float64(), quiet():
        x = C.data()
        with seeded(22):
            renyi = RenyiELBO(alpha=0.0, num_particles=1).loss(C.model, C.make_guide(), x)
        with seeded(22):
            trace = Trace_ELBO().loss(C.model, C.make_guide(), x)
        target = -C.log_evidence() if variant == "tight" else trace
        return exact(
            renyi, target, lhs_is="RenyiELBO(alpha=0, num_particles=1).loss", rhs_is="Trace_ELBO().loss, same draw"
        )


register(
    Identity(
        id="q-iwae-one-is-elbo",
        chapter=BOUNDS_PAGE,
        label="q-iwae-one-is-elbo",
        statement=r"\texttt{RenyiELBO(alpha=0, num\_particles=1).loss} = \texttt{Trace\_ELBO().loss}"
        r"\ \ \text{(same draw)}",
        numeric=num_iwae_one,
        wrong=("tight",),
        summary="RenyiELBO(alpha=0) with one particle is Trace_ELBO: IWAE_1 is the ELBO",
    )
)


def num_iwae_chain(variant=None):
    """Each link of ELBO < E[IWAE_2] < E[IWAE_5] < log p(x); reported: the weakest link (least margin)."""
    s = iwae_summary()
    chain = [(s["elbo"], 0.0, "ELBO (closed form)")] + [(s[k][0], s[k][1], f"E[IWAE_{k}]") for k in IWAE_KS]
    chain.append((s["log_evidence"], 0.0, "log p(x)"))
    if variant == "reversed":
        chain[1], chain[2] = chain[2], chain[1]
    if variant == "above-evidence":
        chain[-1] = (s["elbo"], 0.0, "ELBO (instead of log p(x))")
    checks = [
        inequality(a, b, "<", lhs_se=sa, rhs_se=sb, lhs_is=na, rhs_is=nb)
        for (a, sa, na), (b, sb, nb) in zip(chain[:-1], chain[1:], strict=True)
    ]
    return min(checks, key=lambda n: n.gap - n.tolerance)


register(
    Identity(
        id="q-iwae-bound-chain",
        chapter=BOUNDS_PAGE,
        label="q-iwae-bound-chain",
        kind="claim",
        statement=r"\mathcal L(q) = \mathbb E[\mathcal L_1] < \mathbb E[\mathcal L_2]"
        r" < \mathbb E[\mathcal L_5] < \log p(x)",
        numeric=num_iwae_chain,
        wrong=("reversed", "above-evidence"),
        summary="the importance-weighted bound rises with K towards log p(x) (the weakest link is reported)",
    )
)


# ---- RenyiELBO and plates
RENYI_K = 4


def local_model(x):
    """A local latent per data point, everything inside the data plate (a VAE without networks)."""
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(t64(0.0), t64(1.0)))
        pyro.sample("x", dist.Normal(z, t64(NOISE)), obs=x)


def local_guide(x):
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(t64(C.GUIDE_MEAN), t64(C.GUIDE_SD)))


def renyi_plate_values(seed=23) -> dict:
    """RenyiELBO(alpha=0, K) on the local-latent model, and both ways of weighting the same K draws."""
    with float64(), quiet():
        x = C.data()
        with seeded(seed):
            loss = RenyiELBO(alpha=0.0, num_particles=RENYI_K).loss(local_model, local_guide, x)
        log_w = []
        with seeded(seed):
            for _ in range(RENYI_K):
                gtr = poutine.trace(local_guide).get_trace(x)
                mtr = poutine.trace(poutine.replay(local_model, trace=gtr)).get_trace(x)
                z = gtr.nodes["z"]["value"]
                log_w.append(
                    dist.Normal(z, t64(NOISE)).log_prob(x)
                    + dist.Normal(t64(0.0), t64(1.0)).log_prob(z)
                    - dist.Normal(t64(C.GUIDE_MEAN), t64(C.GUIDE_SD)).log_prob(z)
                )
                del mtr
        log_w = torch.stack(log_w)  # (K, N): one weight per particle and data point
        log_k = math.log(RENYI_K)
        per_point = float((log_w.logsumexp(0) - log_k).sum())
        joint = float(log_w.sum(1).logsumexp(0) - log_k)
        return {"loss": loss, "per_point": per_point, "joint": joint}


def num_renyi_plates(variant=None):
    v = renyi_plate_values()
    target = v["joint"] if variant == "joint-weights" else v["per_point"]
    return exact(-v["loss"], target, lhs_is="-RenyiELBO(alpha=0, num_particles=4).loss", rhs_is="sum_n log mean_k w_nk")


register(
    Identity(
        id="q-renyi-per-point",
        chapter=BOUNDS_PAGE,
        label="q-renyi-per-point",
        statement=r"\text{every site in the plate}:\quad -\texttt{loss} = "
        r"\sum_{n}\log\frac1K\sum_{k=1}^{K} \omega_{nk},"
        r"\quad \omega_{nk} = \frac{p(x_n, z_n^{(k)})}{q(z_n^{(k)})}",
        numeric=num_renyi_plates,
        wrong=("joint-weights",),
        summary="RenyiELBO weights each data point separately when every site sits in the data plate",
    )
)


PARTICLE_K = 10


@functools.cache
def particle_losses(k: int, draws=400, seed=13) -> tuple:
    with float64(), quiet():
        x = C.data()
        elbo = Trace_ELBO(num_particles=k, vectorize_particles=k > 1, max_plate_nesting=1)
        with seeded(seed + k):
            return tuple(elbo.loss(C.model, C.make_guide(), x) for _ in range(draws))


def _sd_and_se(values) -> tuple[float, float]:
    s = t64(values)
    sd = float(s.std())
    return sd, sd / math.sqrt(2 * (len(s) - 1))


def num_particles_variance(variant=None):
    sd1, se1 = _sd_and_se(particle_losses(1))
    sdk, sek = _sd_and_se(particle_losses(PARTICLE_K))
    return inequality(
        sdk,
        sd1,
        ">" if variant == "more-particles-noisier" else "<",
        lhs_se=sek,
        rhs_se=se1,
        lhs_is=f"sd of Trace_ELBO(num_particles={PARTICLE_K}).loss",
        rhs_is="sd of Trace_ELBO().loss",
    )


register(
    Identity(
        id="q-particles-lower-variance",
        chapter=BOUNDS_PAGE,
        label=None,
        kind="claim",
        statement=r"\operatorname{sd}\big[\texttt{loss}_{S=10}\big] < \operatorname{sd}\big[\texttt{loss}_{S=1}\big]",
        numeric=num_particles_variance,
        wrong=("more-particles-noisier",),
        summary="num_particles averages draws of the same bound: same mean, smaller spread",
    )
)


SNR_KS = (1, 100)


def _snr_guide(x):
    m = pyro.param("q_m", lambda: t64(C.GUIDE_MEAN))
    pyro.sample("z", dist.Normal(m, t64(C.GUIDE_SD)))


@functools.cache
def guide_gradients(k: int, draws=300, seed=14) -> tuple:
    """``draws`` values of d(-IWAE_K)/dm for the guide mean m, from RenyiELBO(alpha=0).loss_and_grads."""
    with float64(), quiet():
        x = C.data()
        elbo = RenyiELBO(alpha=0.0, num_particles=k, vectorize_particles=k > 1, max_plate_nesting=1)
        out = []
        pyro.clear_param_store()
        with seeded(seed + k):
            for _ in range(draws):
                elbo.loss_and_grads(C.model, _snr_guide, x)
                p = pyro.param("q_m").unconstrained()
                out.append(float(p.grad))
                p.grad = None
        pyro.clear_param_store()
        return tuple(out)


def snr(values) -> tuple[float, float]:
    """|mean| / sd and its delta-method standard error sqrt((1 + snr^2 / 2) / n)."""
    s = t64(values)
    r = abs(float(s.mean())) / float(s.std())
    return r, math.sqrt((1 + r**2 / 2) / len(s))


def num_snr(variant=None):
    r1, se1 = snr(guide_gradients(SNR_KS[0]))
    rk, sek = snr(guide_gradients(SNR_KS[1]))
    return inequality(
        rk,
        r1,
        ">" if variant == "tighter-is-cleaner" else "<",
        lhs_se=sek,
        rhs_se=se1,
        lhs_is=f"signal-to-noise of the guide-mean gradient, K = {SNR_KS[1]}",
        rhs_is="the same, K = 1",
    )


register(
    Identity(
        id="q-iwae-guide-snr",
        chapter=BOUNDS_PAGE,
        label="q-iwae-guide-snr",
        kind="claim",
        statement=r"\mathrm{SNR}_{K=100}\Big[\tfrac{\partial \mathcal L_K}{\partial m}\Big]"
        r" < \mathrm{SNR}_{K=1}\Big[\tfrac{\partial \mathcal L_K}{\partial m}\Big]",
        numeric=num_snr,
        wrong=("tighter-is-cleaner",),
        summary="the tighter bound gives the guide's parameter a noisier gradient (Rainforth et al. 2018)",
    )
)


# =========================================================================== custom
PENALTY = 0.5
CUSTOM_LR = 0.1


def penalized_loss(model, guide, *args, **kwargs):
    """Trace_ELBO's differentiable loss plus PENALTY * m^2 on the guide mean."""
    return Trace_ELBO().differentiable_loss(model, guide, *args, **kwargs) + PENALTY * pyro.param("q_m") ** 2


def num_custom_loss(variant=None):
    """SVI(loss=callable).step: its value, and the SGD update, against the pieces computed by hand."""
    with float64(), quiet():
        x = C.data()
        pyro.clear_param_store()
        guide = param_guide(C.GUIDE_MEAN, C.GUIDE_SD)
        with seeded(15):
            loss = Trace_ELBO().differentiable_loss(C.model, guide, x)
        m, s = pyro.param("q_m"), pyro.param("q_s").unconstrained()
        weight = 0.0 if variant == "penalty-dropped" else PENALTY
        total = loss + weight * m**2
        grads = torch.autograd.grad(total, [m, s])
        expected = [float(total), *(float(p - CUSTOM_LR * g) for p, g in zip((m, s), grads, strict=True))]
        pyro.clear_param_store()
        svi = SVI(C.model, guide, pyro.optim.SGD({"lr": CUSTOM_LR}), loss=penalized_loss)
        with seeded(15):
            value = svi.step(x)
        got = [value, float(pyro.param("q_m")), float(pyro.param("q_s").unconstrained())]
        pyro.clear_param_store()
        return exact(
            t64(got), t64(expected), lhs_is="norm of (step value, new m, new log s)", rhs_is="the same, by hand"
        )


register(
    Identity(
        id="q-custom-loss-step",
        chapter=CUSTOM_PAGE,
        label="q-custom-loss-step",
        statement=r"\texttt{SVI(..., loss=f).step(x)} = f = \texttt{differentiable\_loss} + \gamma\, m^2,"
        r"\quad \lambda' = \lambda - \eta\,\nabla_\lambda f",
        numeric=num_custom_loss,
        wrong=("penalty-dropped",),
        summary="SVI accepts any callable loss; step returns its value and descends its gradient",
    )
)


class NormalGuide(PyroModule):
    """q(z) = N(m, s^2) as a PyroModule: its parameters belong to the module."""

    def __init__(self, m=C.GUIDE_MEAN, s=C.GUIDE_SD):
        super().__init__()
        self.m = PyroParam(t64(m))
        self.s = PyroParam(t64(s), constraint=constraints.positive)

    def forward(self, x):
        pyro.sample("z", dist.Normal(self.m, self.s))


def elbo_module_demo(steps=150, lr=0.05, seed=16):
    """Train q with a plain torch.optim loop on ``Trace_ELBO()(model, guide)``.

    Returns the module's parameter names, (m, s) before and after, the closed-form ELBO
    before and after, and the first-step loss compared with differentiable_loss on the same draw.
    """
    with float64(), quiet(), pyro.settings.context(module_local_params=True):
        x = C.data()
        guide = NormalGuide()
        loss_fn = Trace_ELBO()(C.model, guide)
        names = [n for n, _ in loss_fn.named_parameters()]
        before = (float(guide.m), float(guide.s))
        with seeded(seed):
            first = float(loss_fn(x))
        with seeded(seed):
            same_draw = float(Trace_ELBO().differentiable_loss(C.model, guide, x))
        opt = torch.optim.Adam(loss_fn.parameters(), lr=lr)
        with seeded(seed):
            for _ in range(steps):
                opt.zero_grad()
                loss_fn(x).backward()
                opt.step()
        after = (float(guide.m), float(guide.s))
        store = list(pyro.get_param_store().keys())
    return {
        "names": names,
        "before": before,
        "after": after,
        "elbo_before": C.elbo_value(*before),
        "elbo_after": C.elbo_value(*after),
        "first": first,
        "same_draw": same_draw,
        "param_store": store,
    }


def num_elbo_module(variant=None):
    d = elbo_module_demo()
    lhs = t64([d["first"], d["elbo_after"]])
    rhs = t64([d["same_draw"] + (1.0 if variant == "off-by-one" else 0.0), d["elbo_after"]])
    return exact(lhs, rhs, lhs_is="ELBOModule(x) (and the trained ELBO)", rhs_is="differentiable_loss on the same draw")


register(
    Identity(
        id="q-elbo-module",
        chapter=CUSTOM_PAGE,
        label="q-elbo-module",
        statement=r"\texttt{Trace\_ELBO()(model, guide)(x)}"
        r" = \texttt{Trace\_ELBO().differentiable\_loss(model, guide, x)}",
        numeric=num_elbo_module,
        wrong=("off-by-one",),
        summary="an ELBOModule's forward is the differentiable loss",
    )
)


def num_elbo_module_trains(variant=None):
    d = elbo_module_demo()
    return inequality(
        d["elbo_after"],
        d["elbo_before"],
        "<" if variant == "elbo-fell" else ">",
        lhs_is="closed-form ELBO after the torch.optim loop",
        rhs_is="closed-form ELBO before",
    )


register(
    Identity(
        id="q-elbo-module-trains",
        chapter=CUSTOM_PAGE,
        label=None,
        kind="claim",
        statement=r"\mathcal L(q_{\text{after}}) > \mathcal L(q_{\text{before}})",
        numeric=num_elbo_module_trains,
        wrong=("elbo-fell",),
        summary="a plain torch.optim loop on the ELBOModule raises the ELBO",
    )
)


# ---- differentiable_loss at a score-function site: gradient unbiased, Hessian not
THETA0 = 0.4


def _seed_for(value: int) -> int:
    """A seed under which the guide of :func:`sf_guide` draws b = value."""
    for seed in range(100):
        with seeded(seed):
            if int(dist.Bernoulli(logits=t64(THETA0)).sample()) == value:
                return seed
    raise RuntimeError("no seed found")


def surrogate_derivatives() -> dict:
    """For b = 0 and b = 1: value, first and second derivative of differentiable_loss in theta.

    Also the exact -ELBO(theta) = -sum_b q(b) (log p(x, b) - log q(b)) and its derivatives.
    """
    with float64(), quiet():
        x = t64(SF_X)
        out = {}
        for b in (0, 1):
            pyro.clear_param_store()
            pyro.param("theta", t64(THETA0))
            with seeded(_seed_for(b)):
                tr = poutine.trace(sf_guide).get_trace(x)
                assert int(tr.nodes["b"]["value"]) == b
            with seeded(_seed_for(b)):
                loss = Trace_ELBO().differentiable_loss(sf_model, sf_guide, x)
            theta = pyro.param("theta")
            (g,) = torch.autograd.grad(loss, [theta], create_graph=True)
            (h,) = torch.autograd.grad(g, [theta])
            out[b] = (float(loss), float(g), float(h))
        pyro.clear_param_store()
        theta = t64(THETA0).requires_grad_()
        q1 = torch.sigmoid(theta)
        log_joint = torch.stack(
            [
                dist.Bernoulli(t64(0.3)).log_prob(t64(float(b)))
                + dist.Normal(t64(MIX_LOCS[b]), t64(MIX_SD)).log_prob(x)
                for b in (0, 1)
            ]
        )
        q = torch.stack([1 - q1, q1])
        neg_elbo = -(q * (log_joint - q.log())).sum()
        (g,) = torch.autograd.grad(neg_elbo, [theta], create_graph=True)
        (h,) = torch.autograd.grad(g, [theta])
        out["exact"] = (float(neg_elbo), float(g), float(h))
        out["q1"] = float(torch.sigmoid(t64(THETA0)))
        return out


def _expected(d, i, uniform=False):
    w1 = 0.5 if uniform else d["q1"]
    return (1 - w1) * d[0][i] + w1 * d[1][i]


def num_dl_gradient(variant=None):
    d = surrogate_derivatives()
    return exact(
        _expected(d, 1, uniform=variant == "unweighted"),
        d["exact"][1],
        lhs_is="E_q[d differentiable_loss / d theta] (sum over b)",
        rhs_is="d(-ELBO)/d theta, exact",
    )


register(
    Identity(
        id="q-dl-gradient-unbiased",
        chapter=CUSTOM_PAGE,
        label="q-dl-gradient",
        statement=r"\mathbb E_{q}\Big[\tfrac{\partial}{\partial\theta}\texttt{differentiable\_loss}\Big]"
        r" = -\tfrac{\partial \mathcal L}{\partial\theta}",
        numeric=num_dl_gradient,
        wrong=("unweighted",),
        summary="at a score-function site the gradient of differentiable_loss is unbiased (exact expectation)",
    )
)


def num_dl_hessian(variant=None):
    d = surrogate_derivatives()
    i = 1 if variant == "first-derivative" else 2
    gap = abs(_expected(d, i) - d["exact"][i])
    return inequality(
        gap,
        1e-8 * abs(d["exact"][i]),
        ">",
        lhs_is="|E_q[second derivative of differentiable_loss] - second derivative of -ELBO|",
        rhs_is="rounding threshold 1e-8 x |exact|",
    )


register(
    Identity(
        id="q-dl-hessian-biased",
        chapter=CUSTOM_PAGE,
        label="q-dl-hessian",
        kind="claim",
        statement=r"\mathbb E_{q}\Big[\tfrac{\partial^2}{\partial\theta^2}\texttt{differentiable\_loss}\Big]"
        r" \neq -\tfrac{\partial^2 \mathcal L}{\partial\theta^2}",
        numeric=num_dl_hessian,
        wrong=("first-derivative",),
        summary="its second derivative is not an unbiased Hessian: the score term's weight is detached",
    )
)


# =========================================================================== guides
def obs_model(x):
    z = pyro.sample("z", dist.Normal(t64(0.0), t64(1.0)))
    pyro.sample("x", dist.Normal(z, t64(NOISE)), obs=x)


def obs_guide(x):
    """A guide that also samples the observed site x, with a learnable scale."""
    pyro.sample("z", dist.Normal(t64(C.GUIDE_MEAN), t64(C.GUIDE_SD)))
    rho = pyro.param("rho", lambda: t64(1.0), constraint=constraints.positive)
    pyro.sample("x", dist.Normal(t64(0.0), rho))


X_ONE = 0.9


def num_guide_observed(variant=None):
    """loss = -(log p(x, z) - log q(z) - log q(x~)); d loss / d log rho = -1 on every draw."""
    with float64(), quiet():
        x = t64(X_ONE)
        pyro.clear_param_store()
        with seeded(17):
            loss = Trace_ELBO().differentiable_loss(obs_model, obs_guide, x)
        log_rho = pyro.param("rho").unconstrained()
        (g,) = torch.autograd.grad(loss, [log_rho])
        with seeded(17):
            gtr = poutine.trace(obs_guide).get_trace(x)
        z, x_tilde = float(gtr.nodes["z"]["value"]), float(gtr.nodes["x"]["value"])
        elbo = (
            _normal_log_prob(x, z, NOISE)
            + _normal_log_prob(z, 0.0, 1.0)
            - _normal_log_prob(z, C.GUIDE_MEAN, C.GUIDE_SD)
        )
        pyro.clear_param_store()
        if variant == "ignored":
            return exact(t64([float(loss), float(g)]), t64([-elbo, 0.0]))
        return exact(t64([float(loss), float(g)]), t64([-(elbo - _normal_log_prob(x_tilde, 0.0, 1.0)), -1.0]))


register(
    Identity(
        id="q-guide-samples-observed",
        chapter=GUIDES_PAGE,
        label="q-guide-samples-observed",
        statement=r"\texttt{loss} = -\big(\log p(x, z) - \log q(z) - \log q(\tilde x)\big),"
        r"\qquad \tfrac{\partial\,\texttt{loss}}{\partial \log\rho} = -1",
        numeric=num_guide_observed,
        wrong=("ignored",),
        summary="a guide site for an observed variable adds an entropy reward that grows without bound",
    )
)


def guide_observed_training(steps=200, lr=0.05, seed=18):
    """rho before and after SVI with the guide that samples the observed site."""
    with float64(), quiet():
        pyro.clear_param_store()
        svi = SVI(obs_model, obs_guide, pyro.optim.Adam({"lr": lr}), Trace_ELBO())
        x = t64(X_ONE)
        with seeded(seed):
            first = svi.step(x)
            for _ in range(steps - 1):
                last = svi.step(x)
        rho = float(pyro.param("rho"))
        pyro.clear_param_store()
        return first, last, rho


def empty_guide(x):
    pass


def num_missing_guide_site(variant=None):
    """No guide site for z: z comes from the prior inside the model; loss = -(log p(x|z) + log p(z))."""
    with float64(), quiet():
        x = t64(X_ONE)
        with seeded(19):
            loss = Trace_ELBO().loss(obs_model, empty_guide, x)
        with seeded(19):
            z = float(poutine.trace(obs_model).get_trace(x).nodes["z"]["value"])
        rhs = _normal_log_prob(x, z, NOISE) + (0.0 if variant == "prior-cancels" else _normal_log_prob(z, 0.0, 1.0))
        return exact(loss, -rhs)


register(
    Identity(
        id="q-missing-guide-site",
        chapter=GUIDES_PAGE,
        label="q-missing-guide-site",
        statement=r"z \notin \text{guide}:\quad \texttt{loss} = -\big(\log p(x \mid z) + \log p(z)\big),\ z \sim p(z)",
        numeric=num_missing_guide_site,
        wrong=("prior-cancels",),
        summary="a model latent without a guide site is drawn from its prior and never inferred",
    )
)


def support_demo():
    """Exponential prior, Normal guide: the error with validation, a finite number without."""

    def model(x):
        z = pyro.sample("z", dist.Exponential(t64(1.0)))
        pyro.sample("x", dist.Normal(z, t64(NOISE)), obs=x)

    def guide(x):
        pyro.sample("z", dist.Normal(t64(0.0), t64(1.0)))

    with float64():
        x = t64(X_ONE)
        seed = next(s for s in range(100) if _guide_draw(guide, x, s) < 0)
        with seeded(seed):
            error = first_error_line(Trace_ELBO().loss, model, guide, x)
        pyro.enable_validation(False)
        try:
            with seeded(seed), quiet():
                value = Trace_ELBO().loss(model, guide, x)
        finally:
            pyro.enable_validation(True)
        return _guide_draw(guide, x, seed), error, value


def _guide_draw(guide, x, seed):
    with seeded(seed):
        return float(poutine.trace(guide).get_trace(x).nodes["z"]["value"])


# ---- TraceMeanField_ELBO with a structured guide
def markov_model(x):
    """z1 ~ N(0, 1), z2 | z1 ~ N(z1, 1), x | z2 ~ N(z2, sigma^2): two steps of a deep Markov model."""
    z1 = pyro.sample("z1", dist.Normal(t64(0.0), t64(1.0)))
    z2 = pyro.sample("z2", dist.Normal(z1, t64(1.0)))
    pyro.sample("x", dist.Normal(z2, t64(NOISE)), obs=x)


MF_GUIDE = {"a": 0.2, "s1": 0.7, "b": 0.4, "c": 0.5, "s2": 0.6}


def markov_guide(x):
    """q(z1) q(z2 | z1): the structured guide of a DMM, in the model's order."""
    g = MF_GUIDE
    z1 = pyro.sample("z1", dist.Normal(t64(g["a"]), t64(g["s1"])))
    pyro.sample("z2", dist.Normal(t64(g["b"]) + g["c"] * z1, t64(g["s2"])))


def num_mean_field_structured(variant=None):
    """TraceMeanField_ELBO().loss = -log p(x|z2) + KL(q(z1)||p(z1)) + KL(q(z2|z1)||p(z2|z1)) at the drawn z1."""
    with float64(), quiet():
        x, g = t64(X_ONE), MF_GUIDE
        with seeded(20):
            loss = TraceMeanField_ELBO().loss(markov_model, markov_guide, x)
        with seeded(20):
            tr = poutine.trace(markov_guide).get_trace(x)
        z1, z2 = tr.nodes["z1"]["value"], tr.nodes["z2"]["value"]
        kl = torch.distributions.kl_divergence
        kl1 = float(kl(dist.Normal(t64(g["a"]), t64(g["s1"])), dist.Normal(t64(0.0), t64(1.0))))
        q2, p2 = dist.Normal(t64(g["b"]) + g["c"] * z1, t64(g["s2"])), dist.Normal(z1, t64(1.0))
        kl2 = float(q2.log_prob(z2) - p2.log_prob(z2)) if variant == "monte-carlo-kl" else float(kl(q2, p2))
        return exact(loss, -_normal_log_prob(x, z2, NOISE) + kl1 + kl2)


register(
    Identity(
        id="q-mean-field-structured",
        chapter=GUIDES_PAGE,
        label="q-mean-field-structured",
        statement=r"\texttt{loss} = -\log p(x\mid z_2) + \mathrm{KL}\big(q(z_1)\,\|\,p(z_1)\big)"
        r" + \mathrm{KL}\big(q(z_2\mid z_1)\,\|\,p(z_2\mid z_1)\big),\ z_1, z_2 \sim q",
        numeric=num_mean_field_structured,
        wrong=("monte-carlo-kl",),
        summary="with a structured guide, TraceMeanField_ELBO takes each site's KL given its parents' draws",
    )
)


def bottom_up_guide(x):
    """q(z2) q(z1 | z2): a bottom-up guide (z2, next to x, first) for the top-down model."""
    z2 = pyro.sample("z2", dist.Normal(t64(0.4), t64(0.6)))
    pyro.sample("z1", dist.Normal(0.5 * z2, t64(0.7)))


def top_down_warning():
    """The bottom-up guide with TraceMeanField_ELBO: Pyro's warning about the order of the sites."""
    with float64():
        with seeded(21):
            return caught_warnings(TraceMeanField_ELBO().loss, markov_model, bottom_up_guide, t64(X_ONE))


@functools.cache
def ordered_losses(cls_name: str, guide_name: str, batches=100, particles=500, seed=24) -> tuple:
    """``batches`` values of the loss of ``cls_name``, each averaged over ``particles`` vectorized draws."""
    cls = {"TraceMeanField_ELBO": TraceMeanField_ELBO, "Trace_ELBO": Trace_ELBO}[cls_name]
    guide = {"bottom_up": bottom_up_guide, "same_order": markov_guide}[guide_name]
    with float64(), quiet():
        elbo = cls(num_particles=particles, vectorize_particles=True, max_plate_nesting=0)
        with seeded(seed):
            return tuple(elbo.loss(markov_model, guide, t64(X_ONE)) for _ in range(batches))


def mean_and_se(values) -> tuple[float, float]:
    v = t64(values)
    return float(v.mean()), float(v.std()) / math.sqrt(len(v))


def num_top_down_biased(variant=None):
    guide = "same_order" if variant == "same-order-guide" else "bottom_up"
    (mf, mf_se), (tr, tr_se) = (mean_and_se(ordered_losses(c, guide)) for c in ("TraceMeanField_ELBO", "Trace_ELBO"))
    return inequality(
        mf,
        tr,
        ">",
        lhs_se=mf_se,
        rhs_se=tr_se,
        lhs_is=f"mean TraceMeanField_ELBO loss ({guide} guide)",
        rhs_is="mean Trace_ELBO loss (unbiased for -ELBO)",
    )


register(
    Identity(
        id="q-mean-field-top-down-biased",
        chapter=GUIDES_PAGE,
        label="q-top-down-biased",
        kind="claim",
        statement=r"\text{guide order } z_2, z_1:\quad \mathbb E\big[\texttt{TraceMeanField\_ELBO().loss}\big]"
        r" > \mathbb E\big[\texttt{Trace\_ELBO().loss}\big] = -\mathcal L(q)",
        numeric=num_top_down_biased,
        wrong=("same-order-guide",),
        summary="with a guide that samples a site's model parents after it, TraceMeanField_ELBO is biased",
    )
)
