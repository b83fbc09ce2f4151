"""Sessions: docs (build the book), serve (live preview), tests (the whole suite), lint (ruff), bench."""

import hashlib
import shutil
import sys
from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_venv = "yes"
nox.options.default_venv_backend = "venv"

ROOT = Path(__file__).parent
TEST_REQUIREMENTS = ["pytest==9.2.0", "playwright==1.65.2"]
SERVE_REQUIREMENTS = ["sphinx-autobuild==2025.8.25"]
SPHINX = ["sphinx-build", "-n", "-W", "--keep-going", "-c", ".", "book"]
# what an install depends on: the pins, and the packaging of code/ (installed editable: its sources need no reinstall)
INSTALL_INPUTS = ["requirements.txt", "code/pyproject.toml"]


def install(session, *extra):
    """``pip install -r requirements.txt *extra``, skipped when the venv already has exactly that.

    A stamp inside the venv holds a hash of requirements.txt, code/'s packaging and ``extra``;
    while it matches, pip (which takes seconds just to find everything installed) is not run.
    A new venv (``nox -r``, another Python) has no stamp, so it is always installed.
    """
    key = hashlib.sha256()
    for name in INSTALL_INPUTS:
        key.update(name.encode() + b"\0" + (ROOT / name).read_bytes() + b"\0")
    key.update("\n".join(extra).encode())
    venv = getattr(session.virtualenv, "location", None)
    stamp = Path(venv) / "elbo-terms-install.sha256" if venv else None
    if stamp is not None and stamp.is_file() and stamp.read_text().strip() == key.hexdigest():
        session.log(f"{' and '.join(INSTALL_INPUTS)} unchanged since the last install: skipping pip install")
        return
    session.install("-r", "requirements.txt", *extra)
    # `nox --no-install` on a reused venv makes session.install a no-op: then nothing was installed
    no_install = getattr(session._runner.global_config, "no_install", False)
    skipped = no_install and getattr(session.virtualenv, "_reused", False)
    if stamp is not None and not skipped:
        stamp.write_text(key.hexdigest() + "\n")


@nox.session
def docs(session):
    """Build the HTML book into _build/html (fresh doctrees; cached, never stale, execution)."""
    install(session)
    shutil.rmtree(ROOT / "_build" / "doctrees", ignore_errors=True)
    session.run(*SPHINX, "-E", "-d", "_build/doctrees", "_build/html", *session.posargs)


@nox.session
def serve(session):
    """Live preview while writing: http://127.0.0.1:8000, rebuilt on every save under book/ or code/.

    Incremental: only the pages you change are read again, and only notebooks whose code changed
    are executed (an edit under code/ changes the cache key: every chapter re-executes).
    Extra arguments go to sphinx-autobuild (``nox -s serve -- --port 8001``).
    """
    install(session, *SERVE_REQUIREMENTS)
    ignore = r"(__pycache__|\.egg-info|\.ipynb_checkpoints|\.pytest_cache|~$|\.sw[a-p]$)"
    session.run(
        "sphinx-autobuild",
        *SPHINX[1:],  # sphinx-build's arguments
        "_build/html",
        "-d",
        "_build/doctrees",
        "--watch",
        "code",
        "--re-ignore",
        ignore,
        "--host",
        "127.0.0.1",
        "--port",
        "8000",
        *session.posargs,
    )


@nox.session
def tests(session):
    """Unit tests, the book build tests and the browser tests."""
    install(session, *TEST_REQUIREMENTS)
    session.run("pytest", *(session.posargs or ["-ra"]))


@nox.session
def lint(session):
    """ruff on the library, the tests and the build files."""
    session.install("ruff==0.17.6")
    session.run("ruff", "check", "code", "tests", "conf.py", "noxfile.py")
    session.run("ruff", "format", "--check", "code", "tests", "conf.py", "noxfile.py")


@nox.session
def bench(session):
    """Timings: decompose's benchmark (when present), then the book's builds on a copy, through nox, and its pages."""
    install(session, *TEST_REQUIREMENTS)
    if (ROOT / "tests" / "bench_decompose.py").exists():
        session.run("python", "tests/bench_decompose.py")
    # the copy's builds run `nox -s docs` with the nox running this session
    session.run("python", "tests/bench_build.py", "--nox-python", sys.executable, *session.posargs)
