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

Bad input is refused with a :class:`DecomposeError` (a ``ValueError``) naming the site, with
the exception Pyro or the user's program raised chained as ``__cause__``: a guide without a
latent site of the model, a guide site the model lacks, a site marked for enumeration, a
non-finite log-density, a value whose shape Pyro's validation rejects, a value and a
distribution that broadcast each other (in batch or event dims, whatever the validation flag),
observed data whose dim lines up with the plate of vectorized particles, a latent site with a
batch dim that no plate declares.  A model and a guide that scale or mask a latent site
differently -- the one-sided beta-VAE pitfall, which Pyro does not flag -- raise one
:class:`ScaleMismatchWarning` per call that lists the sites and says what the objective then is.

Every term is accumulated in float64 whatever the model's dtype; ``loss`` is Pyro's own number.
:func:`read_pair` and :func:`split_terms` are the term-splitting code that the
``TermsTrace_ELBO`` recorders (:mod:`elbo_terms.terms`) share.
"""

from __future__ import annotations

import functools
import html
import math
import numbers
import textwrap
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer.util import check_fully_reparametrized, is_validation_enabled
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from pyro.util import check_model_guide_match, check_site_shape

from ._versions import check_pyro_version

__all__ = [
    "decompose",
    "Decomposition",
    "SiteTerm",
    "SiteTable",
    "DecomposeError",
    "ScaleMismatchWarning",
    "read_pair",
    "split_terms",
    "term_means",
    "check_finite",
]


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
DEFAULT_COLUMNS = ("name", "role", "distribution", "log_p", "log_q", "kl_analytic", "estimator")


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


class _PerParticle(Mapping):
    """``per_particle``: term -> list of the particles' values (rows of one float64 tensor, made lists when read).

    Every term of :data:`TERMS` is a key; a term left out (``names`` lacks it) maps to None.
    """

    def __init__(self, names: tuple, rows):
        self._index = {n: i for i, n in enumerate(names)}
        self._rows = rows
        self._lists = {}

    def __getitem__(self, term):
        if term not in self._lists:
            if term not in TERMS:
                raise KeyError(term)
            i = self._index.get(term)
            self._lists[term] = None if i is None else self._rows[i].tolist()
        return self._lists[term]

    def __iter__(self):
        return iter(TERMS)

    def __len__(self):
        return len(TERMS)

    def __repr__(self):
        return f"per_particle({', '.join(TERMS)})"


class _Stderr(Mapping):
    """``stderr``: term -> standard error of its mean (None for one particle or a term left out), computed when read."""

    def __init__(self, names: tuple, rows, mu, num_particles: int):
        self._args = (names, rows, mu, num_particles)
        self._values = None

    def _get(self) -> dict:
        if self._values is None:
            self._values = _stderr_values(*self._args)
            self._args = None
        return self._values

    def __getitem__(self, term):
        return self._get()[term]

    def __iter__(self):
        return iter(TERMS)

    def __len__(self):
        return len(TERMS)

    def __repr__(self):
        return repr(self._get())


@dataclass(frozen=True)
class Decomposition:
    r"""The ELBO of one evaluation, split into terms (Python floats, means over the particles).

    * ``loss``: Pyro's own number, computed exactly as ``Trace_ELBO(...).loss`` computes it:
      bit-identical to it on the same draws, whatever the model's dtype;
    * ``elbo`` = mean over particles of :math:`\log p(x, z) - \log q(z)`, accumulated in
      float64 (see below); ``-loss`` up to the rounding of Pyro's own sum;
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
    * ``per_particle[term]``: the ``num_particles`` values of each term (a list of floats), and
      ``stderr[term]`` their standard error (None when ``num_particles`` is 1);
    * ``sites``: the per-site :class:`SiteTable`.

    **Precision.** Every term is accumulated in float64 whatever the model's dtype: each
    site's scaled log-density tensor is summed with float64 accumulation, the sites and the
    particles are added in float64, and every mean is ``sum / num_particles`` of the float64
    ``per_particle`` values (so ``elbo`` is exactly the mean of ``per_particle["elbo"]``).
    ``reconstruction - kl_mc == elbo`` therefore holds to float64 rounding (about 1e-16
    relative) even for a float32 model.  ``loss`` alone is Pyro's arithmetic, in the model's
    dtype: for a float32 model ``-loss`` and ``elbo`` differ by float32 rounding (about 1e-7
    relative); for a float64 model by float64 rounding.
    """

    loss: float
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
    per_particle: Mapping = field(repr=False)
    stderr: Mapping = field(repr=False)
    _site_rows: object = field(repr=False, compare=False)  # a function that returns the rows of the site table

    @functools.cached_property
    def sites(self) -> SiteTable:
        """The per-site table (built when first asked for: the numbers are already floats)."""
        return SiteTable(_site_term(*row) for row in self._site_rows())

    def to_dict(self) -> dict:
        """Everything as plain data (floats, lists, dicts)."""
        d = {t: getattr(self, t) for t in TERMS}
        d.update(
            loss=self.loss,
            num_particles=self.num_particles,
            vectorize_particles=self.vectorize_particles,
            mean_field_note=self.mean_field_note,
            per_particle={k: self.per_particle[k] for k in self.per_particle},
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


_PRIMITIVES = ("sample", "factor", "deterministic", "param", "subsample", "plate")


def _site_in_traceback(exc) -> str | None:
    """The ``name`` of the innermost Pyro primitive (``pyro.sample``, ``pyro.factor``, ...) the error passed through."""
    name, tb = None, exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name in _PRIMITIVES and code.co_filename.replace("\\", "/").endswith("pyro/primitives.py"):
            value = tb.tb_frame.f_locals.get("name")
            if isinstance(value, str):
                name = value
        tb = tb.tb_next
    return name


def _run(what: str, fn, particle: str):
    """Call ``fn()``; if the user's program raises, a :class:`DecomposeError` says which one, at which site.

    The original exception is chained (``__cause__``), so its traceback still points at the user's line.
    """
    try:
        return fn()
    except DecomposeError:
        raise
    except Exception as e:  # noqa: BLE001  (re-raised with context)
        site = _site_in_traceback(e)
        where = f" at site {site!r}" if site else ""
        message = " ".join(str(e).split())
        raise DecomposeError(f"the {what} raised {type(e).__name__}{where}: {message} ({particle})") from e


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
        _log_probs(model_trace, guide_trace, score_parts=False)
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
                    "Use TraceEnum_ELBO for this model, or remove the enumerate flag; the ELBO terms here are "
                    "Trace_ELBO's."
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
    """Refuse a value and a distribution that broadcast *each other*, in batch or in event dims.

    Broadcasting one way is fine and common: one value scored by several distributions (a
    scalar ``obs`` inside a plate, or data shared by vectorized particles), or one distribution
    scoring several values.  Both at once -- an ``obs`` of shape ``(N, 1)`` under a
    distribution of batch shape ``(N,)`` -- gives a log-prob of shape ``(N, N)``: every datum
    is scored against every distribution of the plate, counted ``N`` times, and Pyro (without
    validation) sums it silently.  In the event dims no broadcasting is meaningful: the value's
    rightmost dims must be the event shape (torch's validation demands it; this check does not
    depend on validation).
    """
    fn, value = site["fn"], site["value"]
    if not isinstance(value, torch.Tensor) or value.shape == fn.batch_shape + fn.event_shape:
        return  # not a tensor, or exactly the distribution's shape: nothing broadcasts
    what = "observed value" if site["is_observed"] else "value (drawn by the guide)"
    event = tuple(fn.event_shape)
    if event and tuple(value.shape[max(value.dim() - len(event), 0) :]) != event:
        raise DecomposeError(
            f"{where} site {name!r}: the {what} has shape {tuple(value.shape)}, whose rightmost dims are not the "
            f"distribution's event shape {event}: the log-density broadcasts the event (a value would be counted "
            f"more than once, or scored against a density of another dimension). Give the value the event shape "
            f"{event}, or the distribution the value's (e.g. an event of shape {tuple(value.shape[-len(event) :])})."
        )
    batch = tuple(fn.batch_shape)
    vbatch = tuple(value.shape[: max(value.dim() - len(event), 0)])
    n = max(len(batch), len(vbatch))
    batch, vbatch = (1,) * (n - len(batch)) + batch, (1,) * (n - len(vbatch)) + vbatch
    value_spread = any(v == 1 < b for v, b in zip(vbatch, batch, strict=True))
    fn_spread = any(b == 1 < v for v, b in zip(vbatch, batch, strict=True))
    if not (value_spread and fn_spread):
        return
    lp = torch.broadcast_shapes(batch, vbatch)
    raise DecomposeError(
        f"{where} site {name!r}: the {what} has shape {tuple(value.shape)}, but the distribution has "
        f"batch shape {tuple(fn.batch_shape)} and event shape {tuple(fn.event_shape)}; each broadcasts the other, "
        f"so its log-density has shape {tuple(lp)}: every value is scored against every distribution and "
        f"counted more than once. Give the value shape {tuple(fn.batch_shape + fn.event_shape)} "
        "(or .to_event the distribution)."
    )


def _storages(args, kwargs) -> set:
    """The storage addresses of the tensors among the arguments (one level into lists, tuples and dicts)."""
    out = set()

    def add(v):
        if isinstance(v, torch.Tensor):
            out.add(v.untyped_storage().data_ptr())

    for v in (*args, *kwargs.values()):
        add(v)
        if isinstance(v, (list, tuple)):
            for w in v:
                add(w)
        elif isinstance(v, dict):
            for w in v.values():
                add(w)
    return out


def _check_particle_dim(name: str, site, num_particles: int, particle_dim: int, data: set):
    """Refuse observed data whose own dims line up with the particle plate (Trace_ELBO is silent too).

    With ``S`` vectorized particles in the plate at ``particle_dim``, an observed value may vary
    along that dim only if it is computed from the particles' draws.  A value of size ``S``
    there that is one of the arguments (or a view of one: it shares an argument's storage) is
    data whose dim happens to have ``S`` entries -- a column ``(N, 1)`` inside a plate of ``N``
    with ``S = N`` -- and particle ``k`` would be scored against entry ``k`` only.
    """
    value, fn = site["value"], site["fn"]
    if not isinstance(value, torch.Tensor) or isinstance(fn, dist.Unit) or not data:
        return
    nbatch = value.dim() - len(fn.event_shape)
    if nbatch < -particle_dim or value.shape[nbatch + particle_dim] != num_particles:
        return
    if value.untyped_storage().data_ptr() not in data:
        return
    raise DecomposeError(
        f"model site {name!r}: the observed value has shape {tuple(value.shape)}, and its dim {particle_dim} "
        f"(size {num_particles}) lines up with the plate of {num_particles} vectorized particles: particle k "
        f"would be scored against entry k of that dim only, not against all the data. Pyro's Trace_ELBO "
        f"computes this silently (with one particle the same value is refused). Give the value the shape of "
        f"its plates (e.g. {tuple(s for s in value.shape if s != 1) or ()}, without the extra dim of size 1)."
    )


def _check_undeclared_dims(name: str, site):
    """Refuse a latent site of the model with a batch dim (size > 1) that none of its plates declares.

    ``Trace_ELBO`` with ``max_plate_nesting`` set checks only that many dims from the right,
    so an extra dim of the guide's parameters (``loc`` of shape ``(4, 1)`` in a plate of 4:
    ``z`` of shape ``(4, 4)``) passes silently, and the terms count 16 draws of a site that the
    model declares 4 times.
    """
    lp = site.get("log_prob")
    if not isinstance(lp, torch.Tensor):
        return
    declared = {f.dim for f in site["cond_indep_stack"] if f.vectorized}
    for i, size in enumerate(lp.shape):
        d = i - lp.dim()
        if size > 1 and d not in declared:
            raise DecomposeError(
                f"model site {name!r}: its log-density has shape {tuple(lp.shape)}, and dim {d} (size {size}) "
                "belongs to no plate of the site: log p and log q count that many draws where the model declares "
                "one (Pyro checks only max_plate_nesting dims from the right, and only with validation on). "
                "Give the guide's distribution for the site the shape of the model's plates (here its parameters "
                "have an extra dim), or declare the dim with a pyro.plate in both programs."
            )


def _check_shape(where: str, name: str, site, max_plate_nesting):
    """Pyro's ``check_site_shape`` (run under validation, as ``Trace_ELBO`` runs it), naming the site."""
    try:
        check_site_shape(site, max_plate_nesting)
    except ValueError as e:
        message = " ".join(str(e).split())
        raise DecomposeError(f"{where} site {name!r}: Pyro's validation rejects its shape ({message})") from e


