r"""Chapter ``inside-trace-elbo``: the installed source of Trace_ELBO, read against BBVI eq. (1).

The chapter quotes, with :func:`inspect.getsource` at build time, the functions of the
installed Pyro that evaluate the ELBO, and maps single lines of them to the terms of

    L(lambda) = E_q[log p(x, z) - log q(z)]            (BBVI eq. (1))

Those lines are listed once, in :data:`RELIED_ON`. The chapter's mapping tables are
generated from that list, and the drift check (identity ``trace-elbo-source-drift``)
counts how many of them are still in the installed source, so that an upgrade of Pyro
which changes them fails the build instead of leaving the text silently wrong.

The running example is the chapter-1 model (:mod:`elbo_terms.conjugate`) with its noise
scale unknown too, so that a trace has two latent sites and one observed site in a plate::

    z ~ N(mu0, s0^2),  tau ~ LogNormal(log sigma, 0.3),  x_i | z, tau ~ N(z, tau^2)
    q(z, tau) = N(z; m, s^2) LogNormal(tau; m_tau, s_tau)

(LogNormal(tau; m_tau, s_tau): log tau ~ N(m_tau, s_tau^2). The book keeps sigma
for a fixed noise scale; the unknown one is tau, with its prior median at chapter 1's sigma.) Particles are
indexed k = 1..S: z^(k) ~ q.
"""

from __future__ import annotations

import importlib
import inspect
import math
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import SGD
from pyro.poutine.util import prune_subsample_sites

from .._util import float64, seeded, t64
from ..build.identity import Identity, Numeric, exact, register
from . import conjugate as C

CHAPTER = "inside-trace-elbo"

# ------------------------------------------------------------------ the source lines
#: dotted paths of the functions of the installed Pyro that the chapter quotes
FUNCTIONS = {
    "svi-step": "pyro.infer.svi.SVI.step",
    "loss": "pyro.infer.trace_elbo.Trace_ELBO.loss",
    "get-traces": "pyro.infer.elbo.ELBO._get_traces",
    "get-trace": "pyro.infer.trace_elbo.Trace_ELBO._get_trace",
    "importance-trace": "pyro.infer.enum.get_importance_trace",
    "compute-log-prob": "pyro.poutine.trace_struct.Trace.compute_log_prob",
    "particle": "pyro.infer.trace_elbo.Trace_ELBO._differentiable_loss_particle",
}


@dataclass(frozen=True)
class SourceLine:
    """One line of an installed function that the text relies on, and what it is in the math."""

    function: str  # a key of FUNCTIONS, or a dotted path
    line: str  # the line, stripped of its indentation
    meaning: str  # Markdown: the term of BBVI eq. (1) it computes


