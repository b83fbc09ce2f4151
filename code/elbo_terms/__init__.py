"""elbo_terms: what Pyro's Trace_ELBO computes, term by term, for your own model.

The library a reader imports (torch and Pyro only; no SymPy, none of the book's modules):

* :func:`decompose` -- the per-term ELBO of your model and guide, on the draws a fresh
  ``Trace_ELBO`` would make: reconstruction, log prior, log q, the Monte Carlo KL, and the
  closed-form KL where torch has one.
* :class:`TermsTrace_ELBO`, :class:`TermsTraceMeanField_ELBO` -- drop-in ``Trace_ELBO`` /
  ``TraceMeanField_ELBO`` that keep those terms for every training step (``.history``, ``.plot()``).
* :class:`Decomposition`, :class:`TermsRecord`, :class:`DecomposeError`, :class:`ScaleMismatchWarning`,
  :class:`UntestedPyroError`; the tested Pyro range is in ``elbo_terms._versions``.

The rest of the package serves the book: ``elbo_terms.chapters`` holds one module per chapter
(its models and the identities it states), ``elbo_terms.build`` the checking machinery (the
identity registry, what chapters call while they execute, the Sphinx extensions). Neither is
imported by ``import elbo_terms``.
"""

from ._versions import PYRO_MAX, PYRO_MIN, UntestedPyroError
from .decomposition import DecomposeError, Decomposition, ScaleMismatchWarning, decompose
from .terms import TermsRecord, TermsTrace_ELBO, TermsTraceMeanField_ELBO

__all__ = [
    "decompose",
    "Decomposition",
    "DecomposeError",
    "ScaleMismatchWarning",
    "TermsTrace_ELBO",
    "TermsTraceMeanField_ELBO",
    "TermsRecord",
    "UntestedPyroError",
    "PYRO_MIN",
    "PYRO_MAX",
]
__version__ = "0.1.0"
