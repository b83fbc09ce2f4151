r"""``decompose(model, guide, ...)``: the per-term ELBO of your own model and guide.

``Trace_ELBO(num_particles=S).loss(model, guide, *args)`` returns one number,

.. math::

    -\frac1S \sum_{k=1}^S \Big[\log p(x, z^{(k)}) - \log q_\lambda(z^{(k)})\Big],
    \qquad z^{(k)} \sim q_\lambda .

:func:`decompose` draws the *same* :math:`z^{(k)}` (same guide/model order, same poutine
stack, same particle plate, so the same seed gives the same draws as a *fresh*
``Trace_ELBO``; see :func:`decompose` for a reused one) and splits each particle's integrand
over the sites of the two traces:

.. math::

    \underbrace{\log p(x \mid z)}_{\texttt{reconstruction}}
    - \big(\underbrace{\log q_\lambda(z)}_{\texttt{log\_q}}
           - \underbrace{\log p(z)}_{\texttt{log\_prior}}\big)
    = \texttt{reconstruction} - \texttt{kl\_mc}.

Every log-density is the one Pyro scores: computed by ``Trace.compute_log_prob`` /
``compute_score_parts``, so plate subsampling (:math:`N/B`), ``poutine.scale`` and masks are
applied exactly as ``Trace_ELBO`` applies them.  It also reproduces ``TraceMeanField_ELBO``
site by site: ``kl_mean_field`` is the KL term that estimator subtracts (torch's closed-form
:math:`\mathrm{KL}(q \| p)` where torch registers one, the sampled ``log q - log p``
elsewhere), ``elbo_mean_field = reconstruction - kl_mean_field`` is its number, and
``mean_field_note`` says why there is none when ``TraceMeanField_ELBO`` would raise.
``kl_analytic`` is the closed-form KL alone (None unless every latent site has one).

Bad input is refused with a :class:`DecomposeError` naming the site (a guide without a
latent site of the model, a guide site the model lacks, a site marked for enumeration, a
non-finite log-density, a value whose shape Pyro's validation rejects or that pairs every
value with every distribution); a model and a guide that scale a latent site differently --
the one-sided beta-VAE pitfall, which Pyro does not flag -- raise a
:class:`ScaleMismatchWarning` that says what the objective then is.
"""

from __future__ import annotations

import functools
import html
import math
import numbers
import textwrap
import warnings
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer.util import check_fully_reparametrized, is_validation_enabled
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from pyro.util import check_model_guide_match, check_site_shape

__all__ = ["decompose", "Decomposition", "SiteTerm", "SiteTable", "DecomposeError", "ScaleMismatchWarning"]


#: the name Pyro gives the plate that vectorizes particles (``ELBO._vectorized_num_particles``)
PARTICLE_PLATE = "num_particles_vectorized"

#: the per-particle quantities :func:`decompose` reports, in the order of the summary
TERMS = ("elbo", "reconstruction", "log_prior", "log_q", "kl_mc", "kl_analytic", "kl_mean_field", "elbo_mean_field")


class DecomposeError(ValueError):
    """A model/guide pair whose ELBO terms would be wrong or meaningless; the message names the site."""


class ScaleMismatchWarning(UserWarning):
    """The model and the guide scale a latent site by different factors (the one-sided beta pitfall)."""


# ------------------------------------------------------------------------------------ results
@dataclass(frozen=True)
class SiteTerm:
    """One sample site: what it contributes to the ELBO (averaged over the particles).

    ``role`` is ``"observed"`` (a term of the reconstruction, including ``pyro.factor``),
    ``"latent"`` (in the model and the guide), ``"auxiliary"`` (guide only, marked
    ``is_auxiliary``) or ``"deterministic"`` (a ``pyro.deterministic`` record, log-density 0).
    ``log_p`` is the scaled and masked log-density the model gives the site, ``log_q`` the
    guide's; ``kl_analytic`` the closed-form ``KL(q || p)`` scaled by the guide's scale (as
    ``TraceMeanField_ELBO`` scales it), or None when torch has none; ``kl_mean_field`` the
    site's term in ``TraceMeanField_ELBO``'s KL: ``kl_analytic`` where it exists, else the
    sampled ``log q - log p`` (``log q`` alone for an auxiliary site; Pyro takes ``log q`` from
    the guide's entropy term, which is 0 for a non-reparameterized site), None for an observed
    site or when ``TraceMeanField_ELBO`` would raise.
    ``estimator`` is the gradient estimator Pyro uses for the guide site: ``"pathwise"``
    (reparameterized), ``"score function"`` or ``"partly reparameterized"``.
    """

    name: str
    role: str
    distribution: str
    batch_shape: tuple
    event_shape: tuple
    scale: object  # float, or a short description of a tensor scale; None for auxiliary sites
    guide_scale: object
    masked: bool
    log_p: float | None
    log_q: float | None
    kl_analytic: float | None
    kl_mean_field: float | None
    reparameterized: bool | None
    estimator: str | None

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["batch_shape"], d["event_shape"] = list(self.batch_shape), list(self.event_shape)
        return d


#: every column of the site table: field -> (header, numeric)
COLUMNS = {
    "name": ("site", False),
    "role": ("role", False),
    "distribution": ("distribution", False),
    "shape": ("batch | event shape", False),
    "scale": ("scale p / q", False),
    "log_p": ("log p", True),
    "log_q": ("log q", True),
    "kl_analytic": ("KL(q‖p)", True),
    "kl_mean_field": ("mean-field KL", True),
    "estimator": ("estimator", False),
}
#: the columns shown by default (narrow enough for a book's text column); ``sites.show("all")`` shows every one
DEFAULT_COLUMNS = ("name", "role", "distribution", "scale", "log_p", "log_q", "kl_analytic", "estimator")


