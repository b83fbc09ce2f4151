"""Chapter ``inside-trace-elbo``: the drift check, the site-by-site recomputation, SVI.step's value."""

import pyro
import pytest
import torch
from elbo_terms._util import float64, seeded
from elbo_terms.build.identity import IDENTITIES
from elbo_terms.chapters import conjugate as C
from elbo_terms.chapters import trace_source as T


# ------------------------------------------------------------------ the drift check
def test_every_relied_on_line_is_in_the_installed_pyro():
    assert T.missing_lines() == []
    T.check_source()  # does not raise
    for key in {e.function for e in T.RELIED_ON}:
        assert "MISSING" not in T.mapping_table(key)


def test_relied_on_lines_name_known_functions():
    assert {e.function for e in T.RELIED_ON} == set(T.FUNCTIONS)


def _doctored(old, new):
    """A source reader that returns the installed source with one line changed."""

    def source(key):
        text = T.installed_source(key)
        return text.replace(old, new)

    return source


def test_drift_check_fails_when_a_relied_on_line_changes():
    # a future Pyro that returned +elbo would make the chapter's explanation wrong
    source = _doctored("loss = -elbo", "loss = elbo")
    result = T.num_source_drift(source=source)
    assert not result.passed
    assert result.lhs == result.rhs - 1
    assert result.detail["missing"] == ["pyro.infer.trace_elbo.Trace_ELBO.loss: loss = -elbo"]
    with pytest.raises(AssertionError, match="loss = -elbo"):
        T.check_source(source=source)


def test_drift_check_fails_when_the_particle_average_moves():
    source = _doctored("elbo += elbo_particle / self.num_particles", "elbo += elbo_particle")
    assert not T.num_source_drift(source=source).passed


def test_drift_check_wrong_variant_names_the_absent_line():
    result = T.num_source_drift("absent-line")
    assert not result.passed
    assert result.detail["missing"] == [f"pyro.infer.trace_elbo.Trace_ELBO.loss: {T.ABSENT_LINE.line}"]


def test_drift_identity_is_registered_for_the_chapter():
    ident = IDENTITIES["trace-elbo-source-drift"]
    assert ident.chapter == "inside-trace-elbo"
    assert "absent-line" in ident.wrong


def test_find_line_matches_whole_lines_only():
    src = "def f():\n    loss = -elbo_total\n    return loss\n"
    assert T.find_line(src, "loss = -elbo") is None
    assert T.find_line(src, "return loss") == 3
    assert T.find_line(src, "  loss = -elbo_total  ") == 2


def test_bad_names_give_clear_errors():
    with pytest.raises(KeyError, match="unknown function key"):
        T.installed_source("no-such-key")
    with pytest.raises(AttributeError):
        T.resolve("pyro.infer.trace_elbo.Trace_ELBO.no_such_method")


# -------------------------------------------------------- site-by-site recomputation
@pytest.mark.parametrize("vectorize", [False, True])
@pytest.mark.parametrize("particles", [1, 3])
def test_site_terms_reproduce_the_loss(vectorize, particles):
    with float64(), T.fresh_param_store():
        x = C.data()
        loss = T.trace_elbo_loss(T.model, T.guide, x, particles=particles, vectorize=vectorize, seed=5)
        pairs = T.traces(T.model, T.guide, x, particles=particles, vectorize=vectorize, seed=5)
        recomputed = -T.elbo_from_site_terms(T.site_terms(pairs), particles)
    assert recomputed == pytest.approx(loss, rel=1e-12)


def test_site_terms_equal_pyros_own_site_sums():
    with float64(), T.fresh_param_store():
        pairs = T.traces(T.model, T.guide, C.data(), particles=2, seed=7)
        rows = T.site_terms(pairs)
        for i, (model_trace, guide_trace) in enumerate(pairs):
            model_trace.compute_log_prob()
            guide_trace.compute_log_prob()
            for r in (r for r in rows if r.particle == i):
                tr = model_trace if r.trace == "model" else guide_trace
                assert r.log_prob_sum == pytest.approx(float(tr.nodes[r.site]["log_prob_sum"].detach()), rel=1e-12)
    # two latent sites in each trace, one observed site in the model, no plate index sites
    assert sorted((r.trace, r.site) for r in rows if r.particle == 0) == [
        ("guide", "tau"),
        ("guide", "z"),
        ("model", "tau"),
        ("model", "x"),
        ("model", "z"),
    ]


def test_site_table_bottom_right_is_minus_the_loss():
    with float64(), T.fresh_param_store():
        x = C.data()
        pairs = T.traces(T.model, T.guide, x, particles=3, seed=9)
        loss = T.trace_elbo_loss(T.model, T.guide, x, particles=3, seed=9)
    last = T.site_table(pairs).splitlines()[-1]
    assert last.rstrip(" |").endswith(f"**{-loss:.4f}**")


