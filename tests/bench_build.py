"""How fast the book builds and shows: ``nox -s bench`` (or ``python tests/bench_build.py``).

Works on a temporary copy of the project (conf.py, noxfile.py, requirements.txt, book/, code/)
-- the real files are never touched -- and builds it with the README's own command,
``nox -s docs`` (its own venv in the copy's .nox/, made once before the timings):

1. a cold build with the notebooks executed one after another (``ELBO_TERMS_JOBS=1``): the
   notebooks' **serial** execution time, the sum of their own times, is the unit of everything else;
2. a cold build as a maintainer runs it (the notebooks execute in parallel, one per core);
3. the same command again with nothing changed (warm: pip is skipped, nothing executes);
4. after editing one chapter's prose (a comment appended): executes nothing;
5. after editing one chapter's code (a code cell appended): executes that chapter only;
6. after editing a file under code/ (a comment appended): executes every chapter;

then opens every page of the book in headless Chromium (served from 127.0.0.1) and times, from
the navigation, the first screen's math typeset and all of the page's math typeset.

Targets: warm <= 0.05 x serial; cold <= 0.65 x serial + 30 s; the edits execute what they should;
no build log line contains "WARNING" and each ends with the "summary:" line; every page's
first screen <= 1 s and all its math <= 1.5 s. Exits 1 if one is missed. At the end it prints the
Markdown table for the README's "Rebuild times" section, dated.

``--chapter`` picks the chapter to edit, ``--keep`` keeps the copy, ``--no-browser`` skips the pages,
``--nox-python`` the Python that has nox (``nox -s bench`` passes its own), ``--envdir .nox`` reuses
an existing docs venv instead of making one in the copy (saves minutes; it is never installed into).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXECUTED = re.compile(r"^(?P<path>\S+?\.(?:md|ipynb)): Executed notebook in (?P<seconds>[0-9.]+) seconds", re.M)
CACHED = re.compile(r"^(?P<path>\S+?\.(?:md|ipynb)): Using cached notebook", re.M)
SKIPPED_PIP = "skipping pip install"
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass
class Build:
    name: str
    wall: float
    executed: dict[str, float]  # docname -> execution seconds
    cached: list[str]
    returncode: int
    log: str
    warnings: list[str] = field(default_factory=list)
    summary: str = ""
    pip_skipped: bool = False


def copy_project(dest: Path) -> None:
    """What `nox -s docs` needs (without caches and build products) into ``dest``."""
    patterns = shutil.ignore_patterns("__pycache__", "*.egg-info", ".ipynb_checkpoints", "_build")

    def ignore(folder, names):
        skip = set(patterns(folder, names))
        if Path(folder) == ROOT / "code" and "build" in names:  # setuptools' build folder, not elbo_terms/build
            skip.add("build")
        return skip

    for name in ("conf.py", "noxfile.py", "requirements.txt", "pyproject.toml"):
        shutil.copy(ROOT / name, dest / name)
    shutil.copytree(ROOT / "book", dest / "book", ignore=ignore)
    shutil.copytree(ROOT / "code", dest / "code", ignore=ignore)


def notebooks(book: Path) -> list[str]:
    """Docnames of the pages that execute (a kernelspec in their front matter), in table-of-contents order."""
    out = []
    for page in sorted(book.rglob("*.md")):
        text = page.read_text(encoding="utf8")
        if text.startswith("---\n") and "kernelspec:" in text.split("---\n", 2)[1]:
            out.append(page.relative_to(book).with_suffix("").as_posix())
    toctrees = re.findall(r"^```\{toctree\}\n(.*?)^```", (book / "index.md").read_text(encoding="utf8"), re.S | re.M)
    order = [ln.strip() for block in toctrees for ln in block.splitlines() if ln.strip() and ln[0] != ":"]
    return sorted(out, key=lambda d: order.index(d) if d in order else len(order))


class Nox:
    """``nox -s docs`` in the copy, with the copy's own venv."""

    def __init__(self, project: Path, python: str, envdir: Path | None = None):
        self.project, self.python = project, python
        self.envdir, self.shared = (envdir, True) if envdir else (project / ".nox", False)
        env = {k: v for k, v in os.environ.items() if k not in ("ELBO_TERMS_BUILD_DIR", "VIRTUAL_ENV")}
        # the copy's code/, whichever venv runs it
        self.env = dict(env, PYTHONPATH=str(project / "code"))

    def cmd(self, *extra: str) -> list[str]:
        noxfile = str(self.project / "noxfile.py")
        cmd = [self.python, "-m", "nox", "-f", noxfile, "-s", "docs", "--envdir", str(self.envdir)]
        # a venv that is not the copy's own is never installed into (its stamp still says whether pip would run)
        return cmd + (["--no-install"] if self.shared else []) + list(extra)

    def prepare(self) -> None:
        if self.shared:
            print(f"--- using the venv in {self.envdir}/docs (nox --no-install)", flush=True)
            return
        print("--- making the copy's venv (nox -s docs --install-only; not timed) ...", flush=True)
        proc = subprocess.run(
            self.cmd("--install-only"), cwd=self.project, env=self.env, capture_output=True, text=True
        )
        if proc.returncode != 0:
            sys.exit(f"could not make the copy's venv:\n{(proc.stdout + proc.stderr)[-4000:]}")

    def build(self, name: str, **env: str) -> Build:
        print(f"--- {name} ...", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(self.cmd(), cwd=self.project, env=dict(self.env, **env), capture_output=True, text=True)
        wall = time.perf_counter() - start
        log = proc.stdout + proc.stderr
        book = (self.project / "book").resolve()

        def docname(path: str) -> str:
            return Path(path).resolve().relative_to(book).with_suffix("").as_posix()

        executed = {docname(m["path"]): float(m["seconds"]) for m in EXECUTED.finditer(log)}
        cached = sorted(docname(m["path"]) for m in CACHED.finditer(log))
        warnings = [ln for ln in log.splitlines() if "WARNING" in ln]
        summaries = [ln for ln in log.splitlines() if ln.startswith("summary: ")]
        b = Build(name, wall, executed, cached, proc.returncode, log, warnings, summaries[-1] if summaries else "")
        b.pip_skipped = SKIPPED_PIP in log
        ran = ", ".join(f"{d} {s:.1f} s" for d, s in executed.items()) or "nothing"
        print(f"    {wall:.1f} s, exit {proc.returncode}; executed: {ran}", flush=True)
        print(f"    {b.summary or '(no summary line)'}", flush=True)
        if proc.returncode != 0:
            problems = [ln for ln in log.splitlines() if re.search(r"WARNING|ERROR|Error", ln)]
            print("\n".join(problems[-40:]) or log[-3000:], file=sys.stderr)
        return b


def sphinx_output_ends_with_summary(b: Build) -> bool:
    """The last line Sphinx printed (before nox's own closing line) is the summary."""
    lines = [ln for ln in b.log.splitlines() if ln.strip() and not ln.startswith("nox >")]
    return bool(lines) and lines[-1].startswith("summary: ")


# ---------------------------------------------------------------- the pages in a browser

# Seconds from the navigation: the first screen's math typeset (MathJax started, no math in the
# viewport left as a lazy placeholder), then every formula on the page typeset.
TIME_MATH = """async () => {
  const now = () => performance.now() / 1000;
  if (!document.querySelector('script[src*="mathjax"]')) return null;
  while (!(window.MathJax && MathJax.startup && MathJax.startup.promise)) await new Promise(r => setTimeout(r, 5));
  await MathJax.startup.promise;
  const inView = e => { const r = e.getBoundingClientRect();
                        return r.bottom > 0 && r.top < innerHeight && r.right > 0 && r.left < innerWidth; };
  const pending = () => [...document.querySelectorAll('.math, mjx-container')].some(e =>
      inView(e) && (e.matches('mjx-container') ? !!e.querySelector('mjx-lazy') : !e.querySelector('mjx-container')));
  for (let i = 0; i < 2000 && pending(); i++) await new Promise(r => requestAnimationFrame(r));
  const first = now();
  const doc = MathJax.startup.document;
  if (doc.lazyTypesetAll) await doc.lazyTypesetAll();
  return {first, all: now(), formulas: Array.from(doc.math).length,
          lazy: document.querySelectorAll('mjx-lazy').length};
}"""


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002
        pass


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # a page closed before a download ended: not news
        pass


def browser_times(html: Path, pages: list[str], repeat: int = 3) -> dict[str, tuple[float, float] | None] | str:
    """{page: (first screen s, all math s) or None (no math)}, medians of ``repeat`` cold loads at 1280 x 900.

    A string says why the pages could not be timed.
    """
    if not CHROMIUM.is_file():
        return f"no Chromium at {CHROMIUM}"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return "Playwright is not installed"
    httpd = _QuietServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(html)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}/"
    out = {}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            for page in pages:
                runs = []
                for _ in range(repeat):
                    context = browser.new_context(viewport={"width": 1280, "height": 900})
                    tab = context.new_page()
                    tab.goto(base + page + ".html", wait_until="domcontentloaded")
                    r = tab.evaluate(TIME_MATH)
                    context.close()
                    if r is None:
                        out[page] = None
                        break
                    if r["lazy"]:
                        return f"{page}: {r['lazy']} formulas left untypeset"
                    runs.append((r["first"], r["all"]))
                if runs:
                    out[page] = (statistics.median(a for a, _ in runs), statistics.median(b for _, b in runs))
            browser.close()
    finally:
        httpd.shutdown()
        httpd.server_close()
    return out


