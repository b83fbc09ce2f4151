"""Chapter ``likelihoods-as-losses``: Gaussian -> L2, Bernoulli -> BCE, and others. (Being written.)"""

CHAPTER = "likelihoods-as-losses"