_TD = "white-space: nowrap; padding: 0.1em 0.4em;"


def _shape(shape) -> str:
    return "(" + ", ".join(str(n) for n in shape) + ("," if len(shape) == 1 else "") + ")"


def _cell(row: SiteTerm, key: str) -> str:
    if key == "shape":
        return f"{_shape(row.batch_shape)} | {_shape(row.event_shape)}"
    v = getattr(row, key)
    if key == "scale":
        if row.guide_scale is None:
            return _fmt_scale(v)
        if v is None:
            return f"– / {_fmt_scale(row.guide_scale)}"
        return f"{_fmt_scale(v)} / {_fmt_scale(row.guide_scale)}" + (" ⚠" if v != row.guide_scale else "")
    if key == "distribution" and row.masked:
        return f"{v} (masked)"
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _fmt_scale(s, digits=4) -> str:
    if isinstance(s, float):
        return f"{s:.{digits}g}"
    return "–" if s is None else str(s)


class SiteTable(tuple):
    """The per-site table: a tuple of :class:`SiteTerm`, indexable by position or by site name.

    ``table.to_records()`` gives plain data (a list of dicts, every field); in a notebook it
    renders as an HTML table of the :data:`DEFAULT_COLUMNS`; ``table.show("all")`` (or
    ``table.show("name", "shape", ...)``) renders the same rows with other columns.
    """

    columns = DEFAULT_COLUMNS

    def __getitem__(self, key):
        if isinstance(key, str):
            for row in self:
                if row.name == key:
                    return row
            raise KeyError(f"no site named {key!r}; sites: {[r.name for r in self]}")
        return tuple.__getitem__(self, key)

    @property
    def names(self) -> list:
        return [row.name for row in self]

    def show(self, *columns) -> SiteTable:
        """The same rows, rendered with ``columns`` (keys of :data:`COLUMNS`, or ``"all"``)."""
        if columns == ("all",):
            columns = tuple(COLUMNS)
        unknown = [c for c in columns if c not in COLUMNS]
        if unknown or not columns:
            raise ValueError(f"unknown columns {unknown}; choose from {list(COLUMNS)} or 'all'")
        view = SiteTable(self)
        view.columns = tuple(columns)
        return view

    def to_records(self) -> list:
        """The table as a list of plain dicts, one per site, with every field."""
        return [row.as_dict() for row in self]

    def _text(self) -> str:
        rows = [[COLUMNS[k][0] for k in self.columns]] + [[_cell(r, k) for k in self.columns] for r in self]
        widths = [max(len(r[i]) for r in rows) for i in range(len(self.columns))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __repr__(self):
        return self._text()

    def _repr_html_(self):
        head = "".join(f'<th style="{_TD}">{html.escape(COLUMNS[k][0])}</th>' for k in self.columns)
        body = "".join(
            "<tr>"
            + "".join(
                f'<td style="{_TD}{" text-align: right;" if COLUMNS[k][1] else ""}">{html.escape(_cell(r, k))}</td>'
                for k in self.columns
            )
            + "</tr>"
            for r in self
        )
        return (
            '<div style="overflow-x: auto;"><table class="decompose-sites" style="font-size: 0.8em;">'
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"
        )


@dataclass(frozen=True)
class Decomposition:
    r"""The ELBO of one evaluation, split into terms (Python floats, means over the particles).

    * ``elbo`` = mean over particles of :math:`\log p(x, z) - \log q(z)`; ``loss`` = ``-elbo``,
      equal to ``Trace_ELBO(...).loss`` on the same draws;
    * ``reconstruction`` = :math:`\log p(x \mid z)`, the observed sites of the model;
    * ``log_prior`` = :math:`\log p(z)`, the latent sites of the model;
    * ``log_q`` = :math:`\log q(z)`, every sample site of the guide;
    * ``kl_mc`` = ``log_q - log_prior``, the sampled KL term, so that
      ``elbo = reconstruction - kl_mc``;
    * ``kl_analytic`` = :math:`\sum_\text{sites} \mathrm{KL}(q \| p)` in closed form, or None when
      some latent site has none;
    * ``kl_mean_field`` = the KL term of ``TraceMeanField_ELBO``: per latent site the closed-form
      KL where torch has one, else the sampled ``log q - log p``, plus ``log q`` of auxiliary
      guide sites (Pyro takes each ``log q`` from the guide's entropy term: 0 for a
      non-reparameterized site); ``elbo_mean_field`` = ``reconstruction - kl_mean_field``,
      equal to ``-TraceMeanField_ELBO(...).loss`` on the same draws.  Both are None when
      ``TraceMeanField_ELBO`` would raise instead (``mean_field_note`` says why); with every
      KL in closed form and no auxiliary site, ``kl_mean_field == kl_analytic``;
    * ``mean_field_note``: None, or why ``elbo_mean_field`` is None, or (with validation off)
      what is wrong with the number ``TraceMeanField_ELBO`` returns for this guide;
    * ``per_particle[term]``: the ``num_particles`` values of each term, and
      ``stderr[term]`` their standard error (None when ``num_particles`` is 1);
    * ``sites``: the per-site :class:`SiteTable`.
    """

    elbo: float
    reconstruction: float
    log_prior: float
    log_q: float
    kl_mc: float
    kl_analytic: float | None
    kl_mean_field: float | None
    elbo_mean_field: float | None
    mean_field_note: str | None
    num_particles: int
    vectorize_particles: bool
    per_particle: dict = field(repr=False)
    stderr: dict = field(repr=False)
    _site_rows: tuple = field(repr=False, compare=False)

    @functools.cached_property
    def sites(self) -> SiteTable:
        """The per-site table (built when first asked for: the numbers are already floats)."""
        return SiteTable(_site_term(*row) for row in self._site_rows)

    @property
    def loss(self) -> float:
        """``-elbo``: what ``Trace_ELBO(...).loss`` returns on the same draws."""
        return -self.elbo

    def to_dict(self) -> dict:
        """Everything as plain data (floats, lists, dicts)."""
        d = {t: getattr(self, t) for t in TERMS}
        d.update(
            loss=self.loss,
            num_particles=self.num_particles,
            vectorize_particles=self.vectorize_particles,
            mean_field_note=self.mean_field_note,
            per_particle={k: list(v) if v is not None else None for k, v in self.per_particle.items()},
            stderr=dict(self.stderr),
            sites=self.sites.to_records(),
        )
        return d

    def _summary_rows(self):
        for t in TERMS:
            v = getattr(self, t)
            se = self.stderr.get(t)
            yield t, ("None" if v is None else f"{v:.6g}"), ("" if se is None else f"± {se:.3g}")

    def __repr__(self):
        s = "s" if self.num_particles > 1 else ""
        lines = [f"Decomposition ({self.num_particles} particle{s}, mean; ± standard error)"]
        lines += [f"  {t:16s} {v:>14s} {se}".rstrip() for t, v, se in self._summary_rows()]
        lines.append(f"  {'loss':16s} {self.loss:>14.6g}")
        if self.mean_field_note:
            lines.append(
                textwrap.fill("mean field: " + self.mean_field_note, 88, initial_indent="  ", subsequent_indent="    ")
            )
        return "\n".join(lines) + "\n" + self.sites._text()

    def _repr_html_(self):
        rows = "".join(
            f'<tr><td style="{_TD}"><code>{t}</code></td><td style="{_TD} text-align: right;">{html.escape(v)}</td>'
            f'<td style="{_TD}">{html.escape(se)}</td></tr>'
            for t, v, se in self._summary_rows()
        )
        rows += f'<tr><td style="{_TD}"><code>loss</code></td><td style="{_TD} text-align: right;">{self.loss:.6g}</td>'
        rows += "<td></td></tr>"
        s = "s" if self.num_particles > 1 else ""
        caption = f"decompose: {self.num_particles} particle{s}" + (", vectorized" if self.vectorize_particles else "")
        note = ""
        if self.mean_field_note:
            note = f'<p class="decompose-note"><em>mean field:</em> {html.escape(self.mean_field_note)}</p>'
        return (
            f'<table class="decompose-terms"><caption>{html.escape(caption)}</caption>'
            f"<thead><tr><th>term</th><th>mean</th><th>standard error</th></tr></thead><tbody>{rows}</tbody></table>"
            + note
            + self.sites._repr_html_()
        )


# ---------------------------------------------------------------- running the two programs
def _particle_plate(fn, num_particles, max_plate_nesting):
    """Pyro's ``ELBO._vectorized_num_particles``: wrap ``fn`` in the outermost particle plate."""
    if num_particles == 1:
        return fn
    return pyro.plate(PARTICLE_PLATE, num_particles, dim=-max_plate_nesting)(fn)


def _run(what: str, fn, particle: str):
    """Call ``fn()``; if the user's program raises, say which one (the original error is chained)."""
    try:
        return fn()
    except DecomposeError:
        raise
    except Exception as e:  # noqa: BLE001  (re-raised with context)
        raise RuntimeError(f"decompose: the {what} raised {type(e).__name__}: {e} ({particle})") from e


def _run_pair(model, guide, args, kwargs, particle):
    """Guide first, then the model replayed against it: ``get_importance_trace`` with graph_type "flat"."""
    unwrapped = poutine.unwrap(guide)
    if isinstance(unwrapped, poutine.messenger.Messenger):  # a GuideMessenger runs model and guide together
        _run("guide", lambda: guide(*args, **kwargs), particle)
        return unwrapped.get_traces()
    guide_trace = _run("guide", lambda: poutine.trace(guide, graph_type="flat").get_trace(*args, **kwargs), particle)
    replayed = poutine.trace(poutine.replay(model, trace=guide_trace), graph_type="flat")
    model_trace = _run("model", lambda: replayed.get_trace(*args, **kwargs), particle)
    return model_trace, guide_trace


def _guess_max_plate_nesting(model, guide, args, kwargs) -> int:
    """Pyro's ``ELBO._guess_max_plate_nesting``: one blocked run of the pair, counting plate dims.

    ``Trace_ELBO(vectorize_particles=True)`` without ``max_plate_nesting`` makes this extra
    run (and its random draws) before the vectorized one, so :func:`decompose` makes it too.
    """
    with poutine.block():
        why = "guessing max_plate_nesting"
        guide_trace = _run("guide", lambda: poutine.trace(guide).get_trace(*args, **kwargs), why)
        replayed = poutine.trace(poutine.replay(model, trace=guide_trace))
        model_trace = _run("model", lambda: replayed.get_trace(*args, **kwargs), why)
    guide_trace, model_trace = prune_subsample_sites(guide_trace), prune_subsample_sites(model_trace)
    sites = [s for tr in (model_trace, guide_trace) for s in tr.nodes.values() if s["type"] == "sample"]
    if is_validation_enabled():
        guide_trace.compute_log_prob()
        model_trace.compute_log_prob()
        for where, trace in (("model", model_trace), ("guide", guide_trace)):
            for name, site in trace.nodes.items():
                if site["type"] == "sample":
                    _check_shape(where, name, site, float("inf"))
    dims = [frame.dim for site in sites for frame in site["cond_indep_stack"] if frame.vectorized]
    return -min(dims) if dims else 0


def _sample_sites(trace) -> dict:
    return {name: s for name, s in trace.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)}


