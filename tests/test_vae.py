"""Chapter ``vae-bridge``: the VAE and its Pyro twin, beyond the generic identity tests.

The registered identities (``vae-*``) are run, with their wrong variants, by
tests/test_identities.py. These tests cover the helpers the chapter relies on: the data,
the shared weights, the shared random draws, that nothing global is left changed, the power
of the statistical check, bad input, and training.
"""

import warnings

import pyro
import pytest
import torch
from elbo_terms._util import seeded
from elbo_terms.chapters import vae as V
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO


@pytest.fixture(scope="module")
def x():
    return V.digits()


def test_digits_are_bundled_scaled_float64(x):
    assert x.shape == (1797, V.D_PIXELS)
    assert x.dtype == torch.float64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0


def test_build_vae_is_deterministic_float64_and_leaves_the_rng_alone():
    state = torch.get_rng_state()
    a, b = V.build_vae(), V.build_vae()
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.dtype == torch.float64 for p in a.parameters())
    assert torch.equal(V.flat_params(a), V.flat_params(b))
    assert not torch.equal(V.flat_params(a), V.flat_params(V.build_vae(seed=1)))


def test_pyro_module_registers_the_very_same_tensors(x):
    vae = V.build_vae()
    with V.private_param_store(), seeded(0):
        V.make_guide(vae)(x[:5])
        V.make_model(vae)(x[:5])
        store = pyro.get_param_store()
        for name, p in vae.encoder.named_parameters():
            assert store[f"encoder$$${name}"] is p
        for name, p in vae.decoder.named_parameters():
            assert store[f"decoder$$${name}"] is p


def test_guide_and_torch_forward_draw_the_same_eps(x):
    vae = V.build_vae()
    with V.private_param_store(), seeded(3):
        trace = pyro.poutine.trace(V.make_guide(vae)).get_trace(x)
    with seeded(3), torch.no_grad():
        *_, z, _ = vae(x)
    assert torch.equal(trace.nodes["z"]["value"].detach(), z)


def test_subsample_indices_are_replayed_into_the_model(x):
    vae = V.build_vae()
    with V.private_param_store(), seeded(4):
        guide_trace = pyro.poutine.trace(V.make_guide(vae)).get_trace(x, batch_size=10)
        model_trace = pyro.poutine.trace(pyro.poutine.replay(V.make_model(vae), trace=guide_trace)).get_trace(
            x, batch_size=10
        )
    t = V.torch_terms(vae, x, seed=4, batch_size=10)
    assert torch.equal(guide_trace.nodes["data"]["value"], t["idx"])
    assert torch.equal(model_trace.nodes["data"]["value"], t["idx"])
    assert torch.equal(model_trace.nodes["x"]["value"], x[t["idx"]])


def test_checks_leave_param_store_rng_and_dtype_alone(x):
    pyro.clear_param_store()
    marker = pyro.param("someone_elses_param", torch.tensor(1.5))
    state, dtype = torch.get_rng_state(), torch.get_default_dtype()
    V.pyro_loss(Trace_ELBO(), V.build_vae(), x[:20], seed=0)
    V.pyro_grads(TraceMeanField_ELBO(), V.build_vae(), x[:20], seed=0)
    V.train_pyro(V.build_vae(), x[:200], epochs=1, batch=50)
    assert list(pyro.get_param_store().keys()) == ["someone_elses_param"]
    assert pyro.param("someone_elses_param") is marker
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.get_default_dtype() == dtype
    pyro.clear_param_store()


def test_pyro_grads_leave_no_gradient_behind(x):
    vae = V.build_vae()
    V.pyro_grads(Trace_ELBO(), vae, x[:20], seed=0)
    assert all(p.grad is None or not p.grad.any() for p in vae.parameters())


def test_monte_carlo_kl_averages_to_the_closed_form(x):
    """log q - log p at z = m + s eps is an unbiased estimate of the closed-form KL (5 standard errors)."""
    vae = V.build_vae()
    t = V.torch_terms(vae, x[:1], seed=5, particles=20000)
    draws = t["kl_mc"].reshape(-1)
    closed = float(t["kl_closed"].reshape(-1)[0])
    assert abs(float(draws.mean()) - closed) <= 5 * float(draws.std()) / len(draws) ** 0.5


def test_unbiasedness_check_detects_a_one_percent_bias(x):
    """The statistical check is not vacuous: shifting the samples by 1 % of the loss makes it fail."""
    from elbo_terms.build.identity import monte_carlo

    diffs = torch.tensor(V.subsample_differences())
    full = abs(V.pyro_loss(Trace_ELBO(), V.build_vae(), x, seed=19))
    assert monte_carlo(diffs, 0.0, scale=full).passed
    assert not monte_carlo(diffs + 0.01 * full, 0.0, scale=full).passed