#: Every line of Pyro that the chapter's explanation relies on, in reading order.
RELIED_ON: tuple[SourceLine, ...] = (
    SourceLine(
        "svi-step",
        "loss = self.loss_and_grads(self.model, self.guide, *args, **kwargs)",
        "`SVI.step` asks the ELBO object for the loss *and* its gradients, then takes an optimizer step",
    ),
    SourceLine(
        "svi-step",
        "return torch_item(loss)",
        "the number `step()` returns is that loss, as a Python float, computed *before* the update",
    ),
    SourceLine(
        "loss",
        "for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):",
        r"one pair of traces per particle, one draw $z^{(k)} \sim q_\lambda$, $k = 1, \dots, S$"
        " (or one pair holding all $S$ draws, when vectorized)",
    ),
    SourceLine(
        "loss",
        "elbo_particle = torch_item(model_trace.log_prob_sum()) - torch_item(",
        r"$\log p(x, z^{(k)})$: every sample site of the model, observed ones ($\log p(x \mid z)$) "
        r"and latent ones ($\log p(z)$) alike, summed; then minus ...",
    ),
    SourceLine(
        "loss", "guide_trace.log_prob_sum()", r"... $\log q_\lambda(z^{(k)})$: every sample site of the guide, summed"
    ),
    SourceLine(
        "loss",
        "elbo += elbo_particle / self.num_particles",
        r"$\frac1S \sum_k$: the Monte Carlo average that replaces $\mathbb E_{q_\lambda}$",
    ),
    SourceLine("loss", "loss = -elbo", r"the loss is $-\mathcal L$, because optimizers minimize"),
    SourceLine(
        "get-traces",
        "yield self._get_vectorized_trace(model, guide, args, kwargs)",
        r"`vectorize_particles=True`: one pair of traces whose sites carry all $S$ draws in a leading batch dimension",
    ),
    SourceLine(
        "get-traces",
        "for i in range(self.num_particles):",
        r"otherwise: $S$ independent pairs of traces, one after the other",
    ),
    SourceLine(
        "get-trace", "model_trace, guide_trace = get_importance_trace(", "each pair comes from `get_importance_trace`"
    ),
    SourceLine(
        "importance-trace",
        "guide_trace = poutine.trace(guide, graph_type=graph_type).get_trace(",
        r"$z \sim q_\lambda(z)$: run the guide **first** and record its sample sites",
    ),
    SourceLine(
        "importance-trace",
        "poutine.replay(model, trace=guide_trace), graph_type=graph_type",
        r"run the model with its latent sites **replayed** from the guide's values:"
        r" it scores $x$ and $z$, it draws nothing",
    ),
    SourceLine(
        "importance-trace",
        "guide_trace = prune_subsample_sites(guide_trace)",
        "the sample sites a `pyro.plate` records for its indices are dropped from both traces ...",
    ),
    SourceLine(
        "importance-trace",
        "model_trace = prune_subsample_sites(model_trace)",
        "... they are bookkeeping, not densities",
    ),
    SourceLine(
        "importance-trace",
        "model_trace.compute_log_prob()",
        r"every model site gets its $\log p$ at the recorded value",
    ),
    SourceLine(
        "importance-trace",
        "guide_trace.compute_score_parts()",
        r"every guide site gets its $\log q$ (and the pieces of the gradient estimator)",
    ),
    SourceLine(
        "compute-log-prob",
        'log_p = scale_and_mask(log_p, site["scale"], site["mask"])',
        "a site's log-density is multiplied by its `scale` (plate subsampling $N/B$, `poutine.scale`) and masked",
    ),
    SourceLine(
        "compute-log-prob",
        'site["log_prob_sum"] = log_p.sum()',
        "and summed over its batch (plate) dimensions: one number per site",
    ),
    SourceLine(
        "particle",
        "for name, site in model_trace.nodes.items():",
        "the value part of the loss SVI uses: every site of the model trace ...",
    ),
    SourceLine(
        "particle",
        'elbo_particle = elbo_particle + torch_item(site["log_prob_sum"])',
        r"... is **added**: $+\log p$, observed and latent sites alike",
    ),
    SourceLine("particle", "for name, site in guide_trace.nodes.items():", "every site of the guide trace ..."),
    SourceLine(
        "particle",
        'elbo_particle = elbo_particle - torch_item(site["log_prob_sum"])',
        r"... is **subtracted**: $-\log q$",
    ),
    SourceLine(
        "particle",
        'log_prob, score_function_term, entropy_term = site["score_parts"]',
        "the surrogate for gradients ([gradient estimators](gradient-estimators.md)); it does not change the value",
    ),
    SourceLine(
        "particle",
        "return -elbo_particle, -surrogate_elbo_particle",
        r"minus the single-draw ELBO, and minus its surrogate",
    ),
)

#: A line that is **not** in `Trace_ELBO`'s source: the closed-form KL of TraceMeanField_ELBO.
#: The drift check's wrong variant ``absent-line`` looks for it, and must fail.
ABSENT_LINE = SourceLine(
    "loss", 'kl_qp = kl_divergence(guide_site["fn"], model_site["fn"])', "a closed-form KL: Trace_ELBO has none"
)