def _check_pair(model_trace, guide_trace):
    """Refuse what would make the terms wrong or meaningless; every message names the site."""
    model_sites, guide_sites = _sample_sites(model_trace), _sample_sites(guide_trace)
    for where, sites in (("guide", guide_sites), ("model", model_sites)):
        for name, site in sites.items():
            how = site["infer"].get("enumerate")
            if how and not site["is_observed"]:
                raise DecomposeError(
                    f"{where} site {name!r} is marked for enumeration (infer={{'enumerate': {how!r}}}). "
                    "Trace_ELBO does not enumerate: it would draw one value and score it, a different objective. "
                    "Use TraceEnum_ELBO for this model, or remove the enumerate flag; decompose splits Trace_ELBO only."
                )
    latent = [n for n, s in model_sites.items() if not s["is_observed"]]
    missing = [n for n in latent if n not in guide_sites]
    if missing:
        raise DecomposeError(
            f"the guide has no sample site {missing[0]!r}, a latent site of the model"
            + (f" (nor {missing[1:]})" if len(missing) > 1 else "")
            + ". The model would draw it from its prior and Trace_ELBO would score a different objective; "
            "add a pyro.sample site of that name to the guide, or observe it in the model."
        )
    for name, site in guide_sites.items():
        if name not in model_sites:
            if not (site["infer"].get("is_auxiliary") or site["infer"].get("_deterministic")):
                raise DecomposeError(
                    f"the guide has a sample site {name!r} that the model lacks; Trace_ELBO would add its log q "
                    "to the loss with no log p to match. Remove it, rename it to the model's site, or mark it "
                    "infer={'is_auxiliary': True} if it is an auxiliary variable of the guide."
                )
        elif model_sites[name]["is_observed"] and not site["infer"].get("_deterministic"):
            raise DecomposeError(
                f"the guide samples {name!r}, which the model observes: replay ignores the guide's value, "
                "yet Trace_ELBO would still subtract its log q. Remove the site from the guide."
            )