def test_unbiasedness_check_refuses_too_few_draws():
    with pytest.raises(ValueError, match="too few"):
        from elbo_terms.build.identity import monte_carlo

        monte_carlo(V.subsample_differences(draws=50), 0.0, scale=1e5)


def test_sgd_at_the_mean_loss_learning_rate_diverges_and_is_reported_infinite():
    a, b = V.sgd_pair(V.SGD_LR, V.SGD_LR)
    assert torch.isinf(a).all() and torch.isfinite(b).all()


def test_pyro_does_not_warn_about_a_one_sided_beta_but_decompose_does(x):
    from elbo_terms import decompose

    vae = V.build_vae()
    model, guide = V.scaled_twin(vae, beta_model=True, beta_guide=False)
    with pyro.validation_enabled(True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            V.pyro_loss(Trace_ELBO(), vae, x, seed=0, model=model, guide=guide, beta=0.3)
        assert not caught
        with V.private_param_store(), seeded(0), pytest.warns(UserWarning, match="scaled by 0.3 in the model"):
            decompose(model, guide, x, beta=0.3)


def test_decompose_splits_the_vae_loss_into_the_torch_terms(x):
    from elbo_terms import decompose

    vae = V.build_vae()
    with V.private_param_store(), seeded(11):
        d = decompose(V.make_model(vae), V.make_guide(vae), x)
    t = V.torch_terms(vae, x, seed=11)
    assert d.reconstruction == pytest.approx(-float(t["bce"].sum()), rel=1e-9)
    assert d.kl_mc == pytest.approx(float(t["kl_mc"].sum()), rel=1e-9)
    assert d.kl_analytic == pytest.approx(float(t["kl_closed"].sum()), rel=1e-9)


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (torch.zeros(5, 63, dtype=torch.float64), ValueError, r"shape \(N, 64\)"),
        (torch.zeros(64, dtype=torch.float64), ValueError, r"shape \(N, 64\)"),
        (torch.zeros(5, 64, dtype=torch.float32), TypeError, "float64"),
        (torch.full((5, 64), 16.0, dtype=torch.float64), ValueError, r"\[0, 1\]"),
        (torch.zeros(0, 64, dtype=torch.float64), ValueError, "no digits"),
        ([[0.0] * 64], TypeError, "torch.Tensor"),
    ],
)
def test_bad_digits_get_a_clear_error(bad, error, match):
    vae = V.build_vae()
    with pytest.raises(error, match=match):
        V.pyro_loss(Trace_ELBO(), vae, bad, seed=0)
    with pytest.raises(error, match=match):
        V.torch_terms(vae, bad, seed=0)
    with pytest.raises(error, match=match):
        V.train_torch(vae, bad, epochs=1)


def test_training_both_follows_the_same_path(x):
    """Same initial weights, batches and eps; losses differ by N/B, which Adam (up to eps) ignores."""
    a, b = V.build_vae(), V.build_vae()
    lp, sp = V.train_pyro(a, x, epochs=2)
    lt, st = V.train_torch(b, x, epochs=2)
    steps = 2 * V.steps_per_epoch(len(x))
    assert len(lp) == len(lt) == steps and len(sp) == len(st) == 3
    scale = len(x) / V.TRAIN_BATCH
    assert torch.tensor(lp) / scale == pytest.approx(torch.tensor(lt), rel=1e-6)
    diff = (V.flat_params(a) - V.flat_params(b)).abs()
    assert float(diff.median()) < 1e-8 and float(diff.max()) < 1e-3  # Adam's eps: weights with tiny gradients
    before, after = V.torch_split(V.with_weights(sp[0]), x), V.torch_split(V.with_weights(sp[-1]), x)
    assert after["elbo"] > before["elbo"]
    assert after["elbo"] == pytest.approx(after["reconstruction"] - after["kl"])


def test_decoded_samples_are_probabilities():
    imgs = V.decoded_samples(V.build_vae(), n=6)
    assert imgs.shape == (6, 8, 8)
    assert float(imgs.min()) >= 0 and float(imgs.max()) <= 1


def test_time_particles_reports_both_modes_without_asserting_speed(x):
    t = V.time_particles(particles=2, n=10, repeats=1)
    assert set(t) == {"sequential", "vectorized"} and all(v > 0 for v in t.values())
    runs = V.time_particles(particles=2, n=10, repeats=2, keep_all=True)
    assert all(len(v) == 2 for v in runs.values())


