"""Chapter ``reconstruction-and-kl``: the p(x|z)p(z) split, AEVB estimators A and B, the Gaussian KL. (Being written.)"""

CHAPTER = "reconstruction-and-kl"
