"""Chapter ``vae-bridge``: a PyTorch VAE and its Pyro twin. (Being written.)"""

CHAPTER = "vae-bridge"