def test_svi_step_returns_the_loss_before_the_update():
    step_value, before, after = T.svi_step_and_losses()
    assert step_value == pytest.approx(before, rel=1e-12)
    assert abs(after - before) > 1e-3


# ------------------------------------------------------------------ no global state
def test_checks_leave_no_global_state_changed():
    pyro.clear_param_store()
    pyro.param("callers_param", torch.tensor(1.5))
    dtype, rng = torch.get_default_dtype(), torch.get_rng_state()
    for ident in ("trace-elbo-loss-by-sites", "svi-step-value", "trace-elbo-source-drift"):
        assert IDENTITIES[ident].numeric(None).passed
    assert torch.get_default_dtype() == dtype
    assert torch.equal(torch.get_rng_state(), rng)
    assert list(pyro.get_param_store().keys()) == ["callers_param"]
    assert float(pyro.param("callers_param").detach()) == 1.5
    pyro.clear_param_store()


def test_traces_draw_like_trace_elbo():
    """Same seed, same draws: the guide's z in our trace is the z Trace_ELBO scored."""
    with float64():
        x, guide = C.data(), C.make_guide()
        with seeded(3):
            loss = pyro.infer.Trace_ELBO().loss(C.model, guide, x)
        ((model_trace, guide_trace),) = T.traces(C.model, guide, x, seed=3)
    assert -loss == pytest.approx(float(model_trace.log_prob_sum() - guide_trace.log_prob_sum()), rel=1e-12)


def test_a_drifted_pyro_fails_verify_as_the_build_would(monkeypatch):
    """What the chapter's cell runs: on a Pyro whose source changed, verify() raises, naming the identity."""
    from elbo_terms.build.book import verify
    from elbo_terms.build.identity import IdentityFailed

    original = T.installed_source
    monkeypatch.setattr(T, "installed_source", lambda key: original(key).replace("loss = -elbo", "loss = elbo"))
    with pytest.raises(AssertionError, match="loss = -elbo"):
        T.check_source()
    with pytest.raises(IdentityFailed, match="trace-elbo-source-drift"):
        verify("trace-elbo-source-drift")


# ------------------------------------------------------------ displays and tables
def _displayed(chapter, label):
    """The LaTeX of the ``$$ ... $$ (label)`` display in book/<chapter>.md, without whitespace."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "book" / f"{chapter}.md").read_text()
    match = re.search(r"^\$\$\n((?:(?!^\$\$).)*?)^\$\$ \(" + re.escape(label) + r"\)$", text, re.S | re.M)
    assert match, f"no display labelled {label} in {chapter}.md"
    return "".join(match.group(1).split())


@pytest.mark.parametrize("ident", ["trace-elbo-loss-by-sites", "svi-step-value"])
def test_registered_statement_is_the_displayed_equation(ident):
    identity = IDENTITIES[ident]
    assert "".join(identity.statement.split()) == _displayed(identity.chapter, identity.label)


def test_particles_are_indexed_by_k_and_no_lognormal_parameter_is_called_b():
    assert "z^{(s)}" not in T.LOSS_BY_SITES and "z^{(k)}" in T.LOSS_BY_SITES
    with float64(), T.fresh_param_store():
        T.guide(C.data())
        assert set(pyro.get_param_store().keys()) == {"m", "s", "m_tau", "s_tau"}


def test_site_table_is_narrow_and_labels_sign_and_trace():
    with float64(), T.fresh_param_store():
        pairs = T.traces(T.model, T.guide, C.data(), particles=4, seed=11)
    lines = T.site_table(pairs).splitlines()
    assert lines[0] == "| site | $k=1$ | $k=2$ | $k=3$ | $k=4$ | mean |"
    assert all(line.count("|") == 7 for line in lines)
    assert "| + model `x` (obs.) |" in T.site_table(pairs)
    assert "| − guide `z` |" in T.site_table(pairs)


def test_decompose_tables_show_the_chosen_columns():
    from elbo_terms import decompose

    with float64(), T.fresh_param_store(), seeded(11):
        terms = decompose(T.model, T.guide, C.data(), num_particles=T.PARTICLES)
    sites = T.sites_table(terms.sites.to_records()).splitlines()
    assert sites[0].startswith("| site | role | $\\log p$ | $\\log q$ |")
    assert len(sites) == 2 + len(terms.sites)
    assert sites[-1].startswith("| `x` | observed |") and sites[-1].endswith("| – | – |")
    summary = T.terms_table(terms)
    assert f"| `loss` | {terms.loss:.4f} |" in summary
    with pytest.raises(KeyError, match="no column"):
        T.sites_table(terms.sites.to_records(), {"name": "site", "nonsense": "x"})