def resolve(path: str):
    """The object a dotted path names: ``"pyro.infer.trace_elbo.Trace_ELBO.loss"`` -> the function."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"cannot import anything of {path!r}")


def dotted(key: str) -> str:
    """The dotted path of a function: a key of :data:`FUNCTIONS`, or already a dotted path."""
    if key in FUNCTIONS:
        return FUNCTIONS[key]
    if "." not in key:
        raise KeyError(f"unknown function key {key!r}; known: {sorted(FUNCTIONS)}, or give a dotted path")
    return key


def installed_source(key: str) -> str:
    """The dedented source, in the installed Pyro, of the function ``key`` names (read now)."""
    return textwrap.dedent(inspect.getsource(resolve(dotted(key))))


def find_line(source: str, line: str) -> int | None:
    """The 1-based number of the first line of ``source`` that equals ``line`` once stripped, or None."""
    for i, text in enumerate(source.splitlines(), start=1):
        if text.strip() == line.strip():
            return i
    return None


def missing_lines(lines=RELIED_ON, source: Callable[[str], str] | None = None) -> list[SourceLine]:
    """The relied-on lines that are not (any more) in the source that ``source(key)`` returns.

    ``source`` defaults to :func:`installed_source`, looked up when called (tests replace it to
    simulate a Pyro whose source has changed).
    """
    source = source or installed_source
    cache: dict[str, str] = {}
    missing = []
    for entry in lines:
        if entry.function not in cache:
            cache[entry.function] = source(entry.function)
        if find_line(cache[entry.function], entry.line) is None:
            missing.append(entry)
    return missing


def count_found(lines, source: Callable[[str], str] | None = None) -> Numeric:
    """``exact(number of lines found, number of lines)``; the missing ones are named in ``detail``."""
    missing = missing_lines(lines, source)
    result = exact(float(len(lines) - len(missing)), float(len(lines)))
    result.detail["missing"] = [f"{dotted(m.function)}: {m.line}" for m in missing]
    return result


def num_source_drift(variant=None, source: Callable[[str], str] | None = None) -> Numeric:
    """How many relied-on lines are in the installed source, against how many there are.

    Variant ``absent-line`` also looks for :data:`ABSENT_LINE`, which is not there.
    """
    return count_found(RELIED_ON + ((ABSENT_LINE,) if variant == "absent-line" else ()), source)


register(
    Identity(
        id="trace-elbo-source-drift",
        kind="source",
        chapter=CHAPTER,
        label=None,
        statement=r"\#\{\text{lines quoted by the text found in the installed Pyro}\} = \#\{\text{lines quoted}\}",
        numeric=num_source_drift,
        wrong=("absent-line",),
        summary="every line of Pyro this chapter's explanation relies on is in the installed source",
    )
)


def check_source(lines=RELIED_ON, source: Callable[[str], str] | None = None) -> None:
    """Raise an error naming each relied-on line that the source no longer contains."""
    missing = missing_lines(lines, source)
    if missing:
        names = "\n".join(f"  {dotted(m.function)}: {m.line}" for m in missing)
        raise AssertionError(f"the installed Pyro no longer contains these lines the chapter explains:\n{names}")


def mapping_table(key: str, lines=RELIED_ON, header="in BBVI eq. (1)") -> str:
    """A Markdown table of the relied-on lines of one function: line number, line, meaning."""
    src = installed_source(key)
    rows = [f"| line | code | {header} |", "|---:|---|---|"]
    found = [(find_line(src, e.line), e) for e in lines if e.function == key]
    for number, entry in sorted(found, key=lambda ne: float("inf") if ne[0] is None else ne[0]):
        code = entry.line.replace("|", r"\|")
        rows.append(f"| {number if number is not None else 'MISSING'} | `{code}` | {entry.meaning} |")
    return "\n".join(rows)


# -------------------------------------------------------------- the running example
TAU_PRIOR_LOG_SD = 0.3
#: initial values of the guide's parameters: q(z) = N(m, s^2), q(tau) = LogNormal(m_tau, s_tau)
GUIDE_INIT = {"m": C.GUIDE_MEAN, "s": C.GUIDE_SD, "m_tau": math.log(C.NOISE_SD) + 0.2, "s_tau": 0.25}
#: how many particles the site-by-site check averages
PARTICLES = 4


def model(x):
    """p(x, z, tau): the chapter-1 model with the noise scale unknown too: a latent site tau."""
    z = pyro.sample("z", dist.Normal(t64(C.PRIOR_MEAN), t64(C.PRIOR_SD)))
    tau = pyro.sample("tau", dist.LogNormal(t64(math.log(C.NOISE_SD)), t64(TAU_PRIOR_LOG_SD)))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(z, tau), obs=x)


def guide(x):
    """q(z, tau) = N(z; m, s^2) LogNormal(tau; m_tau, s_tau): four parameters in the param store."""
    m = pyro.param("m", t64(GUIDE_INIT["m"]))
    s = pyro.param("s", t64(GUIDE_INIT["s"]), constraint=dist.constraints.positive)
    m_tau = pyro.param("m_tau", t64(GUIDE_INIT["m_tau"]))
    s_tau = pyro.param("s_tau", t64(GUIDE_INIT["s_tau"]), constraint=dist.constraints.positive)
    pyro.sample("z", dist.Normal(m, s))
    pyro.sample("tau", dist.LogNormal(m_tau, s_tau))


class fresh_param_store:
    """Run a block on an empty param store, then put the caller's params back."""

    def __enter__(self):
        self._saved = pyro.get_param_store().get_state()
        pyro.clear_param_store()

    def __exit__(self, *exc):
        pyro.clear_param_store()
        pyro.get_param_store().set_state(self._saved)
        return False


