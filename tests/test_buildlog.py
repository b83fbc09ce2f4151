"""The build log's pieces without a build: the counts of the summary line and the notebook-line filter."""

import logging
from types import SimpleNamespace

from elbo_terms.build import buildlog, prerun


def test_ledger_counts_by_kind_a_record_without_kind_is_an_identity():
    env = SimpleNamespace(
        elbo_ledger=[
            {"id": "a", "passed": True},
            {"id": "b", "kind": "identity", "passed": False},
            {"id": "c", "kind": "claim", "passed": True},
            {"id": "d", "kind": "source", "passed": True},
        ]
    )
    assert buildlog.ledger_counts(env) == {"identity": (1, 2), "claim": (1, 1), "source": (1, 1)}
    assert buildlog.ledger_counts(SimpleNamespace()) == {"identity": (0, 0), "claim": (0, 0), "source": (0, 0)}


def _record(msg, level=logging.INFO, docname="elbo"):
    rec = logging.LogRecord("sphinx.mystnb-elbo", level, __file__, 1, msg, None, None)
    rec.docname = docname
    return rec


def test_one_line_per_notebook_and_every_warning_kept(monkeypatch):
    state = {"executed_by_mystnb": set()}
    quiet = buildlog._QuietNotebooks(state)
    monkeypatch.setattr(prerun, "EXECUTED", {"elbo": 1.0})
    assert not quiet.filter(_record("Executing notebook using local CWD [mystnb]"))
    assert not quiet.filter(_record("Cached executed notebook: ID=3 [mystnb]"))
    assert not quiet.filter(_record("Using cached notebook: ID=3 [mystnb]"))  # executed ahead by prerun
    assert quiet.filter(_record("Using cached notebook: ID=3 [mystnb]", docname="gradients"))
    assert quiet.filter(_record("Executed notebook in 2.00 seconds [mystnb]", docname="gradients"))
    assert state["executed_by_mystnb"] == {"gradients"}
    assert quiet.filter(_record("Executing notebook using local CWD [mystnb]", level=logging.WARNING))