def _check_site(where: str, name: str, site):
    """Refuse a value and a distribution that broadcast *each other*: every value against every distribution.

    Broadcasting one way is fine and common: one value scored by several distributions (a
    scalar ``obs`` inside a plate, or data shared by vectorized particles), or one distribution
    scoring several values.  Both at once -- an ``obs`` of shape ``(N, 1)`` under a
    distribution of batch shape ``(N,)`` -- gives a log-prob of shape ``(N, N)``: every datum
    is scored against every distribution of the plate, counted ``N`` times, and Pyro (without
    validation) sums it silently.
    """
    fn, value = site["fn"], site["value"]
    if not isinstance(value, torch.Tensor):
        return
    batch = tuple(fn.batch_shape)
    vbatch = tuple(value.shape[: max(value.dim() - len(fn.event_shape), 0)])
    n = max(len(batch), len(vbatch))
    batch, vbatch = (1,) * (n - len(batch)) + batch, (1,) * (n - len(vbatch)) + vbatch
    value_spread = any(v == 1 < b for v, b in zip(vbatch, batch, strict=True))
    fn_spread = any(b == 1 < v for v, b in zip(vbatch, batch, strict=True))
    if not (value_spread and fn_spread):
        return
    what = "observed value" if site["is_observed"] else "value (drawn by the guide)"
    lp = torch.broadcast_shapes(batch, vbatch)
    raise DecomposeError(
        f"{where} site {name!r}: the {what} has shape {tuple(value.shape)}, but the distribution has "
        f"batch shape {tuple(fn.batch_shape)} and event shape {tuple(fn.event_shape)}; each broadcasts the other, "
        f"so its log-density has shape {tuple(lp)}: every value is scored against every distribution and "
        f"counted more than once. Give the value shape {tuple(fn.batch_shape + fn.event_shape)} "
        "(or .to_event the distribution)."
    )


def _check_shape(where: str, name: str, site, max_plate_nesting):
    """Pyro's ``check_site_shape`` (run under validation, as ``Trace_ELBO`` runs it), naming the site."""
    try:
        check_site_shape(site, max_plate_nesting)
    except ValueError as e:
        message = " ".join(str(e).split())
        raise DecomposeError(f"{where} site {name!r}: Pyro's validation rejects its shape ({message})") from e


