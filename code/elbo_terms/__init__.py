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

# decompose and the recorders import torch and Pyro when first used (``from elbo_terms import
# decompose`` does it at once), so that the book's build machinery under elbo_terms.build can
# be imported without them
_LAZY = {
    "decompose": "decomposition",
    "Decomposition": "decomposition",
    "DecomposeError": "decomposition",
    "ScaleMismatchWarning": "decomposition",
    "TermsRecord": "terms",
    "TermsTrace_ELBO": "terms",
    "TermsTraceMeanField_ELBO": "terms",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


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
