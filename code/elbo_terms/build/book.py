"""What the chapters call while they execute: verify an identity, glue a number.

``verify(id)`` runs an identity's SymPy proof and its numeric check, shows the result
under the equation it backs, stores it for the ledger (as a myst-nb glue entry named
``ledger-<id>``) and raises :class:`~elbo_terms.identity.IdentityFailed` -- which fails the
build -- when the identity does not hold.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass

from .identity import IDENTITIES, Identity, IdentityFailed, Numeric, proves_zero

__all__ = [
    "verify",
    "Result",
    "number",
    "math_lines",
    "show_source",
    "figure",
    "figure_downloads",
    "LEDGER_PREFIX",
]

LEDGER_PREFIX = "ledger-"


def _fmt(x: float) -> str:
    return f"{x:.6g}" if math.isfinite(x) else str(x)


@dataclass(frozen=True)
class Result:
    identity: Identity
    symbolic: bool | None
    numeric: Numeric | None

    @property
    def passed(self) -> bool:
        return self.symbolic is not False and (self.numeric is None or self.numeric.passed)

    def as_dict(self) -> dict:
        i = self.identity
        return {
            "id": i.id,
            "kind": i.kind,
            "chapter": i.chapter,
            "label": i.label,
            "statement": i.statement,
            "symbolic": self.symbolic,
            "numeric": None if self.numeric is None else self.numeric.as_dict(),
            "passed": self.passed,
            "code": i.code,
            "tests": list(i.tests),
        }

    def message(self) -> str:
        i, n = self.identity, self.numeric
        parts = [f"{i.kind} '{i.id}' (chapter '{i.chapter}', equation {i.label or '-'})"]
        if self.symbolic is not None:
            parts.append("SymPy: " + ("proved" if self.symbolic else "NOT proved (lhs - rhs does not simplify to 0)"))
        if n is not None and n.relation != "=":
            rel = ">" if n.passed else "<="
            parts.append(
                f"{n.kind}: lhs={_fmt(n.lhs)} {n.relation} rhs={_fmt(n.rhs)}; "
                f"gap={_fmt(n.gap)} {rel} margin={n.tolerance:.3g} (k={n.detail.get('k')} standard errors)"
            )
        elif n is not None:
            rel = "<=" if n.passed else ">"
            parts.append(
                f"{n.kind}: lhs={_fmt(n.lhs)} rhs={_fmt(n.rhs)} "
                f"|error|={n.abs_error:.3g} {rel} tolerance={n.tolerance:.3g}"
            )
            if n.detail.get("missing"):
                parts.append(f"missing: {n.detail['missing']}")
        parts.append("PASSED" if self.passed else "FAILED")
        return "; ".join(parts)

    # Jupyter display: a one-line badge under the equation.
    def _repr_html_(self):
        """A one-line badge: the verdict, how it was checked, and links to the ledger row."""
        i, n = self.identity, self.numeric
        mark = "&#10004;" if self.passed else "&#10008;"
        ident = html.escape(i.id)
        bits = [f'<strong>{mark} <a href="ledger.html#identity-{ident}"><code>{ident}</code></a></strong>']
        if self.symbolic is not None:
            bits.append("SymPy " + ("proved" if self.symbolic else "not proved"))
        if n is not None and n.relation != "=":
            rel = html.escape(n.relation)
            bits.append(f"claim {rel}: gap {n.gap:.3g} &gt; {n.detail.get('k'):g} s.e. = {n.tolerance:.2g}")
        elif n is not None:
            what = "same draw" if n.kind == "exact" else f"Monte Carlo (n = {n.detail.get('n')})"
            bits.append(f"{what}: |&Delta;| = {n.abs_error:.1e} &le; {n.tolerance:.1e}")
        short = i.code.removeprefix("elbo_terms.")
        bits.append(f'<span class="identity-code">check <code>{html.escape(short)}</code></span>')
        cls = "identity-check passed" if self.passed else "identity-check failed"
        return f'<div class="{cls}">' + " &middot; ".join(bits) + "</div>"

    def __repr__(self):
        return self.message()


class _JsonText:
    """Displays as its JSON text (glue stores the text/plain form of what it is given)."""

    def __init__(self, data):
        self.data = data

    def __repr__(self):
        return json.dumps(self.data, sort_keys=True)


def verify(identity: str | Identity, variant: str | None = None) -> Result:
    """Run an identity's checks; show, record and return the result; raise if it fails."""
    from myst_nb import glue

    if isinstance(identity, str):
        if identity not in IDENTITIES:
            raise KeyError(f"no identity with id {identity!r}; known: {sorted(IDENTITIES)}")
        identity = IDENTITIES[identity]
    sym = None if identity.symbolic is None else proves_zero(identity.symbolic(variant))
    num = None if identity.numeric is None else identity.numeric(variant)
    result = Result(identity, sym, num)
    if not result.passed:
        raise IdentityFailed(result.message())
    from IPython.display import HTML, display

    glue(LEDGER_PREFIX + identity.id, _JsonText(result.as_dict()), display=False)  # for the ledger
    display(HTML(result._repr_html_()))  # the badge under the equation
    return result


