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
TEST_REQUIREMENTS = ["pytest==9.2.0", "playwright==1.65.2", "check-jsonschema==0.39.0"]
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


def _pins(*names):
    """The exact pins of ``names`` in requirements.txt (``name==version``), in the order given."""
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower()] = f"{name.strip()}=={version.strip()}"
    missing = [n for n in names if n.lower() not in pins]
    if missing:
        raise ValueError(f"requirements.txt pins no version of {missing}")
    return [pins[n.lower()] for n in names]


@nox.session
def versions(session):
    """The identity, claim and source checks under every Pyro release from 1.8.0 to the pinned one.

    Writes book/_data/pyro-versions.json (the ledger page's version matrix). Each release is
    installed without dependencies, beside the pinned torch, into its own folder of this
    session's venv; a release that does not install or import is recorded as such.
    Options after --: release numbers to check only those (e.g. -- 1.8.6 1.9.2) -- the record
    then keeps the other releases' rows from its last full run.
    """
    import datetime
    import json
    import os
    from concurrent.futures import ThreadPoolExecutor

    from packaging.version import Version

    torch_pin, pyro_pin = _pins("torch", "pyro-ppl")
    pinned = pyro_pin.split("==")[1]
    # the book's dependencies except Pyro itself (pins from requirements.txt) and Pyro's own;
    # elbo_terms is imported from code/ (PYTHONPATH), each Pyro from its own folder
    session.install(torch_pin, *_pins("sympy", "numpy", "scikit-learn", "matplotlib"), "pyro-api", "opt_einsum", "tqdm")
    listing = session.run("python", "-m", "pip", "index", "versions", "pyro-ppl", silent=True, log=False)
    line = next(ln for ln in listing.splitlines() if ln.startswith("Available versions:"))
    found = [Version(v.strip()) for v in line.split(":", 1)[1].split(",")]
    releases = sorted(str(v) for v in found if not v.is_prerelease and Version("1.8.0") <= v <= Version(pinned))
    releases.sort(key=Version)
    wanted = session.posargs or releases
    session.log(f"Pyro releases from 1.8.0 to {pinned}: {', '.join(releases)}; checking {', '.join(wanted)}")

    site = ROOT / ".nox" / "versions-pyro"
    script = str(ROOT / ".ci" / "pyro_versions.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

    def check(release):
        target = site / release
        if not (target / "pyro").is_dir():
            shutil.rmtree(target, ignore_errors=True)
            out = session.run(
                "python", "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target),
                f"pyro-ppl=={release}", silent=True, success_codes=range(256), log=False,
            )  # fmt: skip
            if not (target / "pyro").is_dir():
                tail = " ".join((out or "").split())[-500:]
                return {"pyro": release, "status": "install-failed", "error": tail, "checks": {}}
        env_release = dict(env, PYTHONPATH=os.pathsep.join([str(target), str(ROOT / "code")]))
        result = site / f"{release}.json"
        result.unlink(missing_ok=True)
        out = ""
        try:
            out = session.run(
                "python", script, str(result), env=env_release, silent=True, success_codes=range(256), log=False
            )  # fmt: skip
            row = json.loads(result.read_text())
        except Exception as exc:  # killed, or wrote no row: record how it ended
            tail = " ".join(str(out or exc).split())[-500:]
            return {"pyro": release, "status": "crashed", "error": tail, "checks": {}}
        if row["pyro"] is not None and row["pyro"] != release:
            row.update(status="import-failed", error=f"imported Pyro {row['pyro']}, not {release}", checks={})
        row["pyro"] = release
        row.pop("torch", None)
        bad = [iid for iid, c in row["checks"].items() if not c["passed"]]
        session.log(f"Pyro {release}: {row['status']}; {len(row['checks']) - len(bad)} passed, {len(bad)} failed")
        return row

    with ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as pool:
        rows = list(pool.map(check, wanted))

    path = ROOT / "book" / "_data" / "pyro-versions.json"
    old = json.loads(path.read_text()) if path.is_file() else {"versions": []}
    by_release = {row["pyro"]: row for row in old["versions"] if row["pyro"] in releases}
    by_release.update({row["pyro"]: row for row in rows})
    torch_version = session.run("python", "-c", "import torch; print(torch.__version__)", silent=True, log=False)
    record = {
        "command": "nox -s versions",
        "date": datetime.date.today().isoformat(),
        "torch": torch_version.strip(),
        "pinned": pinned,
        "versions": [by_release[r] for r in sorted(by_release, key=Version)],
    }
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    session.log(f"wrote {path.relative_to(ROOT)}")
