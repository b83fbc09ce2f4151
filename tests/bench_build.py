"""How fast the book rebuilds: ``python tests/bench_build.py`` (or ``nox -s bench``).

Works on a temporary copy of the project (conf.py, book/, code/) -- the real files are never
touched -- and runs the same command as ``nox -s docs`` (strict, fresh doctrees, cached
execution) five times:

1. a cold build (no execution cache);
2. a rebuild with nothing changed;
3. a rebuild after editing one chapter's prose (a comment appended);
4. a rebuild after editing one chapter's code (a code cell appended);
5. a rebuild after editing a file under code/ (a comment appended).

For each it prints the wall time and which notebooks were executed (from myst-nb's log),
then the per-notebook execution times and the ratio of the cold build to the sum of the
notebooks' own execution times, with the targets:

* nothing changed: at most 10 s;
* one chapter edited: that chapter only is re-executed (prose only: none);
* a code/ file edited: every chapter is re-executed;
* cold build: at most 1.3 x the notebooks' execution time + 30 s.

Exits 1 if a build fails or a target is missed. ``--chapter`` picks the chapter to edit,
``--keep`` keeps the temporary copy.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXECUTED = re.compile(r"^(?P<path>\S+?\.(?:md|ipynb)): Executed notebook in (?P<seconds>[0-9.]+) seconds", re.M)
CACHED = re.compile(r"^(?P<path>\S+?\.(?:md|ipynb)): Using cached notebook", re.M)


@dataclass
class Build:
    name: str
    wall: float
    executed: dict[str, float]  # docname -> execution seconds
    cached: list[str]
    returncode: int
    log: str


def copy_project(dest: Path) -> None:
    """conf.py, book/ and code/ (without caches and build products) into ``dest``."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", ".ipynb_checkpoints", "_build")
    shutil.copy(ROOT / "conf.py", dest / "conf.py")
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


def build(project: Path, name: str) -> Build:
    """What ``nox -s docs`` runs (fresh doctrees, cached execution), timed, in ``project``."""
    out = project / "_build"
    shutil.rmtree(out / "doctrees", ignore_errors=True)
    cmd = [sys.executable, "-m", "sphinx", "-n", "-W", "--keep-going", "-c", str(project), str(project / "book")]
    cmd += [str(out / "html"), "-E", "-d", str(out / "doctrees")]
    # the copy's package, not the installed one, for Sphinx and for the kernels it starts
    env = dict(os.environ, ELBO_TERMS_BUILD_DIR=str(out), PYTHONPATH=str(project / "code"))
    print(f"--- {name} ...", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    log = proc.stdout + proc.stderr

    def docname(path: str) -> str:
        return Path(path).resolve().relative_to((project / "book").resolve()).with_suffix("").as_posix()

    executed = {docname(m["path"]): float(m["seconds"]) for m in EXECUTED.finditer(log)}
    cached = sorted(docname(m["path"]) for m in CACHED.finditer(log))
    b = Build(name, wall, executed, cached, proc.returncode, log)
    ran = ", ".join(f"{d} {s:.1f} s" for d, s in executed.items()) or "nothing"
    print(f"    {wall:.1f} s, exit {proc.returncode}; executed: {ran}", flush=True)
    if proc.returncode != 0:
        problems = [ln for ln in log.splitlines() if re.search(r"WARNING|ERROR|Error", ln) and "IPKernelApp" not in ln]
        print("\n".join(problems[-40:]) or log[-3000:], file=sys.stderr)
    return b


def append(path: Path, text: str) -> None:
    path.write_text(path.read_text(encoding="utf8") + text, encoding="utf8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chapter", default=None, help="the chapter to edit (default: the first notebook)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy of the project")
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

        builds = [build(project, "cold build")]
        builds.append(build(project, "nothing changed"))
        append(book / f"{chapter}.md", "\n<!-- bench: a prose edit -->\n")
        builds.append(build(project, f"{chapter}: prose edited"))
        append(book / f"{chapter}.md", "\n```{code-cell} ipython3\n# bench: a code edit\n```\n")
        builds.append(build(project, f"{chapter}: code edited"))
        append(project / "code" / "elbo_terms" / "_util.py", "\n# bench: an edit under code/\n")
        builds.append(build(project, "code/ edited"))
    finally:
        if a.keep:
            print(f"kept {project}")
        else:
            shutil.rmtree(project, ignore_errors=True)

    return report(builds, nbs, chapter)


def report(builds: list[Build], nbs: list[str], chapter: str) -> int:
    cold, same, prose, code_cell, code_dir = builds
    exec_sum = sum(cold.executed.values())
    cold_target = 1.3 * exec_sum + 30

    def ran(b: Build) -> str:
        if not b.executed:
            return "none"
        if sorted(b.executed) == sorted(nbs) and len(nbs) > 1:
            return f"all {len(nbs)} ({sum(b.executed.values()):.1f} s)"
        return ", ".join(f"{d} ({s:.1f} s)" for d, s in b.executed.items())

    rows = [
        (cold, f"≤ 1.3 × {exec_sum:.1f} + 30 = {cold_target:.1f} s", cold.wall <= cold_target),
        (same, "≤ 10 s, executes none", same.wall <= 10 and not same.executed),
        (prose, "executes none", not prose.executed),
        (code_cell, f"executes {chapter} only", sorted(code_cell.executed) == [chapter]),
        (code_dir, "executes every chapter", sorted(code_dir.executed) == sorted(nbs)),
    ]
    ok = all(b.returncode == 0 for b in builds)
    print("\n| build | wall time (s) | notebooks executed | target | met |")
    print("|---|---:|---|---|---|")
    for b, target, met in rows:
        met = met and b.returncode == 0
        ok &= met
        status = "yes" if met else ("NO (build failed)" if b.returncode else "NO")
        print(f"| {b.name} | {b.wall:.1f} | {ran(b)} | {target} | {status} |")

    print("\n| notebook | execution, cold build (s) | execution, after the code/ edit (s) |")
    print("|---|---:|---:|")
    for nb in nbs:
        c, d = cold.executed.get(nb), code_dir.executed.get(nb)
        print(f"| {nb} | {'-' if c is None else f'{c:.1f}'} | {'-' if d is None else f'{d:.1f}'} |")
    print(f"| **sum** | {exec_sum:.1f} | {sum(code_dir.executed.values()):.1f} |")

    overhead = cold.wall - exec_sum
    ratio = cold.wall / exec_sum if exec_sum else float("nan")
    print(
        f"\ncold build {cold.wall:.1f} s / notebooks' own execution {exec_sum:.1f} s = {ratio:.2f} "
        f"(overhead {overhead:.1f} s; target ≤ 1.3 × execution + 30 s)"
    )
    print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    print("all targets met" if ok else "TARGETS MISSED (see the tables above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