def number(name: str, value) -> None:
    """Glue ``value`` as a Python float under ``name`` (for ``{glue:text}`` in the prose).

    Returns nothing, so a cell that ends with it prints nothing.
    """
    from myst_nb import glue

    glue(name, float(value), display=False)


def math_lines(lhs: str, expr, per_line: int = 2):
    """Display ``lhs = expr`` with the terms of the SymPy sum ``expr`` spread over lines.

    Long SymPy results do not fit the page on one line; this breaks them after every
    ``per_line`` terms, in an ``aligned`` block.
    """
    import sympy as sp
    from IPython.display import Math

    terms = sp.Add.make_args(sp.sympify(expr))
    chunks = [terms[i : i + per_line] for i in range(0, len(terms), per_line)]
    lines = []
    for k, chunk in enumerate(chunks):
        body = sp.latex(sp.Add(*chunk, evaluate=False))
        if k > 0 and not body.startswith("-"):
            body = "+ " + body
        lines.append(("&= " if k == 0 else "&\\quad ") + body)
    return Math(lhs + r" \begin{aligned}[t] " + r" \\ ".join(lines) + r" \end{aligned}")


def show_source(obj):
    """Display the source of a function or class of the installed code, as a code block."""
    import inspect
    import textwrap

    from IPython.display import Markdown

    return Markdown("```python\n" + textwrap.dedent(inspect.getsource(obj)).rstrip() + "\n```")


def figure(fig, name: str, downloads: bool = True):
    """Show a matplotlib figure, with links to download it as SVG and as PNG (for slides).

    The files are embedded in the page as data URIs, so they work offline and are never
    stale. ``name`` is the downloaded file's stem.

    A cell that carries myst-nb ``figure`` metadata (numbered caption, alt text, label) must
    show exactly one output, because myst-nb wraps every output of that cell in the figure:
    call it with ``downloads=False`` and show the links from the next cell with
    :func:`figure_downloads`.
    """
    global _LAST_FIGURE
    import matplotlib.pyplot as plt
    from IPython.display import display

    _LAST_FIGURE = (fig, name)
    display(fig)
    plt.close(fig)  # a closed figure still saves: figure_downloads can follow in another cell
    if downloads:
        figure_downloads(fig, name)


_LAST_FIGURE = None


def figure_downloads(fig=None, name: str | None = None):
    """Show links to download ``fig`` (by default the last one shown by :func:`figure`) as SVG and PNG."""
    import base64
    import io

    from IPython.display import HTML, display

    if fig is None:
        if _LAST_FIGURE is None:
            raise RuntimeError("figure_downloads(): no figure has been shown yet")
        fig, last_name = _LAST_FIGURE
        name = name or last_name
    if name is None:
        raise ValueError("figure_downloads(): name the downloaded file")
    links = []
    for fmt, mime in (("svg", "image/svg+xml"), ("png", "image/png")):
        buf = io.BytesIO()
        # a fixed date and no creator keep the SVG and PNG bytes identical between builds
        meta = {"Date": None, "Creator": None} if fmt == "svg" else {"Software": None}
        fig.savefig(buf, format=fmt, dpi=200, bbox_inches="tight", metadata=meta)
        data = base64.b64encode(buf.getvalue()).decode()
        links.append(f'<a download="{name}.{fmt}" href="data:{mime};base64,{data}">{fmt.upper()}</a>')
    display(HTML('<p class="figure-downloads">Download this figure: ' + " &middot; ".join(links) + "</p>"))


def __getattr__(name):
    """``float64`` and ``seeded`` (from elbo_terms._util, which imports torch), re-exported for the chapters."""
    if name in ("float64", "seeded"):
        from .. import _util

        return getattr(_util, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
