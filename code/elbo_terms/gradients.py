"""Chapter ``gradients``: score-function (BBVI eq. 2-3) vs reparameterization gradients. (Being written.)"""

CHAPTER = "gradients"