def _log_probs(model_trace, guide_trace, score_parts=True):
    """``compute_log_prob`` / ``compute_score_parts``; an error becomes a :class:`DecomposeError` naming the site."""
    for where, trace in (("model", model_trace), ("guide", guide_trace)):
        try:
            if where == "guide" and score_parts:
                trace.compute_score_parts()
            else:
                trace.compute_log_prob()
        except Exception as e:  # noqa: BLE001  (re-raised with the site's name)
            key = "score_parts" if where == "guide" and score_parts else "log_prob"
            pending = [n for n, s in trace.nodes.items() if s["type"] == "sample" and key not in s]
            site = f" site {pending[0]!r}" if pending else ""
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            cause = e.__cause__ if isinstance(e.__cause__, Exception) else e
            detail = " ".join(str(cause).split())
            raise DecomposeError(
                f"{where}{site}: its log-density cannot be computed ({type(cause).__name__}: {detail or first})"
            ) from e


def _one_trace(model, guide, args, kwargs, max_plate_nesting, particle, particles=None):
    """One (model_trace, guide_trace): ``Trace_ELBO._get_trace`` with decompose's checks added.

    ``particles`` is ``(S, dim)`` for a vectorized run of ``S > 1`` particles in the plate at ``dim``.
    """
    model_trace, guide_trace = _run_pair(model, guide, args, kwargs, particle)
    _check_pair(model_trace, guide_trace)
    if is_validation_enabled():
        try:
            check_model_guide_match(model_trace, guide_trace, max_plate_nesting)
        except ValueError as e:
            raise DecomposeError(f"Pyro's validation rejects the pair: {' '.join(str(e).split())}") from e
    guide_trace = prune_subsample_sites(guide_trace)
    model_trace = prune_subsample_sites(model_trace)
    _log_probs(model_trace, guide_trace)
    check_traces(model_trace, guide_trace, particles, args, kwargs)
    return model_trace, guide_trace


