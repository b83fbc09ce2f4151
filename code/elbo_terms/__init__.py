"""elbo_terms: what Pyro's Trace_ELBO computes, checked term by term.

* :func:`decompose` -- the per-term ELBO of your own model and guide.
* ``IDENTITIES`` -- every identity the book states, with its SymPy proof and its
  numeric check against Pyro (see :mod:`elbo_terms.identity`).

The check modules, one per chapter, register their identities when imported.
"""

from . import conjugate, gradients, kl, likelihoods, trace_source, vae  # noqa: F401  (register identities)
from .decompose import decompose
from .identity import IDENTITIES, Identity, IdentityFailed, Numeric, exact, monte_carlo

__all__ = ["decompose", "IDENTITIES", "Identity", "IdentityFailed", "Numeric", "exact", "monte_carlo"]
__version__ = "0.1.0"