def _displays(text):
    """{label: LaTeX} of the labelled display equations of a MyST chapter."""
    import re

    pattern = re.compile(r"^\$\$\n(.*?)^\$\$ \(([a-z0-9-]+)\)$", re.S | re.M)
    return {label: body for body, label in pattern.findall(text)}


@pytest.mark.parametrize("chapter", [V.CHAPTER, V.OPTIONS])
def test_every_displayed_identity_is_its_registered_statement(chapter):
    """Each page's displays and the registered statements (public: the ledger shows them) stay in sync."""
    from pathlib import Path

    from elbo_terms.build.identity import IDENTITIES

    text = (Path(__file__).resolve().parent.parent / "book" / f"{chapter}.md").read_text()
    shown = _displays(text)
    ours = {i.label: i.statement for i in IDENTITIES.values() if i.chapter == chapter and i.label}
    assert set(shown) == set(ours)
    for label, statement in ours.items():
        assert "".join(shown[label].split()) == "".join(statement.split()), label
    for iid in (i.id for i in IDENTITIES.values() if i.chapter == chapter):
        assert f'verify("{iid}")' in text, iid


def test_the_one_sided_beta_has_one_home():
    """The one-sided beta pitfall is explained under the label other pages link to, once."""
    from pathlib import Path

    book = Path(__file__).resolve().parent.parent / "book"
    text = (book / "vae-bridge.md").read_text()
    assert text.count("(one-sided-beta)=") == 1
    assert "(vae-beta-one-sided)" in text.split("(one-sided-beta)=", 1)[1]
    assert "removes the KL's share" not in text


def test_clipped_adam_is_not_scale_invariant_with_its_defaults():
    """With the default clamp on both runs the summed-loss run leaves the mean-loss trajectory."""
    a, b = V.clipped_adam_pair(variant="default-clip", steps=2)
    assert float((a - b).abs().max()) > 1e-3
    a, b = V.clipped_adam_pair(steps=2)
    assert float((a - b).abs().max()) < 1e-12
    assert 0 < V.clipped_fraction() < 1


def test_mean_field_behaviour_is_what_the_chapter_says():
    """TraceMeanField_ELBO: site-order warning, reparameterization check, auxiliary assert, KL fallback."""
    out = {case: (tr, mf) for case, tr, mf in V.mean_field_behaviour()}
    assert all(tr["error"] is None for tr, _ in out.values())  # Trace_ELBO computes every program
    tr, mf = out["guide samples b before a"]
    assert mf["error"] is None and any("mean field" in msg for _, msg in mf["warnings"])
    assert not tr["warnings"]
    assert out["Bernoulli latent"][1]["error"].startswith("NotImplementedError: All distributions in the guide")
    assert out["Bernoulli latent, validation off"][1]["error"] is None
    tr, mf = out["guide-only u, marked auxiliary"]
    assert mf["error"] is None and not tr["warnings"] and not mf["warnings"]
    tr, mf = out["guide-only u, not marked"]
    assert mf["error"] == "AssertionError" and any("non-auxiliary" in msg for _, msg in tr["warnings"])
    tr, mf = out["guide-only u, not marked, validation off"]
    assert mf["error"] == "AssertionError" and not tr["warnings"]
    tr, mf = out["model StudentT: no KL registered"]
    assert mf["value"] == pytest.approx(tr["value"], rel=1e-12)  # the per-site fallback is Trace_ELBO's term


def test_describe_outcome_and_tables_are_short():
    assert V.describe_outcome({"value": 1.5, "error": None, "warnings": []}) == "1.5000"
    outcome = {"value": None, "error": "E: " + "x" * 200, "warnings": [("W", "y" * 200)]}
    text = V.describe_outcome(outcome, width=20, warning_width=20)
    assert all(len(part) <= 20 for part in text.split("; "))
    assert V.html_table(["a", "b"], [[1, 2]]).count("<td ") == 2
    assert "nowrap" in V.html_table(["a"], [[1]], nowrap=True) and "nowrap" not in V.html_table(["a"], [[1]])


def test_site_columns_show_the_plate_scale(x):
    from elbo_terms import decompose

    vae = V.build_vae()
    with V.private_param_store(), seeded(18):
        d = decompose(V.make_model(vae), V.make_guide(vae), x, batch_size=V.BATCH)
    html = V.site_columns(d)
    assert html.count("<tr>") == 3 and f"{len(x) / V.BATCH:.4g} / {len(x) / V.BATCH:.4g}" in html
