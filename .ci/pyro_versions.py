"""Run the book's identity, claim and source checks with the installed Pyro; print one JSON row.

    python .ci/pyro_versions.py [OUT.json]   # {"pyro": ..., "torch": ..., "status": ..., "checks": {...}}

writes the row to OUT.json (or prints it, without an argument).

``nox -s versions`` installs each Pyro release in turn and runs this script in a fresh
process for each, then writes the rows to ``book/_data/pyro-versions.json``. Each check is
what ``verify(id)`` runs while the book builds (the SymPy proof, if any, and the numeric
check), without the book: a failing check, or one that raises, is recorded with its message
and the script goes on to the next one. If ``elbo_terms.chapters`` cannot be imported at all
(say a Pyro name it uses does not exist in that release), the row says so in ``status``.
"""

from __future__ import annotations

import json
import sys
import time
import traceback


def _error(exc: BaseException) -> str:
    """The exception's type and message, and where it was raised (file, line, code), on one line."""
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        last = frames[-1]
        parts = last.filename.replace("\\", "/").split("/")
        where = "/".join(parts[-3:])
        text += f" (at {where}:{last.lineno}: {(last.line or '').strip()})"
    return " ".join(text.split())[:2000]


def run_checks() -> dict:
    import pyro
    import torch

    row = {"pyro": pyro.__version__, "torch": torch.__version__, "status": "ok", "error": None, "checks": {}}
    try:
        import elbo_terms.chapters  # noqa: F401  (registers every identity, claim and source check)
        from elbo_terms.build.book import Result
        from elbo_terms.build.identity import IDENTITIES, proves_zero
    except Exception as exc:  # an import failure is a result for this release, not a crash
        row["status"], row["error"] = "import-failed", _error(exc)
        return row
    for iid in sorted(IDENTITIES):
        ident = IDENTITIES[iid]
        start = time.perf_counter()
        try:
            sym = None if ident.symbolic is None else proves_zero(ident.symbolic(None))
            num = None if ident.numeric is None else ident.numeric(None)
            result = Result(ident, sym, num)
            passed, message = result.passed, (None if result.passed else result.message())
        except Exception as exc:
            passed, message = False, "raised " + _error(exc)
        seconds = time.perf_counter() - start
        row["checks"][iid] = {"kind": ident.kind, "passed": passed, "message": message}
        print(f"  {'ok  ' if passed else 'FAIL'} {iid} ({seconds:.1f} s)", file=sys.stderr, flush=True)
    return row


def main() -> int:
    try:
        row = run_checks()
    except Exception as exc:  # pyro or torch themselves do not import
        row = {"pyro": None, "torch": None, "status": "import-failed", "error": _error(exc), "checks": {}}
    text = json.dumps(row, sort_keys=True)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w", encoding="utf8") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
