"""Benchmark: time of ``decompose`` / time of ``Trace_ELBO.loss`` on the same model and particles.

    python tests/bench_decompose.py [--repeats 30] [--target 1.15]

The model is the book's example VAE (``elbo_terms.chapters.decompose_checks.example_vae``: scikit-learn's
bundled digits, 64 Bernoulli pixels, a subsampled minibatch plate, MLP encoder and decoder),
here with a minibatch of 128 and 64 hidden units, run in float32 as people train it, with
Pyro's validation off as in training (``--validation`` turns it on).  For each
particle setting both calls run on the same seed, alternating, and the ratio of their
median times is printed.  Exits 1 when a ratio exceeds the target.  (Not a pytest test: its
name does not start with ``test_``.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import pyro
import torch
from elbo_terms import decompose
from elbo_terms.chapters.decompose_checks import example_data, example_vae
from pyro.infer import Trace_ELBO

SETTINGS = [(1, False), (8, False), (8, True)]  # (num_particles, vectorize_particles)


def median_seconds(fn, repeats):
    times = []
    for i in range(repeats):
        pyro.set_rng_seed(i)
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def ratio(num_particles, vectorize, repeats, model, guide, x):
    """Median seconds of Trace_ELBO.loss and of decompose (best of 3 interleaved rounds)."""
    options = dict(num_particles=num_particles, vectorize_particles=vectorize, max_plate_nesting=1)
    elbo = Trace_ELBO(**options)

    def pyro_loss():
        return elbo.loss(model, guide, x)

    def ours():
        return decompose(model, guide, x, **options)

    pyro.set_rng_seed(0)
    check = pyro_loss()
    pyro.set_rng_seed(0)
    assert abs(ours().loss - check) <= 1e-5 * abs(check), "decompose and Trace_ELBO disagree"
    for _ in range(3):  # warm up
        pyro_loss(), ours()
    t_pyro, t_ours = [], []
    for _ in range(3):  # interleave, to share any drift of the machine's load
        t_pyro.append(median_seconds(pyro_loss, repeats))
        t_ours.append(median_seconds(ours, repeats))
    return min(t_pyro), min(t_ours)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--target", type=float, default=1.15)
    ap.add_argument("--validation", action="store_true", help="with pyro.enable_validation(True)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    pyro.enable_validation(a.validation)
    pyro.clear_param_store()
    x = example_data()
    model, guide = example_vae(batch_size=128, hidden=64, latent=4)
    worst = 0.0
    print(f"{'particles':>9s} {'vectorized':>10s} {'Trace_ELBO.loss':>16s} {'decompose':>10s} {'ratio':>6s}")
    for num_particles, vectorize in SETTINGS:
        tp, to = ratio(num_particles, vectorize, a.repeats, model, guide, x)
        worst = max(worst, to / tp)
        print(f"{num_particles:9d} {str(vectorize):>10s} {tp * 1e3:13.3f} ms {to * 1e3:7.3f} ms {to / tp:6.3f}")
    print(f"worst ratio decompose / Trace_ELBO.loss: {worst:.3f} (target <= {a.target})")
    pyro.clear_param_store()
    return 0 if worst <= a.target else 1


if __name__ == "__main__":
    sys.exit(main())
