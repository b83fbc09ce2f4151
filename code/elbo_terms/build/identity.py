"""Identities: a statement, its SymPy proof, its numeric check against Pyro.

An :class:`Identity` couples

* an ``id`` (stable, kebab-case) and the ``chapter`` (Sphinx docname) that states it,
* the ``label`` of the displayed equation it backs and its LaTeX ``statement``,
* ``symbolic(variant)``: a SymPy expression equal to ``lhs - rhs``; the statement is
  proved when it simplifies to 0,
* ``numeric(variant)``: a :class:`Numeric` comparison of two numbers computed by
  running Pyro/torch in float64,
* ``wrong``: names of wrong variants of the statement (a flipped sign, a missing term,
  a factor of 2, ...). Passing one of them as ``variant`` must make the *same* checks
  fail; ``tests/test_identities.py`` shows that it does, for every identity.

Every record has a ``kind``:

* ``"identity"`` -- an equation the book displays (``lhs = rhs``);
* ``"claim"`` -- a comparison the prose makes ("B has less variance", "about 15 times"):
  an inequality or an interval, judged with a margin of ``k`` standard errors;
* ``"source"`` -- a regression check that quoted lines of Pyro's source are still there
  (it protects the book; it is not an identity and is counted apart).

Four kinds of numeric comparison:

* :func:`exact` -- same-draw identities: ``|lhs - rhs| <= rtol * max(|lhs|, |rhs|) + atol``
  with ``rtol = 1e-9`` by default (float64).
* :func:`monte_carlo` -- an average of ``n`` independent draws against an exact value:
  ``|mean - exact| <= k * stderr`` with ``k = 5`` by default, and the check refuses to
  run when the bound is too wide to mean anything (``k * stderr > max_rel_width * |exact|``).
* :func:`inequality` -- a claim ``lhs < rhs`` (or ``>``, ``<=``, ``>=``): the signed gap
  (positive when the claim holds) must exceed ``k`` combined standard errors of the two
  sides (0 when both are exact, so an exact strict inequality needs a positive gap).
* :func:`interval` -- a claim ``lo < value < hi`` ("about 15 times" stated as 14 to 16): the
  value must sit more than ``k`` standard errors inside the interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = [
    "KINDS",
    "NUMERIC_FIELDS",
    "inequality",
    "interval",
    "Identity",
    "Numeric",
    "IdentityFailed",
    "exact",
    "monte_carlo",
    "proves_zero",
    "register",
    "IDENTITIES",
]

RTOL = 1e-9
ATOL = 1e-12
K_STDERR = 5.0


KINDS = ("identity", "claim", "source")
RELATIONS = ("=", "<", ">", "<=", ">=", "in")


class IdentityFailed(AssertionError):
    """Raised when an identity stated in the book does not hold."""


@dataclass(frozen=True)
class Numeric:
    """A comparison of two numbers and the tolerance it is judged by."""

    lhs: float
    rhs: float
    abs_error: float
    tolerance: float
    kind: str  # "exact", "monte-carlo", "inequality" or "interval"
    detail: dict = field(default_factory=dict)
    relation: str = "="  # "=", "<", ">", "<=", ">=" or "in" (an interval)

    @property
    def gap(self) -> float | None:
        """For a claim: how far it holds (positive) or fails (negative), before the margin."""
        return self.detail.get("gap")

    @property
    def passed(self) -> bool:
        if self.relation == "=":
            return math.isfinite(self.abs_error) and self.abs_error <= self.tolerance
        gap = self.gap
        if gap is None or not math.isfinite(gap) or not math.isfinite(self.tolerance):
            return False
        return gap >= self.tolerance if self.relation in ("<=", ">=") else gap > self.tolerance

    def as_dict(self) -> dict:
        """The comparison as the ledger records it: always the keys of :data:`NUMERIC_FIELDS`.

        A key that does not apply to this kind of comparison is ``None`` (so every record has
        one shape); ``book/ledger.md`` documents each key.
        """
        out = {
            "kind": self.kind,
            "relation": self.relation,
            "lhs": self.lhs,
            "rhs": self.rhs,
            "abs_error": self.abs_error,
            "tolerance": self.tolerance,
        }
        for key in NUMERIC_FIELDS[len(out) :]:
            value = self.detail.get(key)
            out[key] = list(value) if isinstance(value, (list, tuple)) else value
        return out


#: the keys of :meth:`Numeric.as_dict`, in order (the ledger page documents each)
NUMERIC_FIELDS = (
    "kind",
    "relation",
    "lhs",
    "rhs",
    "abs_error",
    "tolerance",
    "lhs_is",
    "rhs_is",
    "lhs_se",
    "rhs_se",
    "stderr",
    "k",
    "gap",
    "n",
    "lo",
    "hi",
    "component",
    "missing",
)


def _as_float_array(x):
    import torch

    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.dtype != torch.float64:
            raise TypeError(f"exact checks need float64 tensors, got {x.dtype}")
        return x.reshape(-1).tolist()
    if isinstance(x, (list, tuple)):
        return [float(v) for v in x]
    return [float(x)]


def exact(
    lhs, rhs, rtol: float = RTOL, atol: float = ATOL, lhs_is: str | None = None, rhs_is: str | None = None
) -> Numeric:
    """Same-draw comparison: ``|lhs - rhs| <= rtol * max(|lhs|, |rhs|) + atol``.

    ``lhs`` and ``rhs`` are floats or float64 tensors of one shape; for tensors the
    error is the largest elementwise error and ``lhs``/``rhs`` are reported as
    Euclidean norms (and labelled so in the record). ``lhs_is``/``rhs_is`` say in words
    what the two reported numbers are, when they are not plainly the statement's two sides.
    """
    a, b = _as_float_array(lhs), _as_float_array(rhs)
    if len(a) != len(b):
        raise ValueError(f"exact(): lhs has {len(a)} numbers, rhs has {len(b)}")
    err = max(abs(x - y) for x, y in zip(a, b, strict=True))
    scale = max(max(abs(x) for x in a), max(abs(y) for y in b))
    if len(a) == 1:
        l, r = a[0], b[0]
    else:
        l, r = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    detail = {"rtol": rtol, "atol": atol, "size": len(a)}
    if len(a) > 1:
        detail["lhs_is"] = f"Euclidean norm of the left side's {len(a)} values"
        detail["rhs_is"] = f"Euclidean norm of the right side's {len(b)} values"
    detail.update({key: v for key, v in (("lhs_is", lhs_is), ("rhs_is", rhs_is)) if v is not None})
    return Numeric(l, r, err, rtol * scale + atol, "exact", detail)


def monte_carlo(
    samples,
    exact_value: float,
    k: float = K_STDERR,
    max_rel_width: float = 0.05,
    scale: float | None = None,
    lhs_is: str | None = None,
    rhs_is: str | None = None,
) -> Numeric:
    """Monte Carlo comparison: ``|mean(samples) - exact| <= k * stderr``.

    ``samples`` are ``n`` independent draws of an unbiased estimator of ``exact_value``.
    Raises ``ValueError`` if ``k * stderr`` exceeds ``max_rel_width * scale`` (``scale``
    defaults to ``|exact_value|``): such a bound would accept nearly anything, so take
    more samples.
    """
    import torch

    s = torch.as_tensor(samples, dtype=torch.float64).reshape(-1)
    n = s.numel()
    if n < 100:
        raise ValueError(f"monte_carlo(): {n} samples are too few for a normal bound (need >= 100)")
    mean = float(s.mean())
    stderr = float(s.std(unbiased=True)) / math.sqrt(n)
    exact_value = float(exact_value)
    width = k * stderr
    scale = abs(exact_value) if scale is None else float(scale)
    if width > max_rel_width * scale:
        raise ValueError(
            f"monte_carlo(): bound k*stderr = {width:.3g} is wider than "
            f"{max_rel_width:g} x {scale:.3g}; take more samples"
        )
    detail = {"n": n, "stderr": stderr, "k": k, "lhs_se": stderr, "rhs_se": 0.0}
    detail.update({key: v for key, v in (("lhs_is", lhs_is), ("rhs_is", rhs_is)) if v is not None})
    return Numeric(mean, exact_value, abs(mean - exact_value), width, "monte-carlo", detail)


def inequality(
    lhs,
    rhs,
    relation: str,
    lhs_se: float = 0.0,
    rhs_se: float = 0.0,
    k: float = K_STDERR,
    lhs_is: str | None = None,
    rhs_is: str | None = None,
) -> Numeric:
    """A claim ``lhs <relation> rhs``, judged with a margin of ``k`` standard errors.

    ``lhs_se`` and ``rhs_se`` are the standard errors of the two sides (0 for an exact
    value). The claim passes when the signed gap (``rhs - lhs`` for ``<``, ``lhs - rhs`` for
    ``>``) exceeds ``k * sqrt(lhs_se**2 + rhs_se**2)``. ``lhs_is``/``rhs_is`` say in words
    what the two numbers are (for the ledger).
    """
    if relation not in ("<", ">", "<=", ">="):
        raise ValueError(f"inequality(): relation must be one of <, >, <=, >=; got {relation!r}")
    lhs, rhs, lhs_se, rhs_se = float(lhs), float(rhs), float(lhs_se), float(rhs_se)
    if lhs_se < 0 or rhs_se < 0:
        raise ValueError("inequality(): standard errors must be >= 0")
    gap = rhs - lhs if relation.startswith("<") else lhs - rhs
    se = math.sqrt(lhs_se**2 + rhs_se**2)
    detail = {"gap": gap, "stderr": se, "k": k, "lhs_se": lhs_se, "rhs_se": rhs_se}
    detail.update({key: v for key, v in (("lhs_is", lhs_is), ("rhs_is", rhs_is)) if v is not None})
    return Numeric(lhs, rhs, abs(lhs - rhs), k * se, "inequality", detail, relation)


def interval(value, lo: float, hi: float, se: float = 0.0, k: float = K_STDERR, value_is: str | None = None) -> Numeric:
    """A claim ``lo < value < hi`` ("about 15 times"), judged with a margin of ``k`` standard errors.

    Reported with ``lhs = value`` and ``rhs = (lo + hi) / 2``; the gap is the distance to the
    nearer end (negative outside), and it must exceed ``k * se``.
    """
    value, lo, hi, se = float(value), float(lo), float(hi), float(se)
    if not lo < hi:
        raise ValueError(f"interval(): need lo < hi, got {lo} and {hi}")
    gap = min(value - lo, hi - value)
    detail = {"gap": gap, "stderr": se, "k": k, "lo": lo, "hi": hi, "lhs_se": se, "rhs_se": 0.0}
    detail["rhs_is"] = f"midpoint of the stated interval ({lo:g}, {hi:g})"
    if value_is is not None:
        detail["lhs_is"] = value_is
    return Numeric(value, (lo + hi) / 2, abs(value - (lo + hi) / 2), k * se, "interval", detail, "in")


def proves_zero(expr) -> bool:
    """True when SymPy simplifies ``expr`` (a difference ``lhs - rhs``) to exactly 0."""
    if isinstance(expr, bool):
        return expr
    import sympy

    e = sympy.simplify(sympy.expand_log(sympy.sympify(expr), force=True))
    if e == 0:
        return True
    return sympy.simplify(sympy.expand(e)) == 0


@dataclass(frozen=True)
class Identity:
    id: str
    chapter: str
    statement: str
    label: str | None = None
    symbolic: Callable[[str | None], object] | None = None
    numeric: Callable[[str | None], Numeric] | None = None
    wrong: tuple = ()
    summary: str = ""
    kind: str = "identity"  # "identity", "claim" or "source" (see the module's docstring)

    def __post_init__(self):
        import re

        if self.kind not in KINDS:
            raise ValueError(f"{self.id!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", self.id):
            raise ValueError(f"identity id {self.id!r} is not kebab-case")
        if self.symbolic is None and self.numeric is None:
            raise ValueError(f"identity {self.id!r} has neither a symbolic nor a numeric check")
        if not self.wrong:
            raise ValueError(f"identity {self.id!r} names no wrong variant: its checks could never be seen to fail")

    @property
    def code(self) -> str:
        """Dotted path of the function that performs the numeric (else symbolic) check."""
        fn = self.numeric or self.symbolic
        return f"{fn.__module__}.{fn.__qualname__}"

    @property
    def tests(self) -> tuple:
        return (
            f"tests/test_identities.py::test_identity_holds[{self.id}]",
            f"tests/test_identities.py::test_wrong_variant_fails[{self.id}]",
        )


IDENTITIES: dict[str, Identity] = {}


def register(identity: Identity) -> Identity:
    """Add an identity to the registry; ids are unique across the book."""
    if identity.id in IDENTITIES and IDENTITIES[identity.id] is not identity:
        raise ValueError(f"identity id {identity.id!r} registered twice")
    IDENTITIES[identity.id] = identity
    return identity


def registered(cache_dir: str | None = None) -> dict[str, dict]:
    """``id -> {"chapter", "kind", "label"}`` of every record the chapter modules register.

    Importing the chapter modules (torch, Pyro, SymPy) takes seconds, so a build passes the
    execution cache's folder, which is keyed by a hash of ``code/`` and of the versions that
    compute the numbers: the list is read from ``registered.json`` there when it exists (nothing
    under ``code/`` has changed since it was written), and written there otherwise.
    """
    import json
    from pathlib import Path

    path = Path(cache_dir, "registered.json") if cache_dir else None
    if path is not None and path.is_file():
        return json.loads(path.read_text(encoding="utf8"))
    from .. import chapters  # noqa: F401  (registers every identity)

    out = {i.id: {"chapter": i.chapter, "kind": i.kind, "label": i.label} for i in IDENTITIES.values()}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n", encoding="utf8")
    return out