def traces(model_fn, guide_fn, *args, particles=1, vectorize=False, seed=0):
    """The pairs of (model trace, guide trace) that ``Trace_ELBO`` makes, on a seeded stream.

    Same order of random draws as ``Trace_ELBO(num_particles=particles, ...)``: the guide runs
    first, the model is replayed against it, the plates' index sites are pruned; with
    ``vectorize`` the two programs run once inside a particle plate of size ``particles``
    (Pyro puts it left of every plate; here at dim -2).
    """
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=vectorize, max_plate_nesting=1)
    with seeded(seed):
        if vectorize:
            wrap = elbo._vectorized_num_particles
            model_fn, guide_fn = wrap(model_fn), wrap(guide_fn)
        pairs = []
        for _ in range(1 if vectorize else particles):
            guide_trace = poutine.trace(guide_fn).get_trace(*args)
            model_trace = poutine.trace(poutine.replay(model_fn, trace=guide_trace)).get_trace(*args)
            # a plate records its (sub)sample indices as a sample site; Pyro prunes them
            pairs.append((prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)))
    return pairs


@dataclass(frozen=True)
class SiteTerm:
    """One sample site's contribution to the ELBO estimate."""

    particle: int
    trace: str  # "model" or "guide"
    site: str
    role: str  # "observed" or "latent"
    sign: int  # +1 for model sites, -1 for guide sites
    scale: float
    log_prob_sum: float  # recomputed: scale * sum of fn.log_prob(value)


def site_terms(pairs) -> list[SiteTerm]:
    """Every sample site of every trace, its log-density recomputed from its ``fn`` and ``value``.

    For a site with distribution ``fn``, recorded ``value`` and ``scale``, the term is
    ``scale * sum(fn.log_prob(value))``, with sign ``+`` in the model trace and ``-`` in the
    guide trace. Parameter sites (``type == "param"``) carry no density and are skipped.
    """
    rows = []
    for i, (model_trace, guide_trace) in enumerate(pairs):
        for trace_name, tr, sign in (("model", model_trace, 1), ("guide", guide_trace, -1)):
            for name, site in tr.nodes.items():
                if site["type"] != "sample":
                    continue
                lp = site["fn"].log_prob(site["value"]).detach()
                if site["mask"] is not None:
                    lp = lp * site["mask"]
                total = float(site["scale"]) * float(lp.sum())
                role = "observed" if site["is_observed"] else "latent"
                rows.append(SiteTerm(i, trace_name, name, role, sign, float(site["scale"]), total))
    return rows