def check_traces(model_trace, guide_trace, particles=None, args=(), kwargs=None):
    """The checks of every site of a scored pair (values, shapes), shared with the ``TermsTrace_ELBO`` recorders.

    ``particles`` is ``(S, dim)`` for a vectorized run; ``args`` and ``kwargs`` those of the programs.
    """
    data = _storages(args, kwargs or {}) if particles is not None else set()
    validation = is_validation_enabled()
    for where, trace in (("model", model_trace), ("guide", guide_trace)):
        for name, site in trace.nodes.items():
            if site["type"] != "sample":
                continue
            _check_site(where, name, site)
            if where == "model" and not site["is_observed"]:
                _check_undeclared_dims(name, site)
            elif where == "model" and particles is not None:
                _check_particle_dim(name, site, *particles, data)
            if validation:
                _check_shape(where, name, site, float("inf"))  # no enumeration: every batch dim is a plate's


# ------------------------------------------------------------------------ reading the traces
def _per_particle(t, num_vectorized: int, dim: int | None):
    """Sum a scaled log-prob (or KL) tensor to one float64 value per particle (float64 accumulation).

    Without vectorization this is ``t.sum()``, a 0-dim tensor.  With ``num_vectorized``
    particles in the particle plate at ``dim``, every other dim is summed: a tensor of shape
    ``(num_vectorized,)``.  A term that does not vary along the particle dim (size 1) entered
    Pyro's sum once for all particles, so each particle gets 1/P of it.
    """
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(float(t), dtype=torch.float64)
    if dim is None:
        return t.sum(dtype=torch.float64)
    if t.dim() >= -dim and t.shape[dim] == num_vectorized:
        if t.dim() > -dim:  # some dims left of the particle plate: bring the particle dim first
            t = t.movedim(dim, 0)
        t = t.reshape(num_vectorized, -1)
        if num_vectorized >= 256 and 0 < t.shape[1] <= 2:
            # torch sums many rows of one or two elements slowly; the float64 sum of two numbers is one rounding,
            # the same in any order, so this is bit for bit the row sum below, several times faster
            t = t.to(torch.float64)
            return t[:, 0] if t.shape[1] == 1 else t[:, 0] + t[:, 1]
        return t.sum(1, dtype=torch.float64)
    return (t.sum(dtype=torch.float64) / num_vectorized).expand(num_vectorized)


