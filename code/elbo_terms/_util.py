"""Small helpers shared by the check modules: float64 and a private random stream."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def float64():
    """Run a block with torch's default dtype set to float64, then restore it."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block on torch's RNG seeded with ``seed``, leaving the caller's stream untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def t64(x) -> torch.Tensor:
    """A float64 tensor."""
    return torch.as_tensor(x, dtype=torch.float64)
