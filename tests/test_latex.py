"""The slides kit, tested where slides are made: a real LaTeX toolchain on the built book.

* every "LaTeX of (n)" block compiles in an amsmath article and in a Beamer frame;
* every BibTeX block (each chapter's "Cite this chapter", the book's on the references page)
  compiles in a Beamer talk with bibtex + natbib (plainnat) and with biber + biblatex
  (authoryear), adds no warning to it, and gives the author as written, the title and the
  chapter number;
* every downloadable figure (the data-URI SVG and PNG links) is a well-formed SVG or PNG;
* the cheat sheet's Beamer frames (``cheatsheet-beamer.tex``) compile, one frame per equation;
* CITATION.cff is valid against the CFF schema and agrees with the book's BibTeX entry.

The compilations are batched (one document of many equations or frames); when a batch fails,
each equation is compiled alone to name the ones that fail. Without pdflatex, bibtex or biber
the LaTeX tests skip with a message on a workstation and fail in CI (``CI`` set).
"""

from __future__ import annotations

import ast
import base64
import datetime
import html
import os
import re
import shutil
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import pytest
from conftest import ROOT, sphinx_build

TEX_PACKAGES = "texlive-latex-base texlive-latex-recommended texlive-pictures biber texlive-bibtex-extra"
TEX_FILES = ("beamer.cls", "amsmath.sty", "amssymb.sty", "natbib.sty", "plainnat.bst", "biblatex.sty")


def _unavailable(message: str):
    """Skip on a workstation, fail in CI: a missing tool must not turn these tests green there."""
    if os.environ.get("CI"):
        pytest.fail(message + " (CI is set, so this is a failure)")
    pytest.skip(message)


@pytest.fixture(scope="module")
def tex():
    missing = [tool for tool in ("pdflatex", "bibtex", "biber", "kpsewhich") if shutil.which(tool) is None]
    if not missing:
        missing = [f for f in TEX_FILES if not _run(["kpsewhich", f], Path.cwd()).stdout.strip()]
    if missing:
        _unavailable(f"LaTeX toolchain incomplete, missing {', '.join(missing)}: apt-get install {TEX_PACKAGES}")
    return True


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, errors="replace", stdin=subprocess.DEVNULL, timeout=timeout
    )


def _pdflatex(cwd: Path, name: str) -> tuple[bool, str]:
    """Run pdflatex on ``name``.tex; (no error, the log)."""
    proc = _run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "-file-line-error", name], cwd)
    log_file = cwd / f"{name}.log"
    log = log_file.read_text(errors="replace") if log_file.exists() else proc.stdout
    return proc.returncode == 0 and (cwd / f"{name}.pdf").exists(), log


def _errors(log: str) -> str:
    """The error lines of a LaTeX log, with a little context."""
    lines = log.splitlines()
    hits = [i for i, ln in enumerate(lines) if ln.startswith("!") or re.match(r"^\S+\.tex:\d+:", ln)]
    return "\n".join("\n".join(lines[i : i + 4]) for i in hits[:5]) or log[-1500:]


# ---- what the built HTML offers


def _pages(html_dir: Path) -> dict[str, str]:
    skip = {"genindex", "search", "py-modindex"}
    return {p.stem: p.read_text(encoding="utf8") for p in sorted(html_dir.glob("*.html")) if p.stem not in skip}


def _text(fragment: str) -> str:
    """The text of an HTML fragment, as the copy button copies it."""
    return html.unescape(re.sub(r"<[^>]+>", "", fragment))


LATEX_BLOCK = re.compile(
    r'<details class="eq-latex"><summary>LaTeX of (?P<shown>.*?) &middot;.*?</summary>.*?<pre>(?P<pre>.*?)</pre>', re.S
)
BIBTEX_BLOCK = re.compile(r'<div class="highlight-bibtex[^"]*"><div class="highlight"><pre>(?P<pre>.*?)</pre>', re.S)
FIGURE_LINK = re.compile(r'<a download="(?P<name>[^"]+)" href="data:(?P<mime>[^;"]+);base64,(?P<data>[^"]*)"')
H1 = re.compile(r"<h1>(?P<h1>.*?)</h1>", re.S)