def _one_trace(model, guide, args, kwargs, max_plate_nesting, particle):
    """One (model_trace, guide_trace): ``Trace_ELBO._get_trace`` with decompose's checks added."""
    model_trace, guide_trace = _run_pair(model, guide, args, kwargs, particle)
    _check_pair(model_trace, guide_trace)
    if is_validation_enabled():
        try:
            check_model_guide_match(model_trace, guide_trace, max_plate_nesting)
        except ValueError as e:
            raise DecomposeError(f"Pyro's validation rejects the pair: {' '.join(str(e).split())}") from e
    guide_trace = prune_subsample_sites(guide_trace)
    model_trace = prune_subsample_sites(model_trace)
    model_trace.compute_log_prob()
    guide_trace.compute_score_parts()
    for where, trace in (("model", model_trace), ("guide", guide_trace)):
        for name, site in trace.nodes.items():
            if site["type"] == "sample":
                _check_site(where, name, site)
                if is_validation_enabled():
                    _check_shape(where, name, site, max_plate_nesting)
    return model_trace, guide_trace


# ------------------------------------------------------------------------ reading the traces
def _per_particle(t, num_vectorized: int, dim: int | None):
    """Sum a scaled log-prob (or KL) tensor to one value per particle.

    Without vectorization this is ``t.sum()``, a 0-dim tensor.  With ``num_vectorized``
    particles in the particle plate at ``dim``, every other dim is summed: a tensor of shape
    ``(num_vectorized,)``.  A term that does not vary along the particle dim (size 1) entered
    Pyro's sum once for all particles, so each particle gets 1/P of it.
    """
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(float(t))
    if dim is None:
        return t.sum()
    if t.dim() >= -dim and t.shape[dim] == num_vectorized:
        if t.dim() > -dim:  # some dims left of the particle plate: bring the particle dim first
            t = t.movedim(dim, 0)
        return t.reshape(num_vectorized, -1).sum(1)
    return (t.sum() / num_vectorized).expand(num_vectorized)


def _kl(guide_site, model_site):
    """``TraceMeanField_ELBO``'s closed-form term: KL(q || p), scaled and masked by the guide site."""
    try:
        kl = torch.distributions.kl_divergence(guide_site["fn"], model_site["fn"])
    except NotImplementedError:
        return None
    kl = scale_and_mask(kl, scale=guide_site["scale"], mask=guide_site["mask"])
    if not torch.is_tensor(kl):
        kl = kl * torch.Size(guide_site["fn"].batch_shape).numel()
    return kl


def _describe(fn) -> str:
    """A short name of a distribution: ``Normal``, ``Independent(Normal, 1)``, ``Unit (pyro.factor)``."""
    if isinstance(fn, dist.MaskedDistribution):
        return _describe(fn.base_dist)
    if isinstance(fn, dist.ExpandedDistribution):
        return _describe(fn.base_dist)
    if isinstance(fn, torch.distributions.Independent):
        return f"Independent({_describe(fn.base_dist)}, {fn.reinterpreted_batch_ndims})"
    if isinstance(fn, dist.Unit):
        return "Unit (pyro.factor)"
    return type(fn).__name__


def _is_masked(site) -> bool:
    """Masked by ``poutine.mask`` (the site's mask) or by ``.mask()`` (a MaskedDistribution)."""
    fn = site["fn"]
    while isinstance(fn, (dist.ExpandedDistribution, torch.distributions.Independent)):
        fn = fn.base_dist
    return site["mask"] is not None or isinstance(fn, dist.MaskedDistribution)


def _scale_value(s):
    """A site's scale as a float, or a short description when it is a non-scalar tensor."""
    if isinstance(s, numbers.Number):
        return float(s)
    if isinstance(s, torch.Tensor) and s.numel() == 1:
        return float(s)
    return f"tensor{tuple(s.shape)}"


def _same_scale(a, b) -> bool:
    if isinstance(a, numbers.Number) and isinstance(b, numbers.Number):
        return a == b
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    try:
        a, b = torch.broadcast_tensors(a, b)
    except RuntimeError:
        return False
    return bool((a == b).all())


def _estimator(guide_site) -> str:
    parts = guide_site["score_parts"]
    if is_identically_zero(parts.score_function):
        return "pathwise"
    if is_identically_zero(parts.entropy_term):
        return "score function"
    return "partly reparameterized"


def _scale_warning(name, model_scale, guide_scale) -> str:
    ms, gs = _fmt_scale(_scale_value(model_scale), 6), _fmt_scale(_scale_value(guide_scale), 6)
    if isinstance(_scale_value(model_scale), float) and isinstance(_scale_value(guide_scale), float):
        objective = (
            f"E_q[log p(x|z)] - {ms} * KL(q||p) + ({gs} - {ms}) * H[q] for this site, where H[q] is the guide's entropy"
        )
    else:
        objective = "E_q[log p(x|z)] - s_p * KL(q||p) + (s_q - s_p) * H[q] for this site (elementwise scales)"
    return (
        f"latent site {name!r} is scaled by {ms} in the model (log p) but by {gs} in the guide (log q). "
        f"The objective is then {objective}, not reconstruction - {ms} * KL: the entropy term does not cancel. "
        "Pyro does not check this. To weight the KL by a factor beta, scale the site by the same factor in the "
        "guide too (poutine.scale around the pyro.sample in both programs); with plate subsampling, put the "
        "guide's local sites in the same subsampled plate."
    )


def _entropy_source(guide_site) -> str:
    """Where ``TraceMeanField_ELBO``'s fallback finds the site's ``log q``: its ``score_parts.entropy_term``.

    ``"q"`` when that is the site's ``log_prob`` itself (a reparameterized site), ``"zero"``
    when it is 0 (a non-reparameterized site), ``"ent"`` otherwise (recorded separately).
    """
    parts = guide_site["score_parts"]
    if is_identically_zero(parts.entropy_term):
        return "zero"
    return "q" if parts.entropy_term is parts.log_prob else "ent"


