"""``decompose(model, guide, ...)``: the per-term ELBO of your own model and guide. (Being written.)"""


def decompose(model, guide, *args, num_particles=1, vectorize_particles=False, **kwargs):
    raise NotImplementedError("decompose is being written")