def elbo_from_site_terms(rows, particles: int, variant=None) -> float:
    """(1/S) sum over particles of [sum of model-site terms - sum of guide-site terms].

    Variants: ``sum-over-particles`` forgets the 1/S; ``missing-prior`` drops the model's
    latent sites (the prior), keeping the observed ones.
    """
    total = 0.0
    for r in rows:
        if variant == "missing-prior" and r.trace == "model" and r.role == "latent":
            continue
        total += r.sign * r.log_prob_sum
    return total if variant == "sum-over-particles" else total / particles


def trace_elbo_loss(model_fn, guide_fn, *args, particles=1, vectorize=False, seed=0) -> float:
    """``Trace_ELBO(num_particles=particles, vectorize_particles=vectorize).loss`` on a seeded stream."""
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=vectorize, max_plate_nesting=1)
    with seeded(seed):
        return elbo.loss(model_fn, guide_fn, *args)


def num_site_by_site(variant=None) -> Numeric:
    """Trace_ELBO's loss, S particles sequential and vectorized, against the sum of the sites' terms."""
    with float64(), fresh_param_store():
        x = C.data()
        losses, recomputed = [], []
        for vectorize in (False, True):
            losses.append(trace_elbo_loss(model, guide, x, particles=PARTICLES, vectorize=vectorize, seed=11))
            pairs = traces(model, guide, x, particles=PARTICLES, vectorize=vectorize, seed=11)
            recomputed.append(-elbo_from_site_terms(site_terms(pairs), PARTICLES, variant))
        return exact(t64(losses), t64(recomputed))


#: the display of ``trace-elbo-loss-by-sites``; ``loss_S`` is ``Trace_ELBO(num_particles=S).loss``
LOSS_BY_SITES = (
    r"\begin{aligned}"
    r"\texttt{loss}_S = -\frac1S\sum_{k=1}^{S}\Big["
    r"&\sum_{i\,\in\,\text{observed}} \log p(x_i \mid z^{(k)})"
    r" + \sum_{j\,\in\,\text{latent}} \log p(z_j^{(k)} \mid \cdot) \\"
    r"&- \sum_{j\,\in\,\text{guide}} \log q_\lambda(z_j^{(k)} \mid \cdot)\Big]"
    r"\end{aligned}"
)

register(
    Identity(
        id="trace-elbo-loss-by-sites",
        chapter=CHAPTER,
        label="trace-elbo-loss-by-sites",
        statement=LOSS_BY_SITES,
        numeric=num_site_by_site,
        wrong=("sum-over-particles", "missing-prior"),
        summary="bookkeeping: Trace_ELBO's loss holds every model site with +, every guide site with -,"
        " each once, averaged with 1/S",
    )
)


# --------------------------------------------------------------- what SVI.step returns
SVI_LR = 0.05


def svi_step_and_losses(seed=21, lr=SVI_LR):
    """``SVI.step`` once, and ``Trace_ELBO().loss`` on the same draw before and after the step.

    Returns ``(step_value, loss_before, loss_after)``; the param store is fresh inside and
    restored after.
    """
    with float64(), fresh_param_store():
        x = C.data()
        loss_before = trace_elbo_loss(model, guide, x, seed=seed)
        svi = SVI(model, guide, SGD({"lr": lr}), loss=Trace_ELBO(max_plate_nesting=1))
        with seeded(seed):
            step_value = svi.step(x)
        loss_after = trace_elbo_loss(model, guide, x, seed=seed)
    return step_value, loss_before, loss_after


def num_svi_step(variant=None) -> Numeric:
    """The value ``SVI.step`` returns, against ``Trace_ELBO().loss`` with the same draw and parameters.

    Variants: ``flipped-sign`` (step returns the ELBO), ``after-step`` (the loss at the updated
    parameters).
    """
    step_value, before, after = svi_step_and_losses()
    if variant == "flipped-sign":
        return exact(step_value, -before)
    if variant == "after-step":
        return exact(step_value, after)
    return exact(step_value, before)


register(
    Identity(
        id="svi-step-value",
        chapter=CHAPTER,
        label="svi-step-value",
        statement=r"\begin{aligned}\texttt{SVI.step()} &= \texttt{Trace\_ELBO().loss} \\"
        r"&\quad\text{at the same draw } z^{(1)} \sim q_\lambda \\"
        r"&\quad\text{and at the parameters } \lambda \text{ before the update}\end{aligned}",
        numeric=num_svi_step,
        wrong=("flipped-sign", "after-step"),
        summary="SVI.step returns Trace_ELBO's loss (via _differentiable_loss_particle), before the update",
    )
)


