"""Shared fixtures: the real book, built once per test session with the strict build."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Build:
    out: Path  # the build folder (html/, doctrees/, jupyter_execute/, .jupyter_cache/)
    returncode: int
    log: str

    @property
    def html(self) -> Path:
        return self.out / "html"

    def ledger(self) -> dict:
        return json.loads((self.html / "ledger.json").read_text())


def sphinx_build(src: Path, out: Path, confdir: Path = ROOT, fresh: bool = True, env: dict | None = None) -> Build:
    """Run the strict build of ``src`` into ``out/html`` with its execution cache in ``out``."""
    cmd = [sys.executable, "-m", "sphinx", "-n", "-W", "--keep-going", "-c", str(confdir), str(src), str(out / "html")]
    cmd += ["-d", str(out / "doctrees")] + (["-E"] if fresh else [])
    env = dict(os.environ, ELBO_TERMS_BUILD_DIR=str(out), **(env or {}))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    return Build(out, proc.returncode, proc.stdout + proc.stderr)


@pytest.fixture(scope="session")
def built_book() -> Build:
    """The whole book, built strictly into _build/test-book (its cache is kept between runs)."""
    build = sphinx_build(ROOT / "book", ROOT / "_build" / "test-book")
    if build.returncode != 0:
        pytest.fail(f"the book did not build (exit {build.returncode}):\n{build.log[-6000:]}")
    return build


@pytest.fixture
def pyro_float64():
    """float64, Pyro's validation on, an empty param store; everything restored afterwards."""
    import pyro
    import torch

    old_dtype, old_validation = torch.get_default_dtype(), pyro.infer.util.is_validation_enabled()
    torch.set_default_dtype(torch.float64)
    pyro.enable_validation(True)
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()
    pyro.enable_validation(old_validation)
    torch.set_default_dtype(old_dtype)