def _kl(guide_site, model_site):
    """``TraceMeanField_ELBO``'s closed-form term: KL(q || p), scaled and masked by the guide site.

    Returns ``(kl, scale)``: the KL tensor (masked) and the guide site's scale when it is a plain
    number (to multiply after summing, one operation fewer on the big tensor), else the scaled KL and 1.
    """
    try:
        kl = torch.distributions.kl_divergence(guide_site["fn"], model_site["fn"])
    except NotImplementedError:
        return None, 1.0
    scale = guide_site["scale"]
    if isinstance(scale, numbers.Number) and torch.is_tensor(kl):
        return scale_and_mask(kl, mask=guide_site["mask"]), float(scale)
    kl = scale_and_mask(kl, scale=scale, mask=guide_site["mask"])
    if not torch.is_tensor(kl):
        kl = kl * torch.Size(guide_site["fn"].batch_shape).numel()
    return kl, 1.0


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


def _masks(site) -> list:
    """The masks of a site: ``poutine.mask``'s (the site's) and a ``.mask()``ed distribution's."""
    out = [] if site["mask"] is None else [site["mask"]]
    fn = site["fn"]
    while True:
        if isinstance(fn, dist.MaskedDistribution):
            out.append(fn._mask)
        if isinstance(fn, (dist.ExpandedDistribution, dist.MaskedDistribution, torch.distributions.Independent)):
            fn = fn.base_dist
        else:
            return out


def _is_masked(site) -> bool:
    """Masked by ``poutine.mask`` (the site's mask) or by ``.mask()`` (a MaskedDistribution)."""
    return bool(_masks(site))


def _mask_value(site):
    """The site's combined mask: None (no mask), or a bool tensor (a Python bool becomes a 0-dim tensor)."""
    masks = _masks(site)
    if not masks:
        return None
    out = None
    for m in masks:
        m = torch.as_tensor(m, dtype=torch.bool)
        out = m if out is None else out & m
    return out


def _same_mask(a, b) -> bool:
    if a is None and b is None:
        return True
    a = torch.tensor(True) if a is None else a
    b = torch.tensor(True) if b is None else b
    try:
        a, b = torch.broadcast_tensors(a, b)
    except RuntimeError:
        return False
    return bool((a == b).all())


def _fmt_mask(m) -> str:
    if m is None:
        return "not masked"
    if m.numel() <= 6:
        return f"masked by {[bool(v) for v in m.reshape(-1).tolist()]}"
    return f"masked ({int(m.sum())} of {m.numel()} elements kept)"


def _scale_value(s):
    """A site's scale as a float, or, for a tensor of several values, its values (a summary when many)."""
    if isinstance(s, numbers.Number):
        return float(s)
    if isinstance(s, torch.Tensor) and s.numel() == 1:
        return float(s)
    values = s.detach().reshape(-1).tolist()
    if len(set(values)) == 1:
        return f"{values[0]:.4g} (tensor of shape {_shape(s.shape)})"
    if len(values) <= 6:
        return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"
    lo, hi, mean = min(values), max(values), sum(values) / len(values)
    return f"tensor of shape {_shape(s.shape)}: {lo:.4g} to {hi:.4g}, mean {mean:.4g}"


def _same_scale(a, b) -> bool:
    if type(a) is float and type(b) is float:  # the common case, without the slower ABC isinstance
        return a == b
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