def latex_blocks(html_dir: Path) -> list[tuple[str, str]]:
    """(where, LaTeX) of every "LaTeX of (n)" block, where = "page (n)"."""
    return [
        (f"{page} {_text(m['shown'])}", _text(m["pre"]).strip())
        for page, text in _pages(html_dir).items()
        for m in LATEX_BLOCK.finditer(text)
    ]


def bibtex_blocks(html_dir: Path) -> list[tuple[str, str]]:
    """(page, BibTeX) of every BibTeX block."""
    pages = _pages(html_dir).items()
    return [(page, _text(m["pre"]).strip()) for page, text in pages for m in BIBTEX_BLOCK.finditer(text)]


def heading(page_html: str) -> tuple[str | None, str]:
    """(section number or None, title) of a page's first heading."""
    h1 = next((m["h1"] for m in H1.finditer(page_html) if 'class="headerlink"' in m["h1"]), "")  # not the theme's
    h1 = re.sub(r'<a class="headerlink".*?</a>', "", h1, flags=re.S)
    number = re.search(r'<span class="section-number">(.*?)</span>', h1)
    title = _text(re.sub(r'<span class="section-number">.*?</span>', "", h1)).strip()
    title = re.sub(r"\\\((.*?)\\\)", r"\1", title)  # inline math, as its source
    return (number[1].strip().rstrip(".") if number else None), title


