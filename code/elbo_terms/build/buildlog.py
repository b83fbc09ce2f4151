"""Sphinx extension: a quiet build log that ends with one line saying what the build checked.

* myst-nb says three things per executed notebook ("Executing notebook using local CWD",
  "Executed notebook in N seconds", "Cached executed notebook: ID=n"); only the middle one is kept,
  so each notebook gets one line: its execution time, or "Using cached notebook". (Notebooks
  executed ahead by :mod:`elbo_terms.build.prerun` are found in the cache when their page is read;
  that "Using cached notebook" is dropped too, their line is the prerun's "Executed notebook".)
  Only informational lines are touched: every warning and error is shown as before.
* The last line of the build is a summary::

    summary: passed: identities 40/40, claims 9/9, source checks 4/4; notebooks 8 executed (2 at a time), 0 cached; 96 s

  (counts of the ledger records by kind; notebooks among the pages read by this build; wall time of
  the whole ``sphinx-build`` process). It is printed when the process exits, after Sphinx's own
  closing lines, so that it is last.
"""

from __future__ import annotations

import atexit
import logging as pylogging
import os
import time
from pathlib import Path

from sphinx.util import logging

from . import prerun

logger = logging.getLogger(__name__)
_T0 = time.perf_counter()

# myst-nb's informational messages that repeat what the one line per notebook says
_DROPPED = ("Executing notebook using ", "Cached executed notebook: ")


class _QuietNotebooks(pylogging.Filter):
    def __init__(self, state: dict):
        super().__init__()
        self.state = state

    def filter(self, record: pylogging.LogRecord) -> bool:
        if record.levelno >= pylogging.WARNING:
            return True
        msg = str(record.msg)
        docname = getattr(record, "docname", None)
        if msg.startswith(_DROPPED):
            return False
        if msg.startswith("Using cached notebook") and docname in prerun.EXECUTED:
            return False
        if msg.startswith("Executed notebook in ") and docname is not None:
            self.state["executed_by_mystnb"].add(docname)
        return True


def ledger_counts(env) -> dict[str, tuple[int, int]]:
    """{kind: (passed, total)} over the ledger records; a record without a kind is an identity."""
    counts = {"identity": [0, 0], "claim": [0, 0], "source": [0, 0]}
    for rec in getattr(env, "elbo_ledger", None) or []:
        c = counts.setdefault(rec.get("kind") or "identity", [0, 0])
        c[0] += bool(rec.get("passed"))
        c[1] += 1
    return {k: (p, t) for k, (p, t) in counts.items()}


def _process_seconds() -> float:
    """Wall time since this process started (Linux), else since this extension was loaded."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _T0


def summary(app, state: dict) -> str:
    env = app.env
    status = "" if app.statuscode == 0 else "; build FAILED"
    if not state["read"]:  # an incremental build (nox -s serve) with no page changed
        return f"summary: no page changed, nothing checked or executed; {_process_seconds():.1f} s{status}"
    if getattr(env, "elbo_ledger", None) is None:
        ledger = "ledger not built"
    else:
        c = ledger_counts(env)
        (ip, it), (cp, ct), (sp, st) = c["identity"], c["claim"], c["source"]
        ledger = f"passed: identities {ip}/{it}, claims {cp}/{ct}, source checks {sp}/{st}"
        others = {k: v for k, v in c.items() if k not in ("identity", "claim", "source")}
        ledger += "".join(f", {k} {p}/{t}" for k, (p, t) in sorted(others.items()))
    meta = getattr(env, "nb_metadata", {})
    notebooks = [d for d in state["read"] if meta.get(d, {}).get("exec_data")]
    executed = [d for d in notebooks if d in prerun.EXECUTED or d in state["executed_by_mystnb"]]
    jobs = f" ({prerun.jobs()} at a time)" if len(prerun.EXECUTED) > 1 else ""
    nbs = f"notebooks {len(executed)} executed{jobs}, {len(notebooks) - len(executed)} cached"
    return f"summary: {ledger}; {nbs}; {_process_seconds():.1f} s{status}"


def setup(app):
    state = {"read": [], "executed_by_mystnb": set(), "printed": False}
    quiet = _QuietNotebooks(state)
    for handler in pylogging.getLogger(logging.NAMESPACE).handlers:
        handler.addFilter(quiet)

    def remember_read(app, env, docnames):
        state["read"] = list(docnames)

    def print_summary():
        if not state["printed"]:
            state["printed"] = True
            logger.info(summary(app, state))

    app.connect("env-before-read-docs", remember_read, priority=900)
    app.connect("builder-inited", lambda app: atexit.register(print_summary))
    return {"version": "0.1", "parallel_read_safe": True, "parallel_write_safe": True}