def site_table(pairs) -> str:
    """The site terms of traces as a narrow Markdown table: one row per site, one column per particle.

    Each row is labelled with its sign and trace, e.g. ``+ model `x` (observed)``, ``− guide `z```.
    The last row is each particle's ELBO, model terms minus guide terms; the last column the
    average over particles, so the bottom-right entry is minus ``Trace_ELBO``'s loss.
    """
    rows = site_terms(pairs)
    particles = max(r.particle for r in rows) + 1
    keys = list(dict.fromkeys((r.trace, r.site, r.role, r.sign) for r in rows))
    value = {(r.trace, r.site, r.particle): r.log_prob_sum for r in rows}
    head = "| site | " + " | ".join(f"$k={i + 1}$" for i in range(particles)) + " | mean |"
    out = [head, "|---|" + "---:|" * (particles + 1)]
    for trace_name, site, role, sign in keys:
        vals = [value[(trace_name, site, i)] for i in range(particles)]
        cells = " | ".join(f"{v:.4f}" for v in vals)
        label = f"{'+' if sign > 0 else '−'} {trace_name} `{site}`" + (" (obs.)" if role == "observed" else "")
        out.append(f"| {label} | {cells} | {sum(vals) / particles:.4f} |")
    elbos = [sum(r.sign * r.log_prob_sum for r in rows if r.particle == i) for i in range(particles)]
    cells = " | ".join(f"**{v:.4f}**" for v in elbos)
    out.append(f"| **ELBO** | {cells} | **{sum(elbos) / particles:.4f}** |")
    return "\n".join(out)


#: the columns of a decompose site table that fit the page, with their headers
SITE_COLUMNS = {
    "name": "site",
    "role": "role",
    "log_p": r"$\log p$",
    "log_q": r"$\log q$",
    "kl_analytic": r"$\mathrm{KL}(q \,\Vert\, p)$",
}


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def sites_table(records, columns=SITE_COLUMNS) -> str:
    """A Markdown table of some columns of ``decompose(...).sites.to_records()``.

    ``columns`` maps a record key to its header; missing values (``None``) show as a dash.
    The full table has more columns than a page is wide; this shows the ones the text needs.
    """
    records = list(records)
    unknown = [c for c in columns if records and c not in records[0]]
    if unknown:
        raise KeyError(f"sites_table: no column(s) {unknown}; the records have {sorted(records[0])}")
    out = ["| " + " | ".join(columns.values()) + " |", "|---|---|" + "---:|" * (len(columns) - 2)]
    for rec in records:
        cells = [f"`{rec[c]}`" if c == "name" else _cell(rec[c]) for c in columns]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


#: the terms of a decomposition, in the order the text discusses them
TERMS = ("reconstruction", "log_prior", "log_q", "kl_mc", "kl_analytic", "elbo", "elbo_mean_field", "loss")


def terms_table(decomposition, terms=TERMS) -> str:
    """A Markdown table of a ``decompose(...)`` result's terms: name, mean over particles, standard error."""
    d = decomposition.to_dict()
    out = ["| term | mean | standard error |", "|---|---:|---:|"]
    for t in terms:
        se = d["stderr"].get(t)
        out.append(f"| `{t}` | {_cell(d[t])} | {'' if se is None else f'± {se:.4f}'} |")
    return "\n".join(out)


__all__ = [
    "CHAPTER",
    "FUNCTIONS",
    "RELIED_ON",
    "ABSENT_LINE",
    "SourceLine",
    "installed_source",
    "find_line",
    "missing_lines",
    "check_source",
    "mapping_table",
    "model",
    "guide",
    "traces",
    "site_terms",
    "elbo_from_site_terms",
    "trace_elbo_loss",
    "svi_step_and_losses",
    "site_table",
    "sites_table",
    "terms_table",
]