def _reparameterization_problem(guide_site) -> str | None:
    """Pyro's ``check_fully_reparametrized``: None, or what the site is instead."""
    try:
        check_fully_reparametrized(guide_site)
    except NotImplementedError:
        if guide_site["fn"].has_rsample:
            return "only partly reparameterized"
        return "not reparameterized (a score-function site)"
    return None


def _mean_field_site(name, g, model_site, record, acc):
    """``TraceMeanField_ELBO._differentiable_loss_particle`` for one guide site, as records and notes.

    A latent site (``model_site`` given) contributes its closed-form KL, or, where torch has
    none, ``entropy_term - log p``; an auxiliary site its entropy term.  What Pyro would raise
    on becomes ``acc["mf_refused"]`` (the first, in Pyro's order); with validation off, a
    non-reparameterized site gets a note in ``acc["mf_notes"]``.
    """

    def refuse(message):
        if acc["mf_refused"] is None:
            acc["mf_refused"] = message

    if model_site is None and not g["infer"].get("is_auxiliary"):
        refuse(
            f"TraceMeanField_ELBO fails an assertion (AssertionError) at guide site {name!r}, a pyro.deterministic "
            "record the model lacks: it requires every guide site the model lacks to be marked is_auxiliary. "
            "Record the value in the model instead (Trace_ELBO is unaffected)."
        )
        return
    problem = _reparameterization_problem(g)
    if problem and is_validation_enabled():
        refuse(
            f"TraceMeanField_ELBO raises NotImplementedError at guide site {name!r}, which is {problem}: with "
            "validation on, it requires every guide site to be fully reparameterized. Use Trace_ELBO (elbo, kl_mc) "
            "for this guide."
        )
    kl = None if model_site is None else _kl(g, model_site)
    if kl is not None:
        if torch.is_tensor(kl) and kl.shape != g["fn"].batch_shape:
            refuse(
                f"TraceMeanField_ELBO fails an assertion (AssertionError) at latent site {name!r}: its KL has shape "
                f"{tuple(kl.shape)}, not the guide site's batch shape {tuple(g['fn'].batch_shape)}. Give the guide "
                "site the model site's batch shape (the same plates)."
            )
        record("kl", name, kl)
        source = "kl"
    else:
        if model_site is not None:
            acc["kl_missing"].add(name)
        source = _entropy_source(g)
        if source == "zero":  # Pyro calls entropy_term.sum() on the number 0
            why = "torch has no closed-form KL for it, and Pyro's sampled fallback uses" if model_site else "Pyro uses"
            refuse(
                f"TraceMeanField_ELBO fails (AttributeError: 'int' object has no attribute 'sum') at guide site "
                f"{name!r}, which is {problem}: {why} the site's entropy term, the number 0 for such a site. "
                "Use Trace_ELBO (elbo, kl_mc) for this guide."
            )
        elif source == "ent":
            record("ent", name, g["score_parts"].entropy_term)
    acc["mf_source"][name] = source
    if problem and not is_validation_enabled() and name not in acc["mf_notes"]:
        if source == "kl":
            acc["mf_notes"][name] = (
                f"guide site {name!r} is {problem}: TraceMeanField_ELBO's value uses its "
                "closed-form KL, but its gradient lacks the score-function term (with validation on, Pyro refuses "
                "this guide)."
            )
        elif source == "ent":
            acc["mf_notes"][name] = (
                f"guide site {name!r} is {problem}: TraceMeanField_ELBO's number uses its entropy term in place of "
                "its log q (with validation on, Pyro refuses this guide)."
            )


def _read(model_trace, guide_trace, num_vectorized, dim, acc):
    """One pass over a pair of traces: record each site's per-particle terms in ``acc``.

    ``acc["keys"]`` gets ``(kind, site, run)`` with kind ``"p"`` (log p), ``"q"`` (log q),
    ``"kl"`` (closed-form KL) or ``"ent"`` (an entropy term that is not ``log q``), and
    ``acc["tensors"]`` the matching tensors: all become floats in one go later.
    """
    rows, keys, tensors, run = acc["rows"], acc["keys"], acc["tensors"], acc["run"]
    guide_sites = guide_trace.nodes

    def record(kind, name, site_or_tensor):
        keys.append((kind, name, run))
        if kind in ("kl", "ent"):
            tensors.append(_per_particle(site_or_tensor, num_vectorized, dim))
        elif dim is None:
            tensors.append(site_or_tensor["log_prob_sum"])
        else:
            tensors.append(_per_particle(site_or_tensor["log_prob"], num_vectorized, dim))

    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        record("p", name, site)
        if site["is_observed"]:
            if name not in rows:
                rows[name] = ["deterministic" if site["infer"].get("_deterministic") else "observed", site, None]
            continue
        g = guide_sites[name]
        if name not in rows:
            rows[name] = ["latent", site, g]
            if not _same_scale(site["scale"], g["scale"]):
                warnings.warn(_scale_warning(name, site["scale"], g["scale"]), ScaleMismatchWarning, stacklevel=3)
        record("q", name, g)
        _mean_field_site(name, g, site, record, acc)
    for name, g in guide_sites.items():
        if g["type"] == "sample" and name not in model_trace.nodes:
            record("q", name, g)
            if name not in rows:
                rows[name] = ["deterministic" if g["infer"].get("_deterministic") else "auxiliary", None, g]
            _mean_field_site(name, g, None, record, acc)