# ---------------------------------------------------------------- the run


def append(path: Path, text: str) -> None:
    path.write_text(path.read_text(encoding="utf8") + text, encoding="utf8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chapter", default=None, help="the chapter to edit (default: the first notebook)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy of the project")
    ap.add_argument("--no-browser", action="store_true", help="do not time the pages in Chromium")
    ap.add_argument("--nox-python", default=sys.executable, help="a Python with nox installed")
    ap.add_argument(
        "--envdir",
        type=Path,
        default=None,
        help="reuse this nox envdir's docs venv (never installed into) instead of making one in the copy",
    )
    a = ap.parse_args()

    project = Path(tempfile.mkdtemp(prefix="elbo-terms-bench-"))
    try:
        copy_project(project)
        book = project / "book"
        nbs = notebooks(book)
        chapter = a.chapter or nbs[0]
        if chapter not in nbs:
            print(f"--chapter {chapter!r} is not a notebook; notebooks: {', '.join(nbs)}", file=sys.stderr)
            return 2
        print(f"bench on a copy in {project}: {len(nbs)} notebooks ({', '.join(nbs)}); edited chapter: {chapter}")
        nox = Nox(project, a.nox_python, a.envdir and a.envdir.resolve())
        nox.prepare()
        cache = project / "_build" / ".jupyter_cache"
        builds = [nox.build("cold, serial execution", ELBO_TERMS_JOBS="1")]
        shutil.rmtree(cache)  # a clean clone: no cache, and no timings of a last build to schedule by
        (project / "_build" / "notebook-times.json").unlink(missing_ok=True)
        builds.append(nox.build("cold"))
        builds.append(nox.build("nothing changed"))
        append(book / f"{chapter}.md", "\n<!-- bench: a prose edit -->\n")
        builds.append(nox.build(f"{chapter}: prose edited"))
        append(book / f"{chapter}.md", "\n```{code-cell} ipython3\n# bench: a code edit\n```\n")
        builds.append(nox.build(f"{chapter}: code edited"))
        append(project / "code" / "elbo_terms" / "_util.py", "\n# bench: an edit under code/\n")
        builds.append(nox.build("code/ edited"))
        pages = sorted(p.stem for p in book.glob("*.md"))
        if a.no_browser:
            pages_timed: dict | str = "skipped (--no-browser)"
        else:
            print("--- the pages in Chromium ...", flush=True)
            pages_timed = browser_times(project / "_build" / "html", pages)
    finally:
        if a.keep:
            print(f"kept {project}")
        else:
            shutil.rmtree(project, ignore_errors=True)

    return report(builds, nbs, chapter, pages_timed)