def _scale_warning(mismatches: dict) -> str:
    """One message for every latent site whose model and guide weight it differently (scale or mask)."""
    groups: dict = {}
    for name, (model_site, guide_site) in mismatches.items():
        ms, gs = _scale_value(model_site["scale"]), _scale_value(guide_site["scale"])
        mm, gm = _mask_value(model_site), _mask_value(guide_site)
        parts = []
        if not _same_scale(model_site["scale"], guide_site["scale"]):
            parts.append(
                f"scaled by {_fmt_scale(ms, 6)} in the model (log p) but by {_fmt_scale(gs, 6)} in the guide (log q)"
            )
        if not _same_mask(mm, gm):
            parts.append(f"{_fmt_mask(mm)} in the model but {_fmt_mask(gm)} in the guide")
        if isinstance(ms, float) and isinstance(gs, float) and mm is None and gm is None:
            m6, g6 = _fmt_scale(ms, 6), _fmt_scale(gs, 6)
            objective = (
                f"E_q[log p(x|z)] - {m6} * KL(q||p) + ({g6} - {m6}) * H[q] for this site, where H[q] is the guide's "
                f"entropy, not reconstruction - {m6} * KL"
            )
        else:
            objective = (
                "E_q[log p(x|z)] - s_p * KL(q||p) + (s_q - s_p) * H[q] elementwise, where H[q] is the guide's entropy "
                "and s_p, s_q the model's and the guide's weights of each element (scale times mask: a masked-out "
                "element weighs 0)"
            )
        groups.setdefault((" and ".join(parts), objective), []).append(name)
    sentences = []
    for (what, objective), names in groups.items():
        if len(names) == 1:
            subject = f"latent site {names[0]!r} is"
        else:
            subject = f"latent sites {', '.join(repr(n) for n in names)} are"
        sentences.append(f"{subject} {what}. The objective is then {objective}: the entropy term does not cancel.")
    return (
        " ".join(sentences)
        + " Pyro does not check this. To weight the KL by a factor beta, scale the site by the same factor in the "
        "guide too (poutine.scale around the pyro.sample in both programs), and mask it the same way in both; "
        "with plate subsampling, put the guide's local sites in the same subsampled plate."
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


class _Terms:
    """What one evaluation (one or several runs of the pair) leaves: per-site, per-particle float64 tensors.

    ``keys`` holds ``(kind, site, run)`` with kind ``"p"`` (log p), ``"q"`` (log q), ``"kl"``
    (closed-form KL) or ``"ent"`` (an entropy term that is not ``log q``), ``tensors`` the
    matching float64 tensors (0-dim, or ``(S,)`` for a vectorized run): all are stacked at
    once by :meth:`matrix`.  ``rows`` maps each site to ``[role, model site, guide site]``.
    """

    def __init__(self, num_particles: int, vectorized: bool, mean_field: bool = True, check_mismatch: bool = True):
        self.num_particles, self.vectorized, self.mean_field = num_particles, vectorized, mean_field
        self.check_mismatch = check_mismatch  # collect the latent sites weighted differently (``mismatch``)
        self.rows, self.keys, self.tensors = {}, [], []
        self.kl_missing, self.mismatch = set(), {}
        self.mf_source, self.mf_refused, self.mf_notes = {}, None, {}
        self.run = 0

    def record(self, kind, name, t, num_vectorized, dim, scale=1.0):
        self.keys.append((kind, name, self.run))
        t = _per_particle(t, num_vectorized, dim)
        self.tensors.append(t if scale == 1.0 else t * scale)

    def matrix(self):
        """``(site_keys, M)``: M[i] holds the per-particle float64 values of ``site_keys[i] = (kind, name)``.

        A site absent from some particles (dynamic structure) contributes 0 there.
        """
        index: dict = {}
        rows = [index.setdefault((kind, name), len(index)) for kind, name, _ in self.keys]
        S = self.num_particles
        if not self.tensors:
            return [], torch.zeros(0, S, dtype=torch.float64)
        tensors = self.tensors
        if not self.vectorized and tensors[0].device.type == "cpu":
            # 0-dim sums of mixed dtypes (log p sums in the model's dtype, float64 KL sums): on the CPU reading each
            # (exactly, as a Python float) and making one float64 tensor is several times faster than torch.stack
            stacked = torch.tensor([t.item() for t in tensors], dtype=torch.float64)
        else:
            stacked = torch.stack(tensors).to(torch.float64)  # stack promotes mixed dtypes (exactly, to float64)
        if self.vectorized or S == 1:  # one run: each tensor is (S,) (or 0-dim for one particle)
            stacked = stacked.reshape(len(rows), S)
            if len(index) == len(rows):
                return list(index), stacked
            m = stacked.new_zeros(len(index), S)
            return list(index), m.index_add_(0, torch.tensor(rows), stacked)
        K = len(index)
        if len(rows) == K * S and rows == list(range(K)) * S:  # every run has the same sites in the same order
            return list(index), stacked.reshape(S, K).T.contiguous()  # the layout the general path below builds
        m = stacked.new_zeros(K, S)
        m[torch.tensor(rows), torch.tensor([run for _, _, run in self.keys])] = stacked
        return list(index), m


def read_pair(model_trace, guide_trace, terms: _Terms, num_vectorized: int = 1, dim: int | None = None):
    """The one term-splitting code: record each site's per-particle terms of a scored pair of traces in ``terms``.

    ``decompose`` and the ``TermsTrace_ELBO`` recorders both call it on the traces of one run
    of the pair (``num_vectorized`` particles in the plate at ``dim``, or one particle).
    Observed model sites go to the reconstruction, latent ones to the log prior, every guide
    site to log q; a latent site also gets its closed-form KL (``TraceMeanField_ELBO``'s term)
    where torch has one.  Latent sites that the two programs weight differently (scale or
    mask) are collected in ``terms.mismatch``.
    """
    rows, record = terms.rows, terms.record
    guide_sites = guide_trace.nodes

    def rec(kind, name, site_or_tensor, scale=1.0):
        if kind in ("kl", "ent"):
            record(kind, name, site_or_tensor, num_vectorized, dim, scale)
        elif dim is None:  # one particle per run: the site's sum as Pyro computed it (made float64 when stacked)
            terms.keys.append((kind, name, terms.run))
            terms.tensors.append(site_or_tensor["log_prob_sum"].detach())  # no autograd work on it later
        else:
            record(kind, name, site_or_tensor["log_prob"], num_vectorized, dim)

    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        rec("p", name, site)
        if site["is_observed"]:
            if name not in rows:
                rows[name] = ["deterministic" if site["infer"].get("_deterministic") else "observed", site, None]
            continue
        g = guide_sites[name]
        if name not in rows:
            rows[name] = ["latent", site, g]
            if terms.check_mismatch and not _same_weight(site, g):
                terms.mismatch[name] = (site, g)
        rec("q", name, g)
        _mean_field_site(name, g, site, rec, terms)
    for name, g in guide_sites.items():
        if g["type"] == "sample" and name not in model_trace.nodes:
            rec("q", name, g)
            if name not in rows:
                rows[name] = ["deterministic" if g["infer"].get("_deterministic") else "auxiliary", None, g]
            _mean_field_site(name, g, None, rec, terms)


def _same_weight(model_site, guide_site) -> bool:
    """Whether the model and the guide scale and mask a latent site the same way."""
    if not _same_scale(model_site["scale"], guide_site["scale"]):
        return False
    if (
        model_site["mask"] is None
        and guide_site["mask"] is None
        and not (_wraps_mask(model_site["fn"]) or _wraps_mask(guide_site["fn"]))
    ):
        return True  # neither is masked (the common case, without building masks)
    return _same_mask(_mask_value(model_site), _mask_value(guide_site))


def _wraps_mask(fn) -> bool:
    """Whether a ``.mask()``ed distribution is ``fn`` or one of its base distributions (as :func:`_masks` walks)."""
    while True:
        if isinstance(fn, dist.MaskedDistribution):
            return True
        if isinstance(fn, (dist.ExpandedDistribution, torch.distributions.Independent)):
            fn = fn.base_dist
        else:
            return False


def _mean_field_site(name, g, model_site, record, acc: _Terms):
    """``TraceMeanField_ELBO._differentiable_loss_particle`` for one guide site, as records and notes.

    A latent site (``model_site`` given) contributes its closed-form KL, or, where torch has
    none, ``entropy_term - log p``; an auxiliary site its entropy term.  What Pyro would raise
    on becomes ``acc.mf_refused`` (the first, in Pyro's order); with validation off, a
    non-reparameterized site gets a note in ``acc.mf_notes``.
    """

    if not acc.mean_field:  # only kl_analytic is wanted: the closed-form KL of a latent site
        if model_site is not None:
            kl, kl_scale = _kl(g, model_site)
            if kl is None:
                acc.kl_missing.add(name)
            else:
                record("kl", name, kl, kl_scale)
        return

    def refuse(message):
        if acc.mf_refused is None:
            acc.mf_refused = message

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
    kl, kl_scale = (None, 1.0) if model_site is None else _kl(g, model_site)
    if kl is not None:
        if torch.is_tensor(kl) and kl.shape != g["fn"].batch_shape:
            refuse(
                f"TraceMeanField_ELBO fails an assertion (AssertionError) at latent site {name!r}: its KL has shape "
                f"{tuple(kl.shape)}, not the guide site's batch shape {tuple(g['fn'].batch_shape)}. Give the guide "
                "site the model site's batch shape (the same plates)."
            )
        record("kl", name, kl, kl_scale)
        source = "kl"
    else:
        if model_site is not None:
            acc.kl_missing.add(name)
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
    acc.mf_source[name] = source
    if problem and not is_validation_enabled() and name not in acc.mf_notes:
        if source == "kl":
            acc.mf_notes[name] = (
                f"guide site {name!r} is {problem}: TraceMeanField_ELBO's value uses its "
                "closed-form KL, but its gradient lacks the score-function term (with validation on, Pyro refuses "
                "this guide)."
            )
        elif source == "ent":
            acc.mf_notes[name] = (
                f"guide site {name!r} is {problem}: TraceMeanField_ELBO's number uses its entropy term in place of "
                "its log q (with validation on, Pyro refuses this guide)."
            )


_OBSERVED, _LATENT, _GUIDE = ("observed", "deterministic"), ("latent",), ("latent", "auxiliary", "deterministic")


@functools.lru_cache(maxsize=64)
def _weights(keys: tuple, roles: tuple, sources: tuple | None, dtype) -> tuple:
    """``(names, W)``: ``W @ M`` gives every term per particle, one row per name (a term that exists).

    ``keys`` are the rows of ``M`` (``(kind, site)``), ``roles`` the sites' roles,
    ``sources`` (None without the mean-field terms) where ``TraceMeanField_ELBO`` takes each
    guide site's term: ``"kl"``, ``"q"``, ``"ent"`` or ``"zero"`` (see :func:`_mean_field_site`).
    Deterministic sites score 0 (their Delta is masked); they are summed only to follow Pyro exactly.
    """
    role = dict(roles)
    index = {k: i for i, k in enumerate(keys)}

    def rows(kind, want, sign=1.0):
        w = [0.0] * len(keys)
        for (k, name), i in index.items():
            if k == kind and role.get(name) in want:
                w[i] = sign
        return w

    def add(*ws):
        return [sum(col) for col in zip(*ws, strict=True)]

    recon, prior, log_q = rows("p", _OBSERVED), rows("p", _LATENT), rows("q", _GUIDE)
    out = {
        "elbo": add(recon, prior, [-v for v in log_q]),
        "reconstruction": recon,
        "log_prior": prior,
        "log_q": log_q,
        "kl_mc": add(log_q, [-v for v in prior]),
        "kl_analytic": rows("kl", _LATENT),
    }
    if sources is not None:
        kl_mf = [0.0] * len(keys)
        for name, source in sources:
            if source in ("kl", "q", "ent"):
                kl_mf[index[(source, name)]] += 1.0
            if source != "kl" and role[name] == "latent":
                kl_mf[index[("p", name)]] -= 1.0
        out["kl_mean_field"] = kl_mf
        out["elbo_mean_field"] = add(recon, [-v for v in kl_mf])
    return tuple(out), torch.tensor(list(out.values()), dtype=dtype)


def _non_finite(keys, m):
    labels = {"q": "log q at guide", "p": "log p at model", "kl": "KL(q||p) at", "ent": "the entropy term at guide"}
    bad = []
    for (kind, name), vals in zip(keys, m.tolist(), strict=True):
        for i, v in enumerate(vals):
            if not math.isfinite(v):
                bad.append(f"{labels[kind]} site {name!r} is {v} (particle {i + 1})")
                break
    return DecomposeError(
        "non-finite terms: " + "; ".join(bad) + ". An ELBO with a non-finite term is meaningless: "
        "check the site's parameters (NaN?) and that its value lies in the distribution's support."
    )


def split_terms(terms: _Terms):
    """Every term, per particle, from what :func:`read_pair` recorded: ``(site_keys, M, names, rows)``.

    ``M[i]`` holds the per-particle float64 values of ``site_keys[i] = (kind, site)``;
    ``rows[j]`` those of the term ``names[j]`` (``elbo``, ``reconstruction``, ``log_prior``,
    ``log_q``, ``kl_mc``, ``kl_analytic`` and, for the mean-field terms, ``kl_mean_field`` and
    ``elbo_mean_field``).  Every term is a weighted sum of the sites' rows, all computed by one
    matrix product in float64, so ``reconstruction - kl_mc == elbo`` holds to float64 rounding.
    ``kl_analytic`` is left out without a closed form at every latent site, the mean-field
    terms where ``TraceMeanField_ELBO`` would raise (or when ``terms.mean_field`` is False).
    """
    keys, m = terms.matrix()
    roles = tuple((n, r[0]) for n, r in terms.rows.items())
    sources = tuple(terms.mf_source.items()) if terms.mean_field and not terms.mf_refused else None
    names, w = _weights(tuple(keys), roles, sources, m.dtype)
    rows = w @ m if keys else m.new_zeros(len(names), terms.num_particles)
    if terms.kl_missing:
        keep = [i for i, n in enumerate(names) if n != "kl_analytic"]
        names, rows = tuple(names[i] for i in keep), rows[keep]
    return keys, m, names, rows


def term_means(names, rows, num_particles: int, stderr: bool = True):
    """``(mean, stderr)``: dicts over :data:`TERMS` of Python floats (None for a term left out).

    ``mean = sum / S`` of each term's float64 values; ``stderr = sd / sqrt(S)`` (None for S = 1).
    """
    mean = dict.fromkeys(TERMS)
    mu = _mean(rows, num_particles)
    mean.update(zip(names, mu.tolist(), strict=True))
    return mean, (_stderr_values(names, rows, mu, num_particles) if stderr else dict.fromkeys(TERMS))


def _mean(rows, num_particles: int):
    """Each row's ``sum / S`` (float64); for one particle the sum itself, which dividing by 1 leaves exactly as is."""
    sums = rows.sum(1)
    return sums if num_particles == 1 else sums / num_particles


def _stderr_values(names, rows, mu, num_particles: int) -> dict:
    """``sd / sqrt(S)`` of each term's values (``mu`` their means), a dict over :data:`TERMS` (None for S = 1)."""
    se = dict.fromkeys(TERMS)
    if num_particles > 1:
        var = (rows - mu[:, None]).square().sum(1) / (num_particles - 1) / num_particles
        se.update(zip(names, var.sqrt().tolist(), strict=True))
    return se


def check_finite(keys, m, *values):
    """Raise :class:`DecomposeError` naming the sites when some of ``values`` (means of terms or sites) is not finite.

    A NaN or an inf anywhere in ``M`` makes the mean of its row (and of every term that uses it) non-finite.
    """
    if all(v is None or math.isfinite(v) for vals in values for v in vals):
        return
    raise _non_finite(keys, m)


# ----------------------------------------------------------------------------- the function
def decompose(
    model,
    guide,
    *args,
    num_particles: int = 1,
    vectorize_particles: bool = False,
    max_plate_nesting: int | None = None,
    model_kwargs: Mapping | None = None,
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

    ``args`` and ``kwargs`` go to both programs.  A keyword argument of your model that is
    named like an option of this function (``num_particles``, ``vectorize_particles``,
    ``max_plate_nesting``, ``model_kwargs``) goes in the keyword-only dict ``model_kwargs``:
    ``decompose(model, guide, x, num_particles=8, model_kwargs={"num_particles": 3})`` passes
    ``num_particles=3`` to both programs.  (``svi.step(x, num_particles=3)`` passes it the
    same way: ``SVI`` has no options of that name.)

    The param store ends as running the guide leaves it; no gradient is computed.

    **Precision.** Every term is accumulated in float64 whatever the model's dtype (see
    :class:`Decomposition`); ``loss`` is Pyro's own arithmetic, bit-identical to
    ``Trace_ELBO(...).loss`` on the same draws.

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

    **Errors.** Every refusal is a :class:`DecomposeError` (a ``ValueError``) whose message
    names the site; when Pyro or your program raised first, that exception is chained as
    ``__cause__``.  One :class:`ScaleMismatchWarning` per call lists every latent site that the
    model and the guide scale or mask differently.  On a Pyro release outside the tested range
    (``elbo_terms._versions``) it raises ``UntestedPyroError`` unless the environment variable
    ``ELBO_TERMS_ALLOW_UNTESTED_PYRO=1`` is set.
    """
    check_pyro_version("elbo_terms.decompose")
    if isinstance(num_particles, bool) or not isinstance(num_particles, numbers.Integral) or num_particles < 1:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
    num_particles = int(num_particles)
    if max_plate_nesting is not None and (not isinstance(max_plate_nesting, numbers.Integral) or max_plate_nesting < 0):
        raise ValueError(f"max_plate_nesting must be a non-negative integer or None, got {max_plate_nesting!r}")
    if not callable(model) or not callable(guide):
        raise TypeError("decompose(model, guide, *args): model and guide must be callables (Pyro programs)")
    if model_kwargs is not None:
        if not isinstance(model_kwargs, Mapping):
            raise TypeError(f"model_kwargs must be a dict of keyword arguments, got {type(model_kwargs).__name__}")
        clash = sorted(set(model_kwargs) & set(kwargs))
        if clash:
            raise TypeError(f"keyword arguments {clash} given both directly and in model_kwargs")
        kwargs = {**kwargs, **model_kwargs}

    S = num_particles
    vectorized = bool(vectorize_particles) and S > 1
    terms = _Terms(S, vectorized)
    pyro_elbo = 0.0
    with torch.no_grad():
        if vectorize_particles:
            mpn = float("inf") if max_plate_nesting is None else max_plate_nesting
            if mpn == float("inf"):
                mpn = _guess_max_plate_nesting(model, guide, args, kwargs)
            if S > 1:
                mpn += 1  # the particle plate is one more dim (as in ELBO.__init__ / _guess_max_plate_nesting)
            m = _particle_plate(model, S, mpn)
            g = _particle_plate(guide, S, mpn)
            particles = (S, -mpn) if S > 1 else None
            model_trace, guide_trace = _one_trace(m, g, args, kwargs, mpn, f"{S} vectorized particles", particles)
            pyro_elbo += (float(model_trace.log_prob_sum()) - float(guide_trace.log_prob_sum())) / S
            read_pair(model_trace, guide_trace, terms, S, -mpn if S > 1 else None)
        else:
            mpn = float("inf") if max_plate_nesting is None else max_plate_nesting
            for i in range(S):
                terms.run = i
                model_trace, guide_trace = _one_trace(model, guide, args, kwargs, mpn, f"particle {i + 1} of {S}")
                pyro_elbo += (float(model_trace.log_prob_sum()) - float(guide_trace.log_prob_sum())) / S
                read_pair(model_trace, guide_trace, terms)
    del model_trace, guide_trace
    if terms.mismatch:
        warnings.warn(_scale_warning(terms.mismatch), ScaleMismatchWarning, stacklevel=2)
    return _assemble(-pyro_elbo, terms, bool(vectorize_particles))


def _assemble(loss, terms: _Terms, vectorize_particles) -> Decomposition:
    """Per-site, per-particle float64 values -> the totals, their standard errors, the site rows."""
    S = terms.num_particles
    keys, m, names, rows = split_terms(terms)
    mu = _mean(rows, S)
    mean = dict.fromkeys(TERMS)
    mean.update(zip(names, mu.tolist(), strict=True))
    site_means = dict(zip(keys, _mean(m, S).tolist(), strict=True))
    check_finite(keys, m, mean.values(), site_means.values())
    note = terms.mf_refused or (" ".join(terms.mf_notes.values()) or None)
    mean_field = mean["kl_mean_field"] is not None

    terms.keys, terms.tensors = [], []  # stacked in m: the site table needs only the rows and the notes
    return Decomposition(
        loss=loss,
        elbo=mean["elbo"],
        reconstruction=mean["reconstruction"],
        log_prior=mean["log_prior"],
        log_q=mean["log_q"],
        kl_mc=mean["kl_mc"],
        kl_analytic=mean["kl_analytic"],
        kl_mean_field=mean["kl_mean_field"],
        elbo_mean_field=mean["elbo_mean_field"],
        mean_field_note=note,
        num_particles=S,
        vectorize_particles=vectorize_particles,
        per_particle=_PerParticle(names, rows),
        stderr=_Stderr(names, rows, mu, S),
        _site_rows=_SiteRows(terms, site_means, mean_field),
    )


class _SiteRows:
    """The rows of the site table (:func:`_site_term`'s arguments), built when the table is first read."""

    def __init__(self, terms: _Terms, site_means: dict, mean_field: bool):
        self.terms, self.site_means, self.mean_field = terms, site_means, mean_field

    def __call__(self) -> tuple:
        mf_means = {}
        if self.mean_field:
            for name, source in self.terms.mf_source.items():
                if source == "kl":
                    mf_means[name] = self.site_means[("kl", name)]
                else:
                    log_q = 0.0 if source == "zero" else self.site_means[(source, name)]
                    mf_means[name] = log_q - (
                        self.site_means[("p", name)] if self.terms.rows[name][0] == "latent" else 0.0
                    )
        return tuple(
            (
                name,
                role,
                msite,
                gsite,
                self.site_means.get(("p", name)),
                self.site_means.get(("q", name)),
                None if name in self.terms.kl_missing else self.site_means.get(("kl", name)),
                mf_means.get(name),
            )
            for name, (role, msite, gsite) in self.terms.rows.items()
        )


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
