r"""``TermsTrace_ELBO``: a drop-in ``Trace_ELBO`` that keeps the reconstruction and the KL of every step.

``Trace_ELBO`` builds, for every loss evaluation, the two traces that hold every term of the
ELBO, adds them up and throws them away.  :class:`TermsTrace_ELBO` (a subclass of
``pyro.infer.Trace_ELBO``) reads the same traces before they go, with the code
:func:`~elbo_terms.decompose` uses (:func:`elbo_terms.decomposition.read_pair`), and appends one
:class:`TermsRecord` per loss evaluation to ``history``::

    elbo = TermsTrace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(model, guide, ClippedAdam({"lr": 1e-3}), loss=elbo)
    for step in range(steps):
        svi.step(x)
    elbo.history[-1].reconstruction, elbo.history[-1].kl_mc
    elbo.plot()                      # reconstruction and KL curves (matplotlib)

**Same draws, same numbers.** It draws no random number, runs neither program again and
builds nothing on the autograd graph (it reads the traces' values under ``torch.no_grad``),
so after the same seed every loss and every parameter is bit-identical to ``Trace_ELBO``'s.
``loss``, ``loss_and_grads``, ``differentiable_loss`` and the module form ``elbo(model, guide)``
all record.

**The terms are decompose's.** Per record, in float64 whatever the model's dtype,
``reconstruction - kl_mc == elbo`` (to float64 rounding) and ``elbo == -loss`` up to the
rounding of Pyro's own sum, with ``kl_mc = log_q - log_prior``; all are means over the
particles, scaled and masked as Pyro scales them (so with a subsampled plate they estimate
the full-data terms).  :class:`TermsTraceMeanField_ELBO` records in addition
``kl_mean_field``, the KL that ``TraceMeanField_ELBO`` subtracts (``-loss ==
reconstruction - kl_mean_field``).

**Bad input** is refused on the first evaluation with a :class:`~elbo_terms.DecomposeError`
naming the site, as :func:`~elbo_terms.decompose` refuses it (enumerated sites, a guide that
lacks a latent site, values that broadcast each other, ...), and a latent site that the two
programs scale or mask differently raises one :class:`~elbo_terms.ScaleMismatchWarning`.
"""

from __future__ import annotations

import collections
import math
import numbers
import types
import warnings
from dataclasses import dataclass, field

import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from ._versions import check_pyro_version
from .decomposition import (
    ScaleMismatchWarning,
    _check_pair,
    _same_scale,
    _scale_value,
    _scale_warning,
    _Terms,
    check_finite,
    check_traces,
    read_pair,
    split_terms,
    term_means,
)

__all__ = ["TermsTrace_ELBO", "TermsTraceMeanField_ELBO", "TermsRecord"]

#: the numeric fields of a record, in the order of ``TermsRecord``
FIELDS = ("loss", "elbo", "reconstruction", "log_prior", "log_q", "kl_mc", "kl_analytic", "kl_mean_field")


@dataclass(frozen=True)
class TermsRecord:
    r"""The terms of one loss evaluation (Python floats, means over the particles, float64 sums).

    * ``step``: the index of the loss evaluation (0 for the first; with ``every=k`` only
      multiples of ``k`` are recorded; ``svi.evaluate_loss`` is a loss evaluation too);
    * ``loss``: the number the ELBO object returned (for ``differentiable_loss``, the value of
      the returned tensor);
    * ``elbo`` = mean over particles of :math:`\log p(x, z) - \log q(z)` = ``reconstruction -
      kl_mc``; for ``TermsTrace_ELBO`` it is ``-loss`` up to rounding;
    * ``reconstruction`` (observed sites of the model), ``log_prior`` (latent sites of the
      model), ``log_q`` (every sample site of the guide), ``kl_mc = log_q - log_prior``;
    * ``kl_analytic``: the closed-form :math:`\mathrm{KL}(q \| p)` summed over the latent sites
      (scaled as ``TraceMeanField_ELBO`` scales it), None unless every latent site has one;
    * ``kl_mean_field``: for ``TermsTraceMeanField_ELBO`` only, the KL term that estimator
      subtracts (``-loss == reconstruction - kl_mean_field``); None otherwise;
    * ``scaled``: which terms include a ``poutine.scale`` factor other than 1 (apart from the
      N/B of subsampled plates): ``{term: {site: factor}}``, e.g. ``{"log_prior": {"z": 0.5},
      "log_q": {"z": 0.5}}`` for a beta of 0.5 on both sides; empty when nothing is scaled.
    """

    step: int
    loss: float
    elbo: float
    reconstruction: float
    log_prior: float
    log_q: float
    kl_mc: float
    kl_analytic: float | None
    kl_mean_field: float | None = None
    scaled: types.MappingProxyType = field(default_factory=lambda: types.MappingProxyType({}))

    def as_dict(self) -> dict:
        """The record as plain data."""
        d = {"step": self.step}
        d.update({k: getattr(self, k) for k in FIELDS})
        d["scaled"] = {term: dict(sites) for term, sites in self.scaled.items()}
        return d