def report(builds: list[Build], nbs: list[str], chapter: str, pages: dict | str) -> int:
    serial_build, cold, warm, prose, code_cell, code_dir = builds
    serial = sum(serial_build.executed.values())
    cold_target = 0.65 * serial + 30

    def ran(b: Build) -> str:
        if not b.executed:
            return "none"
        if sorted(b.executed) == sorted(nbs) and len(nbs) > 1:
            return f"all {len(nbs)}"
        return ", ".join(sorted(b.executed))

    def ratio(b: Build) -> str:
        return f"{b.wall / serial:.3f}" if serial else "-"

    rows = [
        (serial_build, "(the unit: serial execution)", sorted(serial_build.executed) == sorted(nbs)),
        (cold, f"≤ 0.65 × serial + 30 s = {cold_target:.1f} s", cold.wall <= cold_target),
        (
            warm,
            f"≤ 0.05 × serial = {0.05 * serial:.1f} s, pip skipped, executes none",
            warm.wall <= 0.05 * serial and not warm.executed and warm.pip_skipped,
        ),
        (prose, "executes none", not prose.executed),
        (code_cell, f"executes {chapter} only", sorted(code_cell.executed) == [chapter]),
        (code_dir, "executes every chapter", sorted(code_dir.executed) == sorted(nbs)),
    ]
    ok = True
    table = [
        "| build (`nox -s docs`) | wall time (s) | ÷ serial | notebooks executed | target | met |",
        "|---|---:|---:|---|---|---|",
    ]
    for b, target, met in rows:
        clean = b.returncode == 0 and not b.warnings and sphinx_output_ends_with_summary(b)
        met = met and clean
        ok &= met
        status = "yes" if met else ("NO (build failed)" if b.returncode else "NO" if clean else "NO (log)")
        table.append(f"| {b.name} | {b.wall:.1f} | {ratio(b)} | {ran(b)} | {target} | {status} |")
    print("\n" + "\n".join(table))
    for b in builds:
        if b.warnings:
            print(f"\n{b.name}: log lines with WARNING:\n  " + "\n  ".join(b.warnings[:10]))
        if not sphinx_output_ends_with_summary(b):
            print(f"\n{b.name}: Sphinx's output does not end with the summary line")

    print("\n| notebook | serial (s) | in parallel, cold (s) | in parallel, after the code/ edit (s) |")
    print("|---|---:|---:|---:|")
    for nb in nbs:
        cells = [x.executed.get(nb) for x in (serial_build, cold, code_dir)]
        print(f"| {nb} | " + " | ".join("-" if c is None else f"{c:.1f}" for c in cells) + " |")
    print(f"| **sum** | {serial:.1f} | {sum(cold.executed.values()):.1f} | {sum(code_dir.executed.values()):.1f} |")

    page_rows = []
    if isinstance(pages, str):
        print(f"\npages: {pages}")
    else:
        print("\n| page | first screen typeset (s) | all math typeset (s) | met (≤ 1 s, ≤ 1.5 s) |")
        print("|---|---:|---:|---|")
        for page, times in pages.items():
            if times is None:
                print(f"| {page} | no math | no math | yes |")
                continue
            first, full = times
            met = first <= 1.0 and full <= 1.5
            ok &= met
            page_rows.append((page, first, full))
            print(f"| {page} | {first:.2f} | {full:.2f} | {'yes' if met else 'NO'} |")

    print(
        f"\nserial execution {serial:.1f} s; cold build {cold.wall:.1f} s = {ratio(cold)} × serial "
        f"(target ≤ 0.65 × serial + 30 s); warm build {warm.wall:.1f} s = {ratio(warm)} × serial (target ≤ 0.05)"
    )
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, Python {sys.version.split()[0]}")

    # for the README's "Rebuild times" section
    today = datetime.date.today().isoformat()
    print(f'\n---- README, "Rebuild times" (measured {today}) ----\n')
    print(f"Measured with `python3 -m nox -s bench` on {today} ({os.cpu_count()} cores):\n")
    print("| `nox -s docs` | wall time (s) | ÷ serial execution | notebooks executed |")
    print("|---|---:|---:|---|")
    names = [
        "cold, notebooks one at a time",
        "cold (the default: one notebook per core)",
        "again, nothing changed",
        f"one chapter's prose edited ({chapter})",
        f"one chapter's code edited ({chapter})",
        "a file under `code/` edited",
    ]
    for name, b in zip(names, builds, strict=True):
        print(f"| {name} | {b.wall:.1f} | {ratio(b)} | {ran(b)} |")
    print(f"\nThe notebooks' serial execution time (the sum of their own times) is {serial:.1f} s.", end="")
    if page_rows:
        worst_first = max(page_rows, key=lambda r: r[1])
        worst_all = max(page_rows, key=lambda r: r[2])
        print(
            f" In headless Chromium every page's first screen of math is typeset within {worst_first[1]:.2f} s "
            f"of the navigation ({worst_first[0]} the slowest) and all of its math within {worst_all[2]:.2f} s "
            f"({worst_all[0]})."
        )
    else:
        print()
    print("\nall targets met" if ok else "\nTARGETS MISSED (see the tables above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
