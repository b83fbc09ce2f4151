"""Benchmark: ``decompose`` and ``TermsTrace_ELBO`` against Pyro's ``Trace_ELBO`` on the same model.

    python tests/bench_decompose.py [--repeats 20] [--quick]

Three tables, each a ratio of median times (the best of three interleaved rounds, both sides
on the same seeds), on the book's example VAE (``elbo_terms.chapters.decompose_checks``:
scikit-learn's bundled digits, 64 Bernoulli pixels, a subsampled minibatch plate, MLP encoder
and decoder), in float32 as people train it, with Pyro's validation off as in training
(``--validation`` turns it on):

1. ``decompose`` / ``Trace_ELBO.loss`` (minibatch 128, 64 hidden units): one particle,
   several sequential particles, several vectorized particles (target <= 1.15);
2. the same ratio for 1 to 100,000 vectorized particles (minibatch 2, so that 100,000
   particles fit in memory; target <= 1.15 throughout);
3. the time of one ``SVI.step`` with ``TermsTrace_ELBO`` (and ``TermsTraceMeanField_ELBO``)
   / with ``Trace_ELBO`` (``TraceMeanField_ELBO``) on the book's VAE as the chapter trains it,
   sequential and vectorized particles (target <= 1.05).

Prints which ratios exceed their targets; with ``--strict`` it then exits 1.  (Not a pytest
test: its name does not start with ``test_``.)  Times are the process's CPU time (torch on one
thread), which other processes' load affects less than wall time; still, run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import pyro
import torch
from elbo_terms import TermsTrace_ELBO, TermsTraceMeanField_ELBO, decompose
from elbo_terms.chapters.decompose_checks import example_data, example_vae
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.optim import Adam

SETTINGS = [(1, False), (8, False), (8, True)]  # (num_particles, vectorize_particles)
SWEEP = [1, 10, 100, 1_000, 10_000, 100_000]  # vectorized particles
STEP_SETTINGS = [(1, False), (4, False), (4, True), (16, True)]


def median_seconds(fn, repeats):
    """Median CPU seconds of this process per call (CPU time, not wall time: other processes' load is left out)."""
    times = []
    for i in range(repeats):
        pyro.set_rng_seed(i)
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return statistics.median(times)


def interleaved(fn_a, fn_b, repeats, rounds=3):
    """Best (over ``rounds``) of the median seconds of ``fn_a`` and of ``fn_b``, run alternately."""
    for _ in range(2):  # warm up
        fn_a(), fn_b()
    t_a, t_b = [], []
    for _ in range(rounds):  # interleave, to share any drift of the machine's load
        t_a.append(median_seconds(fn_a, repeats))
        t_b.append(median_seconds(fn_b, repeats))
    return min(t_a), min(t_b)


def decompose_ratio(num_particles, vectorize, repeats, model, guide, x):
    """Median seconds of Trace_ELBO.loss and of decompose, after checking that they agree."""
    options = dict(num_particles=num_particles, vectorize_particles=vectorize, max_plate_nesting=1)
    elbo = Trace_ELBO(**options)

    def pyro_loss():
        return elbo.loss(model, guide, x)

    def ours():
        return decompose(model, guide, x, **options)

    pyro.set_rng_seed(0)
    check = pyro_loss()
    pyro.set_rng_seed(0)
    assert ours().loss == check, "decompose and Trace_ELBO disagree"
    return interleaved(pyro_loss, ours, repeats)


def step_ratio(ours_class, pyro_class, num_particles, vectorize, repeats):
    """Median seconds of one SVI step with Pyro's ELBO and with the recorder (each on its own fresh VAE)."""
    x = example_data()
    options = dict(num_particles=num_particles, vectorize_particles=vectorize, max_plate_nesting=1)
    steps = []
    for cls in (pyro_class, ours_class):
        model, guide = example_vae()
        with pyro.get_param_store().scope():  # each its own parameters
            svi = SVI(model, guide, Adam({"lr": 1e-3}), cls(**options))
            svi.step(x)
            store = pyro.get_param_store().get_state()

        def step(svi=svi, store=store):
            with pyro.get_param_store().scope(store):
                svi.step(x)

        steps.append(step)
    return interleaved(steps[0], steps[1], repeats)


def table(title, header, rows):
    print(f"\n{title}")
    print("  ".join(f"{h:>14s}" for h in header))
    for row in rows:
        print("  ".join(f"{c:>14s}" for c in row))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="fewer repeats, sweep to 10,000 particles only")
    ap.add_argument("--validation", action="store_true", help="with pyro.enable_validation(True)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a ratio exceeds its target")
    a = ap.parse_args(argv)
    repeats = 5 if a.quick else a.repeats
    torch.set_num_threads(1)
    pyro.enable_validation(a.validation)
    pyro.clear_param_store()
    x = example_data()
    failures = []

    model, guide = example_vae(batch_size=128, hidden=64, latent=4)
    rows, worst = [], 0.0
    for num_particles, vectorize in SETTINGS:
        tp, to = decompose_ratio(num_particles, vectorize, repeats, model, guide, x)
        worst = max(worst, to / tp)
        rows.append((str(num_particles), str(vectorize), f"{tp * 1e3:.3f} ms", f"{to * 1e3:.3f} ms", f"{to / tp:.3f}"))
    table("decompose / Trace_ELBO.loss", ("particles", "vectorized", "Trace_ELBO.loss", "decompose", "ratio"), rows)
    print(f"worst ratio: {worst:.3f} (target <= 1.15)")
    if worst > 1.15:
        failures.append("decompose")

    model, guide = example_vae(batch_size=2, hidden=32, latent=2)
    rows, worst = [], 0.0
    for num_particles in SWEEP if not a.quick else SWEEP[:-1]:
        reps = max(3, min(repeats, 20_000 // num_particles))
        tp, to = decompose_ratio(num_particles, True, reps, model, guide, x)
        worst = max(worst, to / tp)
        rows.append((f"{num_particles:,}", f"{tp * 1e3:.3f} ms", f"{to * 1e3:.3f} ms", f"{to / tp:.3f}"))
    table(
        "decompose / Trace_ELBO.loss, vectorized particles (minibatch 2)",
        ("particles", "Trace_ELBO.loss", "decompose", "ratio"),
        rows,
    )
    print(f"worst ratio: {worst:.3f} (target <= 1.15)")
    if worst > 1.15:
        failures.append("decompose sweep")

    pyro.clear_param_store()
    rows, worst = [], 0.0
    for ours_class, pyro_class in ((TermsTrace_ELBO, Trace_ELBO), (TermsTraceMeanField_ELBO, TraceMeanField_ELBO)):
        for num_particles, vectorize in STEP_SETTINGS:
            tp, to = step_ratio(ours_class, pyro_class, num_particles, vectorize, repeats)
            worst = max(worst, to / tp)
            rows.append(
                (
                    ours_class.__name__[5:],
                    str(num_particles),
                    str(vectorize),
                    f"{tp * 1e3:.3f} ms",
                    f"{to * 1e3:.3f} ms",
                )
                + (f"{to / tp:.3f}",)
            )
    table(
        "SVI step time: TermsTrace_ELBO / Trace_ELBO (the book's VAE)",
        ("ELBO", "particles", "vectorized", "Pyro's class", "recorder", "ratio"),
        rows,
    )
    print(f"worst ratio: {worst:.3f} (target <= 1.05)")
    if worst > 1.05:
        failures.append("recorder")
    pyro.clear_param_store()
    if failures:
        print(f"over target: {', '.join(failures)}")
    return 1 if failures and a.strict else 0


if __name__ == "__main__":
    sys.exit(main())