# ----------------------------------------------------------------------------- the function
def decompose(
    model,
    guide,
    *args,
    num_particles: int = 1,
    vectorize_particles: bool = False,
    max_plate_nesting: int | None = None,
    **kwargs,
) -> Decomposition:
    r"""Split the ELBO that ``Trace_ELBO`` estimates for ``(model, guide)`` into its terms.

    Runs the guide and the model exactly as ``Trace_ELBO(num_particles=num_particles,
    vectorize_particles=vectorize_particles, max_plate_nesting=...)`` runs them and returns
    a :class:`Decomposition`:

    .. math::

        \texttt{elbo} = \frac1S \sum_{k=1}^S \big[\log p(x, z^{(k)}) - \log q(z^{(k)})\big]
        = \texttt{reconstruction} - \texttt{kl\_mc},
        \qquad \texttt{kl\_mc} = \texttt{log\_q} - \texttt{log\_prior}.

    ``args`` and ``kwargs`` go to both programs.  The values are computed without building
    an autograd graph; the param store ends as running the guide leaves it.

    **Same draws.** After the same ``pyro.set_rng_seed``, the draws are those of a *fresh*
    ``Trace_ELBO`` with the same options, so ``loss`` equals its ``.loss``.  With
    ``vectorize_particles=True`` and no ``max_plate_nesting``, a ``Trace_ELBO`` object guesses
    the plate nesting with one extra run of the pair (which consumes random draws) the first
    time it is called, and never again: it stores the guess.  :func:`decompose` keeps no
    state, so without ``max_plate_nesting`` it makes that run on every call -- in step with a
    fresh ``Trace_ELBO``, out of step with a reused one (an SVI loss after its first step).
    Pass ``max_plate_nesting`` (the number of plate dims of your model, without the particle
    plate; give ``Trace_ELBO`` the same value) and neither makes the run: the draws then match
    a fresh or a reused ``Trace_ELBO``.  Without ``vectorize_particles`` nothing is guessed.

    Raises :class:`DecomposeError` for a pair whose terms would be wrong (see the module
    docstring) and ``RuntimeError`` (chaining the original) when the model or guide raises;
    warns :class:`ScaleMismatchWarning` when model and guide scale a latent site differently.
    """
    if isinstance(num_particles, bool) or not isinstance(num_particles, numbers.Integral) or num_particles < 1:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
    num_particles = int(num_particles)
    if max_plate_nesting is not None and (not isinstance(max_plate_nesting, numbers.Integral) or max_plate_nesting < 0):
        raise ValueError(f"max_plate_nesting must be a non-negative integer or None, got {max_plate_nesting!r}")
    if not callable(model) or not callable(guide):
        raise TypeError("decompose(model, guide, *args): model and guide must be callables (Pyro programs)")

    acc = {"rows": {}, "keys": [], "tensors": [], "kl_missing": set(), "run": 0}
    acc.update(mf_source={}, mf_refused=None, mf_notes={})
    elbo = 0.0
    with torch.no_grad():
        if vectorize_particles:
            mpn = float("inf") if max_plate_nesting is None else max_plate_nesting
            if mpn == float("inf"):
                mpn = _guess_max_plate_nesting(model, guide, args, kwargs)
            if num_particles > 1:
                mpn += 1  # the particle plate is one more dim (as in ELBO.__init__ / _guess_max_plate_nesting)
            m = _particle_plate(model, num_particles, mpn)
            g = _particle_plate(guide, num_particles, mpn)
            why = f"{num_particles} vectorized particles"
            dim = -mpn if num_particles > 1 else None
            model_trace, guide_trace = _one_trace(m, g, args, kwargs, mpn, why)
            elbo += (float(model_trace.log_prob_sum()) - float(guide_trace.log_prob_sum())) / num_particles
            _read(model_trace, guide_trace, num_particles, dim, acc)
        else:
            mpn = float("inf") if max_plate_nesting is None else max_plate_nesting
            for i in range(num_particles):
                acc["run"] = i
                particle = f"particle {i + 1} of {num_particles}"
                model_trace, guide_trace = _one_trace(model, guide, args, kwargs, mpn, particle)
                elbo += (float(model_trace.log_prob_sum()) - float(guide_trace.log_prob_sum())) / num_particles
                _read(model_trace, guide_trace, 1, None, acc)
        return _assemble(elbo, acc, num_particles, bool(vectorize_particles))


def _floats(tensors: list, vectorized: bool) -> list:
    """All recorded tensors as Python floats, with one conversion: a list of lists (one per key).

    The tensors are 0-dim (one particle per run) or, ``vectorized``, all of one shape ``(S,)``.
    """
    if not tensors:
        return []
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        tensors = [t.to(torch.float64) for t in tensors]
    if not vectorized:
        return [[v] for v in torch.stack(tensors).tolist()]
    n = tensors[0].numel()
    flat = torch.cat(tensors).tolist()
    return [flat[i : i + n] for i in range(0, len(flat), n)]


