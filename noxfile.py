"""Sessions: docs (build the book), tests (the whole suite), lint (ruff), bench."""

import shutil
from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_venv = "yes"
nox.options.default_venv_backend = "venv"

ROOT = Path(__file__).parent
TEST_REQUIREMENTS = ["pytest==9.2.0", "playwright==1.65.2", "check-jsonschema==0.39.0"]
SPHINX = ["sphinx-build", "-n", "-W", "--keep-going", "-c", ".", "book"]


def install(session, *extra):
    session.install("-r", "requirements.txt", *extra)


@nox.session
def docs(session):
    """Build the HTML book into _build/html (fresh doctrees; cached, never stale, execution)."""
    install(session)
    shutil.rmtree(ROOT / "_build" / "doctrees", ignore_errors=True)
    session.run(*SPHINX, "-E", "-d", "_build/doctrees", "_build/html", *session.posargs)


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
    """Timings: decompose's benchmark (when present), then the book's cold build and rebuilds (on a copy)."""
    install(session)
    if (ROOT / "tests" / "bench_decompose.py").exists():
        session.run("python", "tests/bench_decompose.py")
    session.run("python", "tests/bench_build.py", *session.posargs)