def _beta(site):
    """A site's scale without the N/B of its subsampled plates: the ``poutine.scale`` factor(s)."""
    sub = 1.0
    for frame in site["cond_indep_stack"]:
        full = getattr(frame, "full_size", None)
        if full is not None and frame.size and full != frame.size:
            sub *= full / frame.size
    return site["scale"] if sub == 1.0 else site["scale"] / sub


def _scaled(rows) -> types.MappingProxyType:
    """``{term: {site: factor}}`` for the sites whose ``poutine.scale`` factor is not 1."""
    out: dict = {}
    for name, (role, msite, gsite) in rows.items():
        sides = []
        if msite is not None:
            sides.append(("reconstruction" if role in ("observed", "deterministic") else "log_prior", msite))
        if gsite is not None:
            sides.append(("log_q", gsite))
        for term, site in sides:
            beta = _beta(site)
            if not _same_scale(beta, 1.0):
                out.setdefault(term, {})[name] = _scale_value(beta)
    return types.MappingProxyType({k: types.MappingProxyType(v) for k, v in out.items()})


class _Recorder:
    """The recording half of :class:`TermsTrace_ELBO` and :class:`TermsTraceMeanField_ELBO`."""

    _mean_field = False

    def __init__(self, *args, every: int = 1, max_history: int | None = None, **kwargs):
        check_pyro_version(type(self).__name__)
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        if max_history is not None and (
            isinstance(max_history, bool) or not isinstance(max_history, numbers.Integral) or max_history < 1
        ):
            raise ValueError(f"max_history must be a positive integer or None, got {max_history!r}")
        super().__init__(*args, **kwargs)
        self.every = int(every)
        self.max_history = max_history
        #: the records, oldest first (a deque bounded by ``max_history``)
        self.history = collections.deque(maxlen=max_history)
        self.evaluations = 0  # loss evaluations so far, recorded or not
        self._terms = None  # the terms of the evaluation being recorded
        self._checked = False  # the first recorded evaluation runs decompose's checks
        self._scaled = None
        self._depth = 0

    # ------------------------------------------------------------ the traces Pyro builds
    def _get_trace(self, model, guide, args, kwargs):
        model_trace, guide_trace = super()._get_trace(model, guide, args, kwargs)
        terms = self._terms
        if terms is not None:
            vectorized = self.vectorize_particles and self.num_particles > 1
            dim = -self.max_plate_nesting if vectorized else None
            with torch.no_grad():
                if not self._checked:
                    _check_pair(model_trace, guide_trace)
                    particles = (self.num_particles, dim) if vectorized else None
                    check_traces(model_trace, guide_trace, particles, args, kwargs)
                read_pair(model_trace, guide_trace, terms, self.num_particles if vectorized else 1, dim)
            terms.run += 1
        return model_trace, guide_trace

    def _recording(self, method, model, guide, args, kwargs):
        if self._depth:  # a loss method calling another: record once
            return method(model, guide, *args, **kwargs)
        step = self.evaluations
        self.evaluations += 1
        if step % self.every:
            return method(model, guide, *args, **kwargs)
        vectorized = self.vectorize_particles and self.num_particles > 1
        # the scale/mask mismatch of the latent sites is warned about once: looked for on the first record only
        self._terms = _Terms(
            self.num_particles, vectorized, mean_field=self._mean_field, check_mismatch=not self._checked
        )
        self._depth += 1
        try:
            loss = method(model, guide, *args, **kwargs)
        finally:
            self._depth -= 1
            terms, self._terms = self._terms, None
        self._record(step, loss, terms)
        return loss

    def _record(self, step, loss, terms):
        first = not self._checked
        self._checked = True
        if first:
            self._scaled = _scaled(terms.rows)
            if terms.mismatch:
                warnings.warn(_scale_warning(terms.mismatch), ScaleMismatchWarning, stacklevel=4)
        with torch.no_grad():  # the recorded tensors are read, never differentiated
            keys, m, names, rows = split_terms(terms)
            mean, _ = term_means(names, rows, terms.num_particles, stderr=False)
        if not all(v is None or math.isfinite(v) for v in mean.values()):
            check_finite(keys, m, mean.values())  # raises, naming the sites
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        self.history.append(
            TermsRecord(
                step=step,
                loss=value,
                elbo=mean["elbo"],
                reconstruction=mean["reconstruction"],
                log_prior=mean["log_prior"],
                log_q=mean["log_q"],
                kl_mc=mean["kl_mc"],
                kl_analytic=mean["kl_analytic"],
                kl_mean_field=mean["kl_mean_field"] if self._mean_field else None,
                scaled=self._scaled,
            )
        )

    # ------------------------------------------------------------------ the loss methods
    def loss(self, model, guide, *args, **kwargs):
        return self._recording(super().loss, model, guide, args, kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs):
        return self._recording(super().loss_and_grads, model, guide, args, kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        return self._recording(super().differentiable_loss, model, guide, args, kwargs)

    # ------------------------------------------------------------------------ reading
    def columns(self) -> dict:
        """The history as columns: ``{"step": [...], "loss": [...], ...}`` (ready for a DataFrame)."""
        keys = ("step", *FIELDS)
        return {k: [getattr(r, k) for r in self.history] for k in keys}

    def clear(self):
        """Forget the records (the count of evaluations goes on)."""
        self.history.clear()

    def plot(self, title: str | None = None):
        """A matplotlib figure of the reconstruction and the KL over the recorded steps.

        Left: ``reconstruction``; right: ``kl_mc`` (the sampled KL of each step) and, where
        they exist, ``kl_analytic`` and ``kl_mean_field``.  Returns the figure (save it with
        ``fig.savefig("terms.svg")``).  matplotlib is imported only here.
        """
        import matplotlib.pyplot as plt

        if not self.history:
            raise ValueError("nothing recorded yet: train (or call .loss) first")
        cols = self.columns()
        fig, (ax_r, ax_k) = plt.subplots(1, 2, figsize=(8, 3), layout="constrained")
        ax_r.plot(cols["step"], cols["reconstruction"], color="C0")
        ax_r.set_title("reconstruction  E_q[log p(x|z)]", fontsize=10)
        ax_k.plot(cols["step"], cols["kl_mc"], color="C1", alpha=0.6, lw=1, label="kl_mc (sampled)")
        for key, color in (("kl_analytic", "k"), ("kl_mean_field", "C3")):
            if all(v is not None for v in cols[key]):
                ax_k.plot(cols["step"], cols[key], color=color, lw=1.2, label=key)
        ax_k.set_title("KL term", fontsize=10)
        ax_k.legend(fontsize=8)
        for ax in (ax_r, ax_k):
            ax.set_xlabel("loss evaluation (step)")
            ax.set_ylabel("nats")
        if title:
            fig.suptitle(title, fontsize=11)
        return fig


class TermsTrace_ELBO(_Recorder, Trace_ELBO):
    """``Trace_ELBO`` that keeps the terms of every loss evaluation in ``history`` (see the module docstring).

    Takes ``Trace_ELBO``'s arguments, and, keyword-only: ``every`` (record every k-th loss
    evaluation; default 1) and ``max_history`` (keep at most this many records, the newest;
    default: all).  Each record is a :class:`TermsRecord`.  On a Pyro release outside the
    tested range it raises ``UntestedPyroError`` when constructed, unless the environment
    variable ``ELBO_TERMS_ALLOW_UNTESTED_PYRO=1`` is set.
    """


class TermsTraceMeanField_ELBO(_Recorder, TraceMeanField_ELBO):
    """``TraceMeanField_ELBO`` that keeps the terms of every loss evaluation, ``kl_mean_field`` included.

    ``kl_mean_field`` is the KL term this estimator subtracts: the closed-form KL of each latent
    site where torch has one, the sampled ``log q - log p`` elsewhere; ``-loss ==
    reconstruction - kl_mean_field`` up to rounding.  Same arguments as :class:`TermsTrace_ELBO`.
    """

    _mean_field = True
