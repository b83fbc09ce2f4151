"""Sphinx configuration. Sources are in book/, build with: sphinx-build -c . book _build/html"""

import hashlib
import importlib.util
import os
import shutil
from importlib.metadata import version as _version
from pathlib import Path

from sphinx.util.fileutil import copy_asset

ROOT = Path(__file__).resolve().parent

project = "Trace_ELBO, term by term"
author = "The elbo_terms authors"
copyright = "2026, the elbo_terms authors"
release = version = "0.1.0"

extensions = [
    "myst_nb",
    "sphinx_copybutton",
    "sphinx_togglebutton",
    "sphinxcontrib.bibtex",
    "elbo_terms.build.sphinx_ext",
    "elbo_terms.build.slides_kit",
    "elbo_terms.build.prerun",  # notebooks execute in parallel, ahead of the read
    "elbo_terms.build.buildlog",  # one line per notebook, a closing summary
    "elbo_terms.build.reading",  # chapter numbers continue across the parts; reading time per chapter
]
exclude_patterns = ["_build", "_static", "**.ipynb_checkpoints"]
nitpicky = True

# ---- MyST and math: numbered equations "(chapter.n)", referenced with {eq}
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist", "substitution"]
myst_heading_anchors = 3
numfig = True
math_numfig = True
math_numsep = "."
numfig_secnum_depth = 1


# ---- execution: cached, strict, and never stale.
# jupyter-cache hashes a notebook's cells only, not the modules it imports, so the cache
# folder is keyed by a hash of code/ and of the versions that compute the numbers: any
# change there re-executes every chapter. Older caches are pruned.
def _code_hash() -> str:
    h = hashlib.sha256()
    for p in sorted((ROOT / "code").rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts and ".egg-info" not in str(p):
            h.update(str(p.relative_to(ROOT)).encode())
            h.update(p.read_bytes())
    # the installed versions, read from their metadata (importing torch here would cost seconds per build)
    h.update(f"torch={_version('torch')} pyro={_version('pyro-ppl')} sympy={_version('sympy')}".encode())
    return h.hexdigest()[:16]


_cache_root = Path(os.environ.get("ELBO_TERMS_BUILD_DIR", ROOT / "_build")) / ".jupyter_cache"
nb_execution_cache_path = str(_cache_root / _code_hash())
if _cache_root.is_dir():
    for old in _cache_root.iterdir():
        if old.is_dir() and str(old) != nb_execution_cache_path:
            shutil.rmtree(old, ignore_errors=True)
nb_execution_mode = "cache"
nb_execution_timeout = 900
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True
nb_render_markdown_format = "myst"  # Markdown outputs (tables) rendered as MyST
# the ledger record each check glues is for the ledger, not for the page
nb_mime_priority_overrides = [("*", "application/json", None)]

# ---- citations: one bibliography, on the references page
bibtex_bibfiles = ["book/references.bib"]
bibtex_default_style = "unsrt"
bibtex_reference_style = "author_year"

# ---- HTML
html_theme = "sphinx_book_theme"
html_title = project
html_static_path = ["book/_static"]
html_css_files = ["book.css", ("print.css", {"media": "print"})]
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": True,
    "home_page_in_toc": True,
}
html_last_updated_fmt = None
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True

# ---- offline: MathJax 3 is served from the book's own _static/mathjax/, copied from the
# django-static-mathjax wheel (pinned in requirements.txt); no page loads anything from outside.
MATHJAX_ES5 = Path(importlib.util.find_spec("mathjax").origin).parent / "static" / "mathjax" / "es5"
# relative to _static/. TeX input only: the book has no MathML, and with lazy typesetting the MathML
# input would find the hidden MathML copies of not-yet-typeset formulas (for screen readers) and typeset them again
mathjax_path = "mathjax/tex-chtml.js"
mathjax3_config = {
    # textmacros: \_ and friends inside \text{}/\texttt{} (MathJax 3 shows them literally without it);
    # ui/lazy: math is typeset when it scrolls into view, so a page's first screen shows at once
    # (printing typesets the rest first)
    "loader": {"load": ["[tex]/textmacros", "ui/lazy"]},
    "tex": {"packages": {"[+]": ["textmacros"]}},
}
# the theme's colour mode when the reader has not chosen one (unset, its script logs a console error)
html_context = {"default_mode": "auto"}


def _copy_mathjax(app, exception):
    """Copy the bundle the pages load and the components it loads on demand (fonts, TeX extensions, menu).

    A stamp beside the copy names the wheel's version and what was copied; while it matches, the
    24 MB tree is not copied again (a file deleted from the copy is noticed: the stamp lists them).
    """

    def other_bundle(rel: str) -> bool:  # tex-svg.js, mml-chtml.js, ...: bundles the pages do not load
        return Path(rel).parent == Path(".") and rel.endswith(".js") and Path(rel).name != Path(mathjax_path).name

    if exception is not None or app.builder.format != "html":
        return
    dest = Path(app.outdir, "_static", "mathjax")
    files = sorted(
        p.relative_to(MATHJAX_ES5).as_posix()
        for p in MATHJAX_ES5.rglob("*")
        if p.is_file() and not other_bundle(p.relative_to(MATHJAX_ES5).as_posix())
    )
    key = f"django-static-mathjax {_version('django-static-mathjax')} from {MATHJAX_ES5}\n" + "\n".join(files) + "\n"
    stamp = dest / ".copied-from"
    if stamp.is_file() and stamp.read_text(encoding="utf8") == key and all((dest / f).is_file() for f in files):
        return
    copy_asset(MATHJAX_ES5, dest, excluded=other_bundle)
    stamp.write_text(key, encoding="utf8")


def setup(app):
    app.connect("build-finished", _copy_mathjax)