def conf() -> dict[str, str]:
    """The constant settings of conf.py (project, author, release, copyright), read without running it."""
    values = {}
    for node in ast.parse((ROOT / "conf.py").read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            values.update({t.id: node.value.value for t in node.targets if isinstance(t, ast.Name)})
    return values


# ---- equations


DISPLAY_ENVIRONMENTS = re.compile(r"^\\begin\{(equation|align|alignat|gather|multline|flalign)\*?\}")


def _display(latex: str) -> str:
    """The block as a reader pastes it: inside ``\\[ ... \\]`` unless it is a display environment itself."""
    return latex if DISPLAY_ENVIRONMENTS.match(latex) else "\\[\n" + latex + "\n\\]"


def _article(blocks: list[tuple[str, str]]) -> str:
    body = "\n".join(f"% {where}\n{_display(latex)}\n" for where, latex in blocks)
    return "\\documentclass{article}\n\\usepackage{amsmath,amssymb}\n\\begin{document}\n" + body + "\\end{document}\n"


def _beamer(blocks: list[tuple[str, str]]) -> str:
    frames = "\n".join(
        f"\\begin{{frame}}\n\\frametitle{{Equation {k}}}\n{_display(latex)}\n\\end{{frame}}\n"
        for k, (_, latex) in enumerate(blocks)
    )
    return "\\documentclass{beamer}\n\\usepackage{amsmath,amssymb}\n\\begin{document}\n" + frames + "\\end{document}\n"


def _compile_all(blocks, make, tmp_path: Path, what: str):
    """Compile every block in one document; if that fails, compile each alone and name the failures."""
    assert blocks, f"no LaTeX blocks found for {what}"
    (tmp_path / "all.tex").write_text(make(blocks), encoding="utf8")
    ok, log = _pdflatex(tmp_path, "all")
    if ok:
        return
    failures = []
    for k, block in enumerate(blocks):
        name = f"one{k}"
        (tmp_path / f"{name}.tex").write_text(make([block]), encoding="utf8")
        one_ok, one_log = _pdflatex(tmp_path, name)
        if not one_ok:
            failures.append(f"{block[0]}:\n{block[1]}\n{_errors(one_log)}")
    together = "(each block compiles alone; the document of all of them does not)\n" + _errors(log)
    detail = "\n\n".join(failures) or together
    pytest.fail(f"{len(failures)} of {len(blocks)} LaTeX blocks do not compile in {what}:\n\n{detail}")


@pytest.mark.book
def test_every_latex_block_compiles_in_an_amsmath_article(built_book, tex, tmp_path):
    _compile_all(latex_blocks(built_book.html), _article, tmp_path, "an amsmath article")


@pytest.mark.book
def test_every_latex_block_compiles_in_a_beamer_frame(built_book, tex, tmp_path):
    _compile_all(latex_blocks(built_book.html), _beamer, tmp_path, "a Beamer frame")


# ---- BibTeX: both toolchains, in a fresh Beamer talk


def _key(entry: str) -> str:
    return re.match(r"@\w+\{([^,]+),", entry)[1]


def _fields(entry: str) -> dict[str, str]:
    """name -> value (outer braces removed) of a BibTeX entry as the book writes it (one field a line)."""
    return {m[1]: m[2] for m in re.finditer(r"^\s*(\w+)\s*=\s*\{(.*)\},?\s*$", entry, re.M)}


def _detex(text: str) -> str:
    """LaTeX text as read: escapes undone, braces and ties removed, spaces normalised."""
    text = re.sub(r"\\ensuremath\{(.*?)\}", r"\1", text)  # inline math of a title, as its source
    text = re.sub(r"\\([_&%$#{}])", r"\1", text)
    text = text.replace("~", " ").replace("{", "").replace("}", "")
    return re.sub(r"\s+", " ", text).strip()


def _talk(keys: list[str], natbib: bool) -> str:
    cites = "\n".join(f"\\cite{{{k}}}\\par" if natbib else f"\\textcite{{{k}}}\\par" for k in keys)
    if natbib:
        preamble, bibliography = "\\usepackage{natbib}\n", "\\bibliographystyle{plainnat}\n\\bibliography{refs}\n"
    else:
        preamble = "\\usepackage[style=authoryear,backend=biber]{biblatex}\n\\addbibresource{refs.bib}\n"
        bibliography = "\\printbibliography\n"
    frames = f"\\begin{{frame}}{{Citing}}\n{cites}\\end{{frame}}\n"
    frames += f"\\begin{{frame}}[allowframebreaks]{{References}}\n{bibliography}\\end{{frame}}\n"
    return f"\\documentclass{{beamer}}\n{preamble}\\begin{{document}}\n{frames}\\end{{document}}\n"


def _log_warnings(log: str) -> set[str]:
    """The warnings of a LaTeX log, without line numbers (to compare two runs)."""
    lines = log.splitlines()
    found = set()
    for i, ln in enumerate(lines):
        if re.search(r"Warning|^Overfull|^Underfull", ln) and "infwarerr" not in ln:
            text = " ".join([ln] + [x.strip() for x in lines[i + 1 : i + 3] if x.startswith("(")])
            found.add(re.sub(r"on input line \d+|lines? \d+(--\d+)?", "", text).strip())
    return found


def _toolchain(folder: Path, entries: list[str], natbib: bool) -> tuple[str, str, set[str]]:
    """Compile a Beamer talk citing ``entries``: (the .bbl, the bibtex/biber log, LaTeX warnings of the last run)."""
    folder.mkdir()
    (folder / "refs.bib").write_text("\n\n".join(entries) + "\n", encoding="utf8")
    (folder / "talk.tex").write_text(_talk([_key(e) for e in entries], natbib), encoding="utf8")
    steps = [["pdflatex"], ["bibtex"] if natbib else ["biber"], ["pdflatex"], ["pdflatex"]]
    log = ""
    for step in steps:
        if step == ["pdflatex"]:
            ok, log = _pdflatex(folder, "talk")
            assert ok, f"pdflatex failed ({'natbib' if natbib else 'biblatex'}):\n{_errors(log)}"
        else:
            proc = _run([*step, "talk"], folder)
            assert proc.returncode == 0, f"{step[0]} failed:\n{proc.stdout}\n{proc.stderr}"
    for _ in range(3):  # as latexmk does: run again while LaTeX asks for it (labels settle as entries are added)
        if "Please rerun LaTeX" not in log and "Rerun to get" not in log:
            break
        ok, log = _pdflatex(folder, "talk")
        assert ok, f"pdflatex failed ({'natbib' if natbib else 'biblatex'}):\n{_errors(log)}"
    return (folder / "talk.bbl").read_text(), (folder / "talk.blg").read_text(), _log_warnings(log)


def _control(entry: str) -> str:
    """A plain entry with the same key: what any bibliography adds to the talk's log."""
    fields = "author = {Doe, Jane},\n  title = {Control},\n  publisher = {P},\n  year = {2020}"
    return f"@book{{{_key(entry)},\n  {fields}\n}}"


def _expected(built_book) -> dict[str, dict]:
    """key -> what the entry must give: author, title, booktitle, chapter (None for the book)."""
    settings = conf()
    pages = _pages(built_book.html)
    expected = {}
    for page, entry in bibtex_blocks(built_book.html):
        number, title = heading(pages[page])
        book = entry.startswith("@book")
        expected[_key(entry)] = {
            "page": page,
            "entry": entry,
            "author": settings["author"],
            "title": settings["project"] if book else title,
            "booktitle": None if book else settings["project"],
            "chapter": None if book else number,
        }
    return expected


@pytest.mark.book
def test_the_bibtex_blocks_are_the_chapters_and_the_book(built_book):
    expected = _expected(built_book)
    pages = {e["page"] for e in expected.values()}
    chapters = {p for p, text in _pages(built_book.html).items() if heading(text)[0] is not None}
    assert chapters and chapters <= pages, f"chapters without a BibTeX block: {sorted(chapters - pages)}"
    books = [e for e in expected.values() if e["entry"].startswith("@book")]
    assert [b["page"] for b in books] == ["references"], "the whole book's entry is on the references page, once"
    # the chapters' blocks are folded: the citation does not lengthen the page
    for page in chapters:
        text = _pages(built_book.html)[page]
        assert re.search(r'<details class="cite-this-chapter"><summary>Cite this chapter</summary>', text), page


@pytest.mark.book
@pytest.mark.parametrize("toolchain", ["bibtex+natbib", "biber+biblatex"])
def test_every_bibtex_block_compiles_without_a_warning(built_book, tex, tmp_path, toolchain):
    natbib = toolchain == "bibtex+natbib"
    expected = _expected(built_book)
    entries = [e["entry"] for e in expected.values()]
    bbl, blg, warnings = _toolchain(tmp_path / "book", entries, natbib)
    _, _, control = _toolchain(tmp_path / "control", [_control(e) for e in entries], natbib)
    if natbib:
        assert "Warning--" not in blg, blg
    else:
        assert not re.search(r"\b(WARN|ERROR)\b", blg), blg
    assert warnings <= control, f"{toolchain}: the entries add LaTeX warnings to the talk: {sorted(warnings - control)}"
    for key, want in expected.items():
        got = _bbl_natbib(bbl, key) if natbib else _bbl_biblatex(bbl, key)
        for field in ("author", "title", "booktitle", "chapter"):
            assert got.get(field) == want[field], f"{toolchain}, {key} ({want['page']}): {field} is {got.get(field)!r}"


def _bbl_natbib(bbl: str, key: str) -> dict[str, str | None]:
    """author (the citation label's name), title, booktitle, chapter of ``key`` in a plainnat .bbl."""
    items = re.split(r"\\bibitem", re.sub(r"\s+", " ", bbl))
    item = next(i for i in items if re.match(r"\[.*?\]\{" + re.escape(key) + r"\}", i))
    label = re.match(r"\[\{(.*?)\}\(\d{4}", item)
    blocks = [b.strip() for b in item.split("\\newblock")]
    inbook = next((b for b in blocks if b.startswith("In ")), None)
    got = {"author": _detex(label[1]) if label else None, "booktitle": None, "chapter": None}
    if inbook:  # In \emph{booktitle}, chapter~n. Publisher, year.
        got["booktitle"] = _detex(re.match(r"In \\emph\{(.*?)\}, chapter", inbook)[1])
        got["chapter"] = re.search(r"chapter~([\d.]+)\.", inbook)[1]
        got["title"] = _detex(blocks[1].rstrip("."))
    else:  # \emph{title}.
        got["title"] = _detex(re.sub(r"^\\emph", "", blocks[1]).rstrip("."))
    return got


def _bbl_biblatex(bbl: str, key: str) -> dict[str, str | None]:
    """author (one family name, no given name), title, booktitle, chapter of ``key`` in a biblatex .bbl."""
    entry = re.search(r"\\entry\{" + re.escape(key) + r"\}.*?\\endentry", bbl, re.S)[0]

    def field(name):
        m = re.search(r"\\field\{" + name + r"\}\{(.*)\}\s*$", entry, re.M)
        return _detex(m[1]) if m else None

    names = re.search(r"\\name\{author\}\{(\d+)\}.*?family=\{(.*?)\},\n", entry, re.S)
    one_name = names and names[1] == "1" and "given=" not in entry
    return {
        "author": _detex(names[2]) if one_name else None,
        "title": field("title"),
        "booktitle": field("booktitle"),
        "chapter": field("chapter"),
    }


# ---- figures


def _png_ok(data: bytes) -> str | None:
    """Why ``data`` is not a PNG (signature, IHDR first with a valid CRC, IEND last), or None."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return "no PNG signature"
    pos, chunks = 8, []
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body, crc = data[pos + 8 : pos + 8 + length], data[pos + 8 + length : pos + 12 + length]
        if len(crc) != 4 or zlib.crc32(kind + body) != struct.unpack(">I", crc)[0]:
            return f"bad CRC in chunk {kind!r}"
        chunks.append((kind, body))
        pos += 12 + length
    if not chunks or chunks[0][0] != b"IHDR" or chunks[-1][0] != b"IEND":
        return "IHDR is not first or IEND is not last"
    width, height = struct.unpack(">II", chunks[0][1][:8])
    if not (width and height):
        return "zero size"
    try:
        from PIL import Image
    except ImportError:
        return None
    import io

    Image.open(io.BytesIO(data)).load()
    return None


def _svg_ok(data: bytes) -> str | None:
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        return f"not well-formed XML: {exc}"
    if root.tag != "{http://www.w3.org/2000/svg}svg":
        return f"root element is {root.tag}"
    if not (root.get("viewBox") or (root.get("width") and root.get("height"))):
        return "no size (viewBox or width and height)"
    return None


@pytest.mark.book
def test_every_downloadable_figure_is_a_valid_svg_or_png(built_book):
    checked, problems = 0, []
    for page, text in _pages(built_book.html).items():
        for m in FIGURE_LINK.finditer(text):
            name, mime = html.unescape(m["name"]), m["mime"]
            data = base64.b64decode(m["data"], validate=True)
            kind = {"image/svg+xml": "svg", "image/png": "png"}.get(mime)
            if kind is None or not name.endswith("." + kind):
                problems.append(f"{page}: {name} is offered as {mime}")
                continue
            why = _svg_ok(data) if kind == "svg" else _png_ok(data)
            if why:
                problems.append(f"{page}: {name}: {why}")
            checked += 1
    assert checked >= 2, "no downloadable figures found"
    assert not problems, "\n".join(problems)


# ---- the cheat sheet's Beamer frames


def _frames_ok(tex_file: Path, tmp_path: Path, numbers: list[str]):
    source = tex_file.read_text(encoding="utf8")
    titles = re.findall(r"\\frametitle\{Equation \((.*?)\)\}", source)
    assert titles == numbers, f"{tex_file.name}: frames {titles}, the page's equations {numbers}"
    (tmp_path / "frames.tex").write_text(source, encoding="utf8")
    ok, log = _pdflatex(tmp_path, "frames")
    if not ok:  # name the frame that fails
        frames = re.findall(r"(% \((.*?)\) .*?\n\\begin\{frame\}.*?\\end\{frame\}\n)", source, re.S)
        blocks = [(f"({n})", re.search(r"\\\[\n(.*)\n\s*\\\]", f, re.S)[1]) for f, n in frames]
        _compile_all(blocks, _beamer, tmp_path, tex_file.name)
        pytest.fail(f"{tex_file.name} does not compile:\n{_errors(log)}")


def _equation_links(page_html: str) -> list[str]:
    """Numbers of the {eq} references of a page, in order, once each."""
    seen = []
    for m in re.finditer(r'<a class="reference internal" href="[^"]*#equation-[^"]*">(.*?)</a>', page_html, re.S):
        number = _text(m[1]).strip().strip("()")
        if number not in seen:
            seen.append(number)
    return seen


@pytest.mark.book
def test_the_cheat_sheets_beamer_frames_compile(built_book, tex, tmp_path):
    page = (built_book.html / "cheatsheet.html").read_text(encoding="utf8")
    assert 'href="cheatsheet-beamer.tex"' in page, (
        "cheatsheet.html does not link its Beamer frames: book/cheatsheet.md needs the line ```{beamer-download}```"
    )
    _frames_ok(built_book.html / "cheatsheet-beamer.tex", tmp_path, _equation_links(page))


BEAMER_BOOK = {
    "index.md": "# Throwaway\n\n```{toctree}\n:numbered:\n\nchapter\n```\n\n```{toctree}\nsheet\n```\n",
    "chapter.md": "# Inside Trace_ELBO: the $\\beta$ & KL\n\n"
    "$$\n\\mathcal L = \\mathbb E_q[\\log p(x \\mid z)] - \\mathrm{KL}(q \\,\\Vert\\, p)\n$$ (tb-split)\n\n"
    "$$\n\\begin{aligned} a &= b \\\\ &= c \\end{aligned}\n$$ (tb-aligned)\n\n"
    "$$\nx = " + " + ".join(f"\\frac{{a_{k}}}{{b_{k}}}" for k in range(40)) + "\n$$ (tb-wide)\n",
    "sheet.md": "# Sheet\n\n```{beamer-download}\n```\n\n| what | where |\n|---|---|\n"
    "| wide | {eq}`tb-wide` |\n| split | {eq}`tb-split`, again {eq}`tb-wide` |\n\n"
    "$$\ny = 1\n$$ (tb-sheet-own)\n",
}


def test_the_beamer_download_directive_in_a_throwaway_book(tex, tmp_path):
    """{beamer-download}: one frame per equation the page references or displays, in page order, once each."""
    shutil.copy(ROOT / "conf.py", tmp_path / "conf.py")
    shutil.copytree(ROOT / "code", tmp_path / "code", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    book = tmp_path / "book"
    shutil.copytree(ROOT / "book" / "_static", book / "_static")
    shutil.copy(ROOT / "book" / "references.bib", book / "references.bib")
    for name, text in BEAMER_BOOK.items():
        (book / name).write_text(text)
    build = sphinx_build(book, tmp_path / "_build", confdir=tmp_path, env={"PYTHONPATH": str(tmp_path / "code")})
    assert build.returncode == 0, build.log[-3000:]
    page = (build.html / "sheet.html").read_text()
    assert 'href="sheet-beamer.tex"' in page and "3 frames" in page
    _frames_ok(build.html / "sheet-beamer.tex", tmp_path, ["1.3", "1.1", "1"])
    assert r"Inside Trace\_ELBO: the \ensuremath{\beta} \& KL" in (build.html / "sheet-beamer.tex").read_text()


# ---- CITATION.cff


def _validate_cff(path: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.citation-file-format", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)


def test_citation_cff_is_valid_against_the_cff_schema(tmp_path):
    try:
        import check_jsonschema  # noqa: F401
    except ImportError:
        _unavailable("check-jsonschema is not installed (it is in noxfile.py's TEST_REQUIREMENTS)")
    proc = _validate_cff(ROOT / "CITATION.cff")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the validator can fail: a title that is not a string is refused
    broken = tmp_path / "CITATION.cff"
    broken.write_text(re.sub(r"(?m)^title: .*$", "title: 5", (ROOT / "CITATION.cff").read_text()))
    proc = _validate_cff(broken)
    assert proc.returncode != 0 and "title" in proc.stdout, proc.stdout


@pytest.mark.book
def test_citation_cff_agrees_with_the_books_bibtex(built_book):
    import yaml

    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    books = [entry for page, entry in bibtex_blocks(built_book.html) if entry.startswith("@book")]
    assert len(books) == 1
    bib = _fields(books[0])
    settings = conf()
    released = cff["date-released"]
    assert isinstance(released, datetime.date)
    for where in (cff, cff["preferred-citation"]):
        assert where["title"] == _detex(bib["title"]) == settings["project"]
        assert [a["name"] for a in where["authors"]] == [_detex(bib["author"])] == [settings["author"]]
        assert str(where["version"]) == bib["version"] == settings["release"]
    assert str(released.year) == bib["year"] == str(cff["preferred-citation"]["year"])
