"""One module per chapter: the models a chapter runs and the identities it states.

Importing this package registers every identity of the book in
:data:`elbo_terms.build.identity.IDENTITIES`.

| module | chapter |
|---|---|
| ``answer`` | index (the answer page) |
| ``conjugate`` | elbo |
| ``trace_source`` | inside-trace-elbo |
| ``kl`` | reconstruction-and-kl |
| ``likelihoods``, ``denoising`` | likelihoods-as-losses |
| ``gradients`` | gradients, gradient-estimators |
| ``vae`` | vae-bridge, vae-options |
| ``decompose_checks`` | decompose |
"""

from . import conjugate, decompose_checks, gradients, kl, likelihoods, questions, trace_source, vae  # noqa: F401
