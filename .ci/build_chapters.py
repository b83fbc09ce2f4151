"""Build a few chapters alone, for quick checks while writing them.

    python .ci/build_chapters.py elbo gradients [--out /tmp/book-partial]

Makes a temporary source folder with the chosen chapters, every page that is not a
chapter (index, ledger, notation, ...), and a stub of every other chapter (its title, its labelled equations
and its section labels, so that {eq} and {ref} references to it resolve), then runs the strict build on it with its own
execution cache. Exits with sphinx-build's status.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"
TOCTREE = re.compile(r"^```\{toctree\}\n.*?^```\n", re.S | re.M)
TARGET = re.compile(r"^\(([a-z0-9-]+)\)=$", re.M)
EQUATION = re.compile(r"^\$\$\n(?:(?!^\$\$).)*?^\$\$ \([a-z0-9-]+\)\n", re.S | re.M)


def toctrees(text: str | None = None) -> list[dict]:
    """The landing page's toctrees, in order: ``{"caption": str, "numbered": bool, "docs": [...]}``."""
    text = (BOOK / "index.md").read_text() if text is None else text
    out = []
    for block in TOCTREE.findall(text):
        lines = [ln.strip() for ln in block.splitlines()[1:-1] if ln.strip()]
        options = dict((ln[1:].split(":", 1) + [""])[:2] for ln in lines if ln.startswith(":"))
        docs = [ln for ln in lines if not ln.startswith(":")]
        out.append({"caption": options.get("caption", "").strip(), "numbered": "numbered" in options, "docs": docs})
    return out


def chapters() -> list[str]:
    """Every numbered chapter (Parts I and II), in reading order."""
    return [doc for tree in toctrees() if tree["numbered"] for doc in tree["docs"]]


def stub(doc: str) -> str:
    text = (BOOK / f"{doc}.md").read_text()
    title = next(ln for ln in text.splitlines() if ln.startswith("# "))
    eqs = EQUATION.findall(text)
    # section labels other pages link to ({ref}), each over a placeholder heading
    targets = [f"({label})=\n## {label}\n" for label in TARGET.findall(text)]
    return title + "\n\n(stub for a partial build)\n\n" + "\n".join(eqs + targets)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("docs", nargs="+")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    out = Path(a.out or tempfile.gettempdir() + "/book-" + "-".join(a.docs))
    src = out / "src"
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(out / "html", ignore_errors=True)
    shutil.rmtree(out / "doctrees", ignore_errors=True)
    src.mkdir(parents=True)
    shutil.copytree(BOOK / "_static", src / "_static")
    # pages that cite every chapter (the answer page, the cheat sheet) are reduced to their
    # title and table of contents unless asked for
    # as are the other executed pages (the questions pages) unless asked for
    notebooks = {page.stem for page in BOOK.glob("*.md") if "\nkernelspec:" in page.read_text()}
    stubbed = (set(chapters()) | notebooks | {"index", "cheatsheet"}) - set(a.docs)
    for page in BOOK.iterdir():
        if page.is_file() and page.stem in stubbed and page.suffix == ".md":
            page_out = src / page.name
            page_out.write_text(stub(page.stem) + "\n" + "\n".join(TOCTREE.findall(page.read_text())))
        elif page.is_file():
            shutil.copy(page, src / page.name)
    env = dict(os.environ, ELBO_TERMS_BUILD_DIR=str(out))
    cmd = [
        sys.executable,
        "-m",
        "sphinx",
        "-n",
        "-W",
        "--keep-going",
        "-E",
        "-c",
        str(ROOT),
        str(src),
        str(out / "html"),
        "-d",
        str(out / "doctrees"),
    ]
    print(" ".join(cmd), flush=True)
    rc = subprocess.call(cmd, env=env)
    print(f"built into {out / 'html'}; exit {rc}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
