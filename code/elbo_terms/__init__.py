"""elbo_terms: what Pyro's Trace_ELBO computes, term by term, for your own model.

The library a reader imports (torch and Pyro only; no SymPy, none of the book's modules):

* :func:`decompose` -- the per-term ELBO of your model and guide, on the draws a fresh
  ``Trace_ELBO`` would make: reconstruction, log prior, log q, the Monte Carlo KL, and the
  closed-form KL where torch has one.
* :class:`Decomposition`, :class:`DecomposeError`, :class:`ScaleMismatchWarning`.

The rest of the package serves the book: ``elbo_terms.chapters`` holds one module per chapter
(its models and the identities it states), ``elbo_terms.build`` the checking machinery (the
identity registry, what chapters call while they execute, the Sphinx extensions).
"""

from .decomposition import DecomposeError, Decomposition, ScaleMismatchWarning, decompose

__all__ = ["decompose", "Decomposition", "DecomposeError", "ScaleMismatchWarning"]
__version__ = "0.1.0"