def _assemble(elbo, acc, num_particles, vectorized) -> Decomposition:
    """Per-site, per-particle floats -> the totals, their standard errors, the site rows."""
    rows, kl_missing = acc["rows"], acc["kl_missing"]
    runs = 1 if vectorized else num_particles
    per_run = num_particles if vectorized else 1  # values per run of the pair of programs
    table = {}
    for (kind, name, run), vals in zip(acc["keys"], _floats(acc["tensors"], per_run > 1), strict=True):
        if kind == "kl" and name in kl_missing:
            continue
        # a site absent from some particles (dynamic structure) contributes 0 there
        table.setdefault((kind, name), [0.0] * (runs * per_run))[run * per_run : (run + 1) * per_run] = vals

    bad = [
        f"{where} site {name!r} is {v} (particle {i + 1})"
        for kind, where in (
            ("q", "log q at guide"),
            ("p", "log p at model"),
            ("kl", "KL(q||p) at"),
            ("ent", "the entropy term at guide"),
        )
        for (k, name), vals in table.items()
        if k == kind
        for i, v in enumerate(vals)
        if not math.isfinite(v)
    ]
    if bad:
        raise DecomposeError(
            "non-finite terms: " + "; ".join(dict.fromkeys(bad)) + ". An ELBO with a non-finite term is meaningless: "
            "check the site's parameters (NaN?) and that its value lies in the distribution's support."
        )

    def total(kind, roles):
        out = [0.0] * num_particles
        for name, row in rows.items():
            vals = table.get((kind, name))
            if row[0] in roles and vals is not None:
                out = [a + b for a, b in zip(out, vals, strict=True)]
        return out

    # deterministic sites score 0 (their Delta is masked); they are summed only to follow Pyro exactly
    recon, prior = total("p", ("observed", "deterministic")), total("p", ("latent",))
    log_q = total("q", ("latent", "auxiliary", "deterministic"))
    per = {
        "elbo": [r + p - q for r, p, q in zip(recon, prior, log_q, strict=True)],
        "reconstruction": recon,
        "log_prior": prior,
        "log_q": log_q,
        "kl_mc": [q - p for q, p in zip(log_q, prior, strict=True)],
        "kl_analytic": None if kl_missing else total("kl", ("latent",)),
        "kl_mean_field": None,
        "elbo_mean_field": None,
    }
    site_mf = {} if acc["mf_refused"] else _mean_field_terms(table, rows, acc["mf_source"], num_particles)
    if not acc["mf_refused"]:
        kl_mf = [0.0] * num_particles  # summed in site order, as total() sums: equal to kl_analytic when that exists
        for vals in site_mf.values():
            kl_mf = [a + b for a, b in zip(kl_mf, vals, strict=True)]
        per["kl_mean_field"] = kl_mf
        per["elbo_mean_field"] = [r - k for r, k in zip(recon, kl_mf, strict=True)]
    note = acc["mf_refused"] or (" ".join(acc["mf_notes"].values()) or None)

    def mean(v):
        return None if v is None else math.fsum(v) / num_particles

    def stderr(v):
        if v is None or num_particles == 1:
            return None
        mu = mean(v)
        return math.sqrt(math.fsum((x - mu) ** 2 for x in v) / (num_particles - 1) / num_particles)

    site_rows = tuple(
        (
            name,
            role,
            msite,
            gsite,
            mean(table.get(("p", name))),
            mean(table.get(("q", name))),
            mean(table.get(("kl", name))),
            mean(site_mf.get(name)),
        )
        for name, (role, msite, gsite) in rows.items()
    )
    return Decomposition(
        elbo=elbo,
        reconstruction=mean(per["reconstruction"]),
        log_prior=mean(per["log_prior"]),
        log_q=mean(per["log_q"]),
        kl_mc=mean(per["kl_mc"]),
        kl_analytic=mean(per["kl_analytic"]),
        kl_mean_field=mean(per["kl_mean_field"]),
        elbo_mean_field=mean(per["elbo_mean_field"]),
        mean_field_note=note,
        num_particles=num_particles,
        vectorize_particles=vectorized,
        per_particle=per,
        stderr={t: stderr(per[t]) for t in TERMS},
        _site_rows=site_rows,
    )


def _mean_field_terms(table, rows, sources, num_particles) -> dict:
    """Each guide site's per-particle term in ``TraceMeanField_ELBO``'s KL (see :func:`_mean_field_site`)."""
    zeros = [0.0] * num_particles
    out = {}
    for name, source in sources.items():
        log_p = table.get(("p", name), zeros) if rows[name][0] == "latent" else zeros
        log_q = {"kl": None, "q": table.get(("q", name)), "ent": table.get(("ent", name)), "zero": zeros}[source]
        if source == "kl":
            out[name] = table.get(("kl", name), zeros)
        else:
            out[name] = [q - p for q, p in zip(log_q or zeros, log_p, strict=True)]
    return out


def _site_term(name, role, msite, gsite, log_p, log_q, kl, kl_mf) -> SiteTerm:
    """A row of the site table, from the recorded sites (their distributions' types and shapes)."""
    fn = (msite if msite is not None else gsite)["fn"]
    return SiteTerm(
        name=name,
        role=role,
        distribution=_describe(fn),
        batch_shape=tuple(fn.batch_shape),
        event_shape=tuple(fn.event_shape),
        scale=None if msite is None else _scale_value(msite["scale"]),
        guide_scale=None if gsite is None else _scale_value(gsite["scale"]),
        masked=any(_is_masked(s) for s in (msite, gsite) if s is not None),
        log_p=log_p,
        log_q=log_q,
        kl_analytic=kl,
        kl_mean_field=kl_mf,
        reparameterized=None if gsite is None else bool(gsite["fn"].has_rsample),
        estimator=None if gsite is None else _estimator(gsite),
    )
