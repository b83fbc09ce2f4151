"""``elbo_terms.decompose``: the contract of issue 3.

* same draws as Pyro: ``-decompose(...).elbo == Trace_ELBO(...).loss`` after the same seed
  (S = 1 and S > 1, vectorized or not; float64 to 1e-9, float32 to 1e-5) against a fresh
  ``Trace_ELBO``, and against a reused one when ``max_plate_nesting`` is passed;
* ``-elbo_mean_field == TraceMeanField_ELBO(...).loss`` wherever Pyro returns a number (closed-form
  KL where torch has one, Pyro's sampled fallback elsewhere), and None with a ``mean_field_note``
  where ``TraceMeanField_ELBO`` raises;
* plates and subsampling, several observed and latent sites, nested plates,
  ``poutine.scale``, masks, non-reparameterized guide sites, auxiliary guide sites;
* the param store ends as running the guide leaves it; no global state changes;
* bad input: a clear error (or, for the one-sided scale, a warning) naming the site.
"""

import json
import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from elbo_terms import decompose
from elbo_terms.decomposition import DecomposeError, Decomposition, ScaleMismatchWarning
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import constraints

N, B = 12, 4  # data size, subsample size


pytestmark = pytest.mark.usefixtures("pyro_float64")


def data(n=N, d=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (n,) if d is None else (n, d)
    return torch.randn(shape, generator=g, dtype=torch.get_default_dtype())


# ------------------------------------------------------------------------------ the models
# Each entry: (model, guide, args, mean_field) -- mean_field says every latent KL is analytic
# and every guide site reparameterized, so TraceMeanField_ELBO applies.


def conjugate():
    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    def guide(x):
        m = pyro.param("m", torch.tensor(0.3))
        s = pyro.param("s", torch.tensor(0.4), constraint=constraints.positive)
        pyro.sample("z", dist.Normal(m, s))

    return model, guide, (data(),), True


def local_latents_subsampled():
    """A global latent, a local latent per datum in a subsampled plate, two observed sites."""

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        with pyro.plate("data", N, subsample_size=B) as idx:
            w = pyro.sample("w", dist.Normal(mu, 1.0))
            pyro.sample("x", dist.Normal(w, 0.5), obs=x[idx])
            pyro.sample("y", dist.Normal(2 * w, 1.0), obs=x[idx] ** 2)

    def guide(x):
        a = pyro.param("a", torch.tensor(0.1))
        pyro.sample("mu", dist.Normal(a, 0.5))
        with pyro.plate("data", N, subsample_size=B) as idx:
            pyro.sample("w", dist.Normal(a * x[idx], 0.8))

    return model, guide, (data(),), True


def nested_plates():
    """Vector latents (to_event), nested plates, an Independent observed site."""

    def model(x):
        loc = pyro.sample("loc", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        with pyro.plate("groups", 2, dim=-2):
            shift = pyro.sample("shift", dist.Normal(0.0, 1.0))
            with pyro.plate("items", 4, dim=-1):
                pyro.sample("x", dist.Normal(loc + shift.unsqueeze(-1), 1.0).to_event(1), obs=x)

    def guide(x):
        p = pyro.param("p", torch.linspace(-1, 1, 3))
        pyro.sample("loc", dist.Normal(p, 0.5).to_event(1))
        with pyro.plate("groups", 2, dim=-2):
            pyro.sample("shift", dist.Normal(torch.tensor(0.2), 0.3))

    return model, guide, (data(8, 3).reshape(2, 4, 3),), True


def scaled_and_masked():
    """poutine.scale on a latent site in both programs (the correct beta), masks on latent and observed sites."""
    beta = 0.25
    obs_mask = torch.tensor([True, False] * (N // 2))

    def model(x):
        with poutine.scale(scale=beta):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", N):
            with poutine.mask(mask=obs_mask):
                pyro.sample("x", dist.Normal(z, 0.5), obs=x)
            pyro.sample("x2", dist.Normal(z, 2.0).mask(~obs_mask), obs=x)
        with poutine.scale(scale=3.0), poutine.mask(mask=torch.tensor([True, False, True])):
            with pyro.plate("three", 3):
                pyro.sample("u", dist.Normal(z, 1.0))

    def guide(x):
        with poutine.scale(scale=beta):
            pyro.sample("z", dist.Normal(0.1, 0.9))
        with poutine.scale(scale=3.0), poutine.mask(mask=torch.tensor([True, False, True])):
            with pyro.plate("three", 3):
                pyro.sample("u", dist.Normal(0.0, 1.5))

    return model, guide, (data(),), True


def non_reparameterized():
    """A Bernoulli latent (score-function site), a Gamma/LogNormal site without analytic KL, a factor."""

    def model(x):
        c = pyro.sample("c", dist.Bernoulli(0.3))
        rate = pyro.sample("rate", dist.Gamma(2.0, 2.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(c * 2.0 - 1.0, rate.rsqrt()), obs=x)
        pyro.factor("penalty", -0.1 * rate)

    def guide(x):
        q = pyro.param("q", torch.tensor(0.6), constraint=constraints.unit_interval)
        pyro.sample("c", dist.Bernoulli(q))
        pyro.sample("rate", dist.LogNormal(0.0, 0.3))

    return model, guide, (data(),), False


def auxiliary():
    """An auxiliary guide site (guide only, is_auxiliary): its log q counts, in both estimators."""

    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        a = pyro.sample("a", dist.Normal(0.0, 1.0), infer={"is_auxiliary": True})
        pyro.sample("z", dist.Normal(0.5 * a, 1.0))

    return model, guide, (data(),), True


def vae_like():
    """An amortized pair with torch modules and a minibatch plate (a tiny VAE)."""
    torch.manual_seed(0)
    dec = torch.nn.Sequential(torch.nn.Linear(2, 5), torch.nn.Tanh(), torch.nn.Linear(5, 6)).double()
    enc = torch.nn.Linear(6, 4).double()
    x = (data(N, 6) > 0).double()

    def model(x):
        pyro.module("dec", dec)
        with pyro.plate("batch", N, subsample_size=B) as idx:
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=dec(z)).to_event(1), obs=x[idx])

    def guide(x):
        pyro.module("enc", enc)
        with pyro.plate("batch", N, subsample_size=B) as idx:
            h = enc(x[idx])
            pyro.sample("z", dist.Normal(h[..., :2], torch.nn.functional.softplus(h[..., 2:])).to_event(1))

    return model, guide, (x,), True


MODELS = {
    "conjugate": conjugate,
    "local-latents-subsampled": local_latents_subsampled,
    "nested-plates": nested_plates,
    "scaled-and-masked": scaled_and_masked,
    "non-reparameterized": non_reparameterized,
    "auxiliary": auxiliary,
    "vae-like": vae_like,
}
PARTICLES = [(1, False), (1, True), (3, False), (3, True)]


def close(a, b, rtol=1e-9):
    assert math.isclose(a, b, rel_tol=rtol, abs_tol=rtol * 1e-3), (a, b)


def loss_and_terms(name, num_particles, vectorize, seed=7, estimator=Trace_ELBO, **extra):
    model, guide, args, _ = MODELS[name]()
    pyro.set_rng_seed(seed)
    loss = estimator(num_particles=num_particles, vectorize_particles=vectorize, **extra).loss(model, guide, *args)
    pyro.set_rng_seed(seed)
    terms = decompose(model, guide, *args, num_particles=num_particles, vectorize_particles=vectorize, **extra)
    return loss, terms


# ----------------------------------------------------------------------- same draws as Pyro
@pytest.mark.parametrize("num_particles,vectorize", PARTICLES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_equals_trace_elbo_on_the_same_draws(name, num_particles, vectorize):
    loss, terms = loss_and_terms(name, num_particles, vectorize)
    assert isinstance(terms, Decomposition)
    close(terms.loss, loss)
    close(-terms.elbo, loss)
    close(terms.reconstruction - terms.kl_mc, terms.elbo)
    close(terms.kl_mc, terms.log_q - terms.log_prior)


@pytest.mark.parametrize("num_particles,vectorize", PARTICLES)
@pytest.mark.parametrize("name", sorted(n for n, f in MODELS.items() if f()[3]))
def test_equals_trace_mean_field_elbo_on_the_same_draws(name, num_particles, vectorize):
    loss, terms = loss_and_terms(name, num_particles, vectorize, estimator=TraceMeanField_ELBO)
    assert terms.kl_analytic is not None and terms.mean_field_note is None
    close(-terms.elbo_mean_field, loss)
    close(terms.reconstruction - terms.kl_mean_field, terms.elbo_mean_field)


def mean_field_or_error(model, guide, args, seed=7, **options):
    """TraceMeanField_ELBO's loss (or the exception it raises) and decompose, on one seed."""
    pyro.set_rng_seed(seed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its site-order warning, the one-sided scale
            pyro_says = TraceMeanField_ELBO(**options).loss(model, guide, *args)
    except Exception as e:  # noqa: BLE001  (what Pyro raises is the point)
        pyro_says = e
    pyro.set_rng_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ScaleMismatchWarning)
        terms = decompose(model, guide, *args, **options)
    return pyro_says, terms


def assert_mirrors_mean_field(pyro_says, terms):
    """A number where Pyro gives one (equal on the same draws), None and a note naming Pyro's error where it raises."""
    if isinstance(pyro_says, Exception):
        assert terms.elbo_mean_field is None and terms.kl_mean_field is None, pyro_says
        assert type(pyro_says).__name__ in terms.mean_field_note
        assert all(row.kl_mean_field is None for row in terms.sites)
    else:
        assert terms.elbo_mean_field is not None, terms.mean_field_note
        close(-terms.elbo_mean_field, pyro_says)
        close(terms.reconstruction - terms.kl_mean_field, terms.elbo_mean_field)
        rows = [r.kl_mean_field for r in terms.sites if r.role != "observed" and r.kl_mean_field is not None]
        close(sum(rows), terms.kl_mean_field)


@pytest.mark.parametrize("validation", [True, False])
@pytest.mark.parametrize("num_particles,vectorize", PARTICLES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_mean_field_mirrors_pyro_for_every_model(name, num_particles, vectorize, validation):
    model, guide, args, _ = MODELS[name]()
    with pyro.validation_enabled(validation):
        pyro_says, terms = mean_field_or_error(
            model, guide, args, num_particles=num_particles, vectorize_particles=vectorize
        )
    assert_mirrors_mean_field(pyro_says, terms)


@pytest.mark.parametrize("vectorize", [False, True])
def test_float32_matches_to_1e_5(vectorize):
    torch.set_default_dtype(torch.float32)
    for name in ("local-latents-subsampled", "vae-like"):
        loss, terms = loss_and_terms(name, 3, vectorize)
        close(terms.loss, loss, rtol=1e-5)
        close(terms.reconstruction - terms.kl_mc, terms.elbo, rtol=1e-5)


def test_explicit_max_plate_nesting_is_passed_as_pyro_does():
    """With max_plate_nesting given, neither Pyro nor decompose makes the guessing run."""
    loss, terms = loss_and_terms("nested-plates", 4, True, max_plate_nesting=2)
    close(terms.loss, loss)


def test_rng_ends_where_trace_elbo_leaves_it():
    for num_particles, vectorize in PARTICLES:
        model, guide, args, _ = local_latents_subsampled()
        pyro.set_rng_seed(3)
        Trace_ELBO(num_particles=num_particles, vectorize_particles=vectorize).loss(model, guide, *args)
        after_pyro = torch.get_rng_state()
        pyro.set_rng_seed(3)
        decompose(model, guide, *args, num_particles=num_particles, vectorize_particles=vectorize)
        assert torch.equal(torch.get_rng_state(), after_pyro)


# ------------------------------------------------------------------- the terms and the table
@pytest.mark.parametrize("num_particles,vectorize", PARTICLES)
def test_per_particle_values_and_stderr(num_particles, vectorize):
    _, terms = loss_and_terms("local-latents-subsampled", num_particles, vectorize)
    for term in (
        "elbo",
        "reconstruction",
        "log_prior",
        "log_q",
        "kl_mc",
        "kl_analytic",
        "kl_mean_field",
        "elbo_mean_field",
    ):
        values = terms.per_particle[term]
        assert len(values) == num_particles
        close(sum(values) / num_particles, getattr(terms, term))
        if num_particles == 1:
            assert terms.stderr[term] is None
        else:
            t = torch.tensor(values)
            close(terms.stderr[term], float(t.std(unbiased=True)) / math.sqrt(num_particles))
    if num_particles > 1:
        assert len(set(terms.per_particle["elbo"])) == num_particles  # distinct draws


def test_vectorized_particles_are_the_same_draws_as_one_vectorized_trace_elbo_per_particle():
    """Per-particle ELBOs of the vectorized run average to the vectorized Trace_ELBO loss."""
    loss, terms = loss_and_terms("vae-like", 5, True)
    close(-sum(terms.per_particle["elbo"]) / 5, loss)


def test_sites_table_adds_up_to_the_terms():
    _, terms = loss_and_terms("scaled-and-masked", 3, False)
    rows = {r.name: r for r in terms.sites}
    assert terms.sites.names == ["z", "x", "x2", "u"]
    close(terms.reconstruction, rows["x"].log_p + rows["x2"].log_p)
    close(terms.log_prior, rows["z"].log_p + rows["u"].log_p)
    close(terms.log_q, rows["z"].log_q + rows["u"].log_q)
    close(terms.kl_analytic, rows["z"].kl_analytic + rows["u"].kl_analytic)
    assert rows["z"].scale == rows["z"].guide_scale == 0.25
    assert rows["u"].scale == 3.0 and rows["u"].masked
    assert rows["x"].role == rows["x2"].role == "observed" and rows["x"].masked
    assert rows["x2"].distribution == "Normal" and rows["x2"].masked  # masked through .mask()
    assert rows["z"].role == "latent" and rows["z"].estimator == "pathwise" and rows["z"].reparameterized


def test_sites_table_kl_estimators_and_roles():
    _, terms = loss_and_terms("non-reparameterized", 1, False)
    c, rate, penalty = terms.sites["c"], terms.sites["rate"], terms.sites["penalty"]
    assert c.estimator == "score function" and c.reparameterized is False
    assert c.kl_analytic is not None  # Bernoulli || Bernoulli is registered
    assert rate.estimator == "pathwise" and rate.kl_analytic is None  # LogNormal || Gamma is not
    assert terms.kl_analytic is None and terms.elbo_mean_field is None
    assert penalty.role == "observed" and penalty.distribution == "Unit (pyro.factor)"
    close(terms.reconstruction, terms.sites["x"].log_p + penalty.log_p)
    _, terms = loss_and_terms("auxiliary", 1, False)
    assert terms.sites["a"].role == "auxiliary" and terms.sites["a"].log_p is None
    close(terms.log_q, terms.sites["a"].log_q + terms.sites["z"].log_q)


def test_subsampling_scale_is_n_over_b():
    _, terms = loss_and_terms("local-latents-subsampled", 1, False)
    for name in ("w", "x", "y"):
        assert terms.sites[name].scale == N / B
    assert terms.sites["mu"].scale == 1.0
    assert terms.sites["w"].batch_shape == (B,)


def test_table_renders_as_html_and_is_plain_data():
    _, terms = loss_and_terms("vae-like", 2, True)
    html = terms.sites._repr_html_()
    assert "<table" in html and ">site</th>" in html and ">z</td>" in html and "overflow-x" in html
    assert "Independent(Bernoulli, 1)" in html and "pathwise" in html
    assert "<table" in terms._repr_html_() and "elbo_mean_field" in terms._repr_html_()
    text = repr(terms)
    assert "reconstruction" in text and "Independent(Normal, 1)" in text
    records = terms.sites.to_records()
    assert [r["name"] for r in records] == ["z", "x"] and records[0]["role"] == "latent"
    everything = json.loads(json.dumps(terms.to_dict()))
    assert everything["loss"] == terms.loss and len(everything["per_particle"]["elbo"]) == 2
    with pytest.raises(KeyError, match="no site named 'nope'"):
        terms.sites["nope"]


def test_fields_are_python_floats():
    _, terms = loss_and_terms("conjugate", 1, False)
    terms_ = ("elbo", "loss", "reconstruction", "log_prior", "log_q", "kl_mc", "kl_analytic", "kl_mean_field")
    for term in (*terms_, "elbo_mean_field"):
        assert type(getattr(terms, term)) is float
    assert terms.kl_mean_field == terms.kl_analytic and terms.mean_field_note is None


def test_dynamic_structure_counts_absent_sites_as_zero():
    """A site present in some particles only: Trace_ELBO handles it, so does decompose."""

    def model():
        c = pyro.sample("c", dist.Bernoulli(0.5))
        if c > 0:
            pyro.sample("extra", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(c, 1.0), obs=torch.tensor(0.3))

    def guide():
        c = pyro.sample("c", dist.Bernoulli(0.5))
        if c > 0:
            pyro.sample("extra", dist.Normal(1.0, 1.0))

    pyro.set_rng_seed(1)
    loss = Trace_ELBO(num_particles=8).loss(model, guide)
    pyro.set_rng_seed(1)
    terms = decompose(model, guide, num_particles=8)
    close(terms.loss, loss)
    close(terms.reconstruction - terms.kl_mc, terms.elbo)


@pytest.mark.parametrize("autoguide", ["AutoNormal", "AutoDiagonalNormal", "AutoNormalMessenger", "AutoDelta"])
@pytest.mark.parametrize("num_particles,vectorize", PARTICLES)
def test_autoguides_and_deterministic_sites(autoguide, num_particles, vectorize):
    """Pyro's autoguides (auxiliary sites, Delta sites, a GuideMessenger) and a pyro.deterministic site.

    An autoguide draws its initial values the first time it runs, so it is run once before
    the two evaluations that are compared.
    """
    from pyro.infer import autoguide as autoguides

    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        pyro.deterministic("twice_z", 2 * z)
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(z, s), obs=x)

    guide = getattr(autoguides, autoguide)(model)
    x = data()
    guide(x)
    options = dict(num_particles=num_particles, vectorize_particles=vectorize)
    pyro.set_rng_seed(2)
    loss = Trace_ELBO(**options).loss(model, guide, x)
    pyro.set_rng_seed(2)
    terms = decompose(model, guide, x, **options)
    close(terms.loss, loss)
    assert terms.sites["twice_z"].role == "deterministic" and terms.sites["twice_z"].log_p == 0.0
    if autoguide in ("AutoNormal", "AutoDiagonalNormal"):
        assert any(r.role == "auxiliary" for r in terms.sites)
    # every autoguide here gives TraceMeanField_ELBO a number; AutoNormalMessenger's through the
    # sampled fallback (torch has no KL between its TransformedDistribution site and the LogNormal prior)
    pyro_says, terms = mean_field_or_error(model, guide, (x,), seed=2, **options)
    assert not isinstance(pyro_says, Exception)
    assert_mirrors_mean_field(pyro_says, terms)
    if autoguide == "AutoNormalMessenger":
        assert terms.kl_analytic is None and terms.kl_mean_field is not None


# ------------------------------------------------------------------ param store, global state
def test_param_store_as_running_the_guide_leaves_it():
    model, guide, args, _ = vae_like()
    guide(*args)
    expected = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    pyro.clear_param_store()
    decompose(model, guide, *args, num_particles=2, vectorize_particles=True)
    store = pyro.get_param_store()
    names = set(store.keys())
    assert names >= set(expected) and all(n.startswith(("enc", "dec")) for n in names)
    for k, v in expected.items():
        assert torch.equal(store[k].detach(), v)
    for _, p in store.named_parameters():
        assert p.requires_grad and p.grad is None


def test_existing_params_are_used_not_reset():
    model, guide, args, _ = conjugate()
    pyro.param("m", torch.tensor(5.0))
    terms = decompose(model, guide, *args)
    assert float(pyro.param("m").detach()) == 5.0
    assert terms.sites["z"].log_q is not None


def test_no_global_state_changes_even_on_error():
    model, guide, args, _ = conjugate()
    state = (torch.is_grad_enabled(), torch.get_default_dtype(), pyro.infer.util.is_validation_enabled())
    decompose(model, guide, *args, num_particles=2, vectorize_particles=True)

    def broken_guide(x):
        raise ZeroDivisionError("boom")

    with pytest.raises(DecomposeError):
        decompose(model, broken_guide, *args)
    assert (torch.is_grad_enabled(), torch.get_default_dtype(), pyro.infer.util.is_validation_enabled()) == state
    from pyro.poutine.runtime import _PYRO_STACK

    assert _PYRO_STACK == []


def test_respects_validation_disabled():
    model, guide, args, _ = local_latents_subsampled()
    with pyro.validation_enabled(False):
        pyro.set_rng_seed(0)
        loss = Trace_ELBO().loss(model, guide, *args)
        pyro.set_rng_seed(0)
        close(decompose(model, guide, *args).loss, loss)
        assert not pyro.infer.util.is_validation_enabled()


# ------------------------------------------------------------------------------- bad input
def _conj_model(x):
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def _conj_guide(x):
    pyro.sample("z", dist.Normal(0.0, 1.0))


@pytest.mark.parametrize("validation", [True, False])
def test_guide_lacks_a_latent_site(validation):
    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        w = pyro.sample("w_missing", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z + w, 1.0), obs=x)

    with pyro.validation_enabled(validation), pytest.raises(DecomposeError, match="'w_missing'"):
        decompose(model, _conj_guide, torch.tensor(0.5))


@pytest.mark.parametrize("validation", [True, False])
def test_guide_has_a_site_the_model_lacks(validation):
    def guide(x):
        pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("stray", dist.Normal(0.0, 1.0))

    with pyro.validation_enabled(validation), pytest.raises(DecomposeError, match="'stray'.*model lacks"):
        decompose(_conj_model, guide, data())


def test_guide_samples_an_observed_site():
    def guide(x):
        pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(0.0, 1.0))

    with pytest.raises(DecomposeError, match="'x', which the model observes"):
        decompose(_conj_model, guide, data())


def test_site_needing_enumeration_in_the_model():
    def model(x):
        c = pyro.sample("c", dist.Bernoulli(0.5), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(c, 1.0), obs=x)

    def guide(x):
        pass

    with pytest.raises(DecomposeError, match="model site 'c' is marked for enumeration.*TraceEnum_ELBO"):
        decompose(model, guide, torch.tensor(0.5))


def test_site_needing_enumeration_in_the_guide():
    def model(x):
        c = pyro.sample("c", dist.Bernoulli(0.5))
        pyro.sample("x", dist.Normal(c, 1.0), obs=x)

    def guide(x):
        pyro.sample("c", dist.Bernoulli(0.3), infer={"enumerate": "sequential"})

    with pytest.raises(DecomposeError, match="guide site 'c' is marked for enumeration"):
        decompose(model, guide, torch.tensor(0.5))


def test_nan_log_prob_names_the_site():
    def guide(x):
        pyro.sample("z", dist.Normal(torch.tensor(float("nan")), 1.0))

    with pyro.validation_enabled(False), pytest.raises(DecomposeError, match="guide site 'z' is nan"):
        decompose(_conj_model, guide, data())


def test_infinite_log_prob_names_the_site():
    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("u", dist.Uniform(z - 1.0, z + 1.0), obs=z + 5.0)

    with pyro.validation_enabled(False), pytest.raises(DecomposeError, match="model site 'u' is -inf"):
        decompose(model, _conj_guide, None)


@pytest.mark.parametrize("num_particles,vectorize", PARTICLES)
def test_one_sided_scale_warns_and_says_what_the_objective_is(num_particles, vectorize):
    """The beta-VAE pitfall: poutine.scale around the prior only; Pyro says nothing."""

    def model(x):
        with poutine.scale(scale=0.1):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trace_ELBO(num_particles=num_particles, vectorize_particles=vectorize).loss(model, _conj_guide, data())
    with pytest.warns(ScaleMismatchWarning, match=r"'z' is scaled by 0\.1 in the model.*1 in the guide") as rec:
        terms = decompose(model, _conj_guide, data(), num_particles=num_particles, vectorize_particles=vectorize)
    assert len(rec) == 1  # once per site, not once per particle
    message = str(rec[0].message)
    assert "0.1 * KL(q||p) + (1 - 0.1) * H[q]" in message and "guide too" in message
    assert terms.sites["z"].scale == pytest.approx(0.1) and terms.sites["z"].guide_scale == 1.0


@pytest.mark.parametrize("num_particles,vectorize", PARTICLES)
def test_mean_field_kl_takes_the_guides_scale(num_particles, vectorize):
    """With scales that differ, TraceMeanField_ELBO weights the KL by the guide's factor; so does decompose."""

    def model(x):
        with poutine.scale(scale=0.2):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with poutine.scale(scale=0.7):
            pyro.sample("z", dist.Normal(0.4, 0.6))

    options = dict(num_particles=num_particles, vectorize_particles=vectorize)
    with pytest.warns(ScaleMismatchWarning):
        pyro.set_rng_seed(4)
        terms = decompose(model, guide, data(), **options)
    pyro.set_rng_seed(4)
    loss = TraceMeanField_ELBO(**options).loss(model, guide, data())
    close(-terms.elbo_mean_field, loss)
    kl = float(torch.distributions.kl_divergence(dist.Normal(0.4, 0.6), dist.Normal(0.0, 1.0)))
    close(terms.kl_analytic, 0.7 * kl)


def test_local_site_outside_the_guides_subsampled_plate_warns():
    """The model subsamples a plate of local latents, the guide forgets the plate: scales N/B vs 1.

    (Pyro's validation happens to reject this guide for its shape; without validation nothing does.)
    """

    def model(x):
        with pyro.plate("data", N, subsample_size=B) as idx:
            w = pyro.sample("w", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(w, 1.0), obs=x[idx])

    def guide(x):
        pyro.sample("w", dist.Normal(torch.zeros(B), 1.0))

    with pyro.validation_enabled(False), pytest.warns(ScaleMismatchWarning, match=r"'w' is scaled by 3 in the model"):
        decompose(model, guide, data())


def test_model_normalized_per_datum_but_not_the_guide_warns():
    """poutine.scale(model, 1/N) to get a per-datum loss, guide unscaled: log q no longer matches log p."""
    model = poutine.scale(_conj_model, scale=1.0 / N)
    with pytest.warns(ScaleMismatchWarning, match=r"'z' is scaled by 0\.0833333 in the model.*by 1 in the guide"):
        decompose(model, _conj_guide, data())


def test_same_scale_both_sides_does_not_warn():
    model, guide, args, _ = scaled_and_masked()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decompose(model, guide, *args, num_particles=2)


@pytest.mark.parametrize("validation", [True, False])
def test_observed_value_with_the_wrong_shape(validation):
    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[:, None])  # (N, 1) against batch (N,)

    with pyro.validation_enabled(validation), pytest.raises(DecomposeError, match=r"model site 'x'.*\(12, 12\)"):
        decompose(model, _conj_guide, data())


def test_observed_data_shared_by_vectorized_particles_is_fine():
    model, guide, args, _ = conjugate()
    terms = decompose(model, guide, *args, num_particles=4, vectorize_particles=True)
    assert terms.sites["x"].batch_shape == (4, N)


@pytest.mark.parametrize("which", ["model", "guide"])
def test_a_program_that_raises(which):
    def broken(x):
        raise KeyError("no such column")

    model, guide = (broken, _conj_guide) if which == "model" else (_conj_model, broken)
    with pytest.raises(DecomposeError, match=f"the {which} raised KeyError.*particle 1 of 1") as info:
        decompose(model, guide, data())
    assert isinstance(info.value.__cause__, KeyError)


def test_bad_options():
    with pytest.raises(ValueError, match="num_particles"):
        decompose(_conj_model, _conj_guide, data(), num_particles=0)
    with pytest.raises(ValueError, match="max_plate_nesting"):
        decompose(_conj_model, _conj_guide, data(), max_plate_nesting=-1)
    with pytest.raises(TypeError, match="callables"):
        decompose("model", _conj_guide, data())


# ------------------------------------------------- broadcast values (maintainer finding 1)
def _soft_constraint_model(x):
    """A scalar obs inside a plate: the value 0 is scored by each of the plate's distributions."""
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    with pyro.plate("d", len(x)):
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)
        pyro.sample("soft", dist.Normal(z - x, 0.5), obs=torch.tensor(0.0))


@pytest.mark.parametrize("num_particles,vectorize", PARTICLES)
def test_a_broadcast_observed_value_is_accepted(num_particles, vectorize):
    options = dict(num_particles=num_particles, vectorize_particles=vectorize)
    pyro.set_rng_seed(5)
    loss = Trace_ELBO(**options).loss(_soft_constraint_model, _conj_guide, data())
    pyro.set_rng_seed(5)
    terms = decompose(_soft_constraint_model, _conj_guide, data(), **options)
    close(terms.loss, loss)
    assert terms.sites["soft"].role == "observed"
    close(terms.reconstruction, terms.sites["x"].log_p + terms.sites["soft"].log_p)
    pyro_says, terms = mean_field_or_error(_soft_constraint_model, _conj_guide, (data(),), seed=5, **options)
    assert_mirrors_mean_field(pyro_says, terms)


def test_value_and_distribution_broadcasting_each_other_is_refused_even_with_vectorized_particles():
    """The (N, 1) obs against an (N,) batch: refused with the site's name whatever the particle setting."""

    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[:, None])

    for num_particles, vectorize in PARTICLES:
        with pytest.raises(DecomposeError, match="model site 'x'"):
            decompose(model, _conj_guide, data(), num_particles=num_particles, vectorize_particles=vectorize)


@pytest.mark.parametrize("validation", [True, False])
def test_a_shape_only_pyros_validation_rejects(validation):
    """Data of shape (N,) under one scalar distribution, no plate: each datum counted once.

    Pyro's validation rejects it (no plate declares the data dim): decompose says so, naming
    the site; without validation both sum the N terms.
    """

    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    with pyro.validation_enabled(validation):
        pyro.set_rng_seed(0)
        try:
            loss = Trace_ELBO().loss(model, _conj_guide, data())
        except ValueError as e:
            loss = e
        pyro.set_rng_seed(0)
        if validation:
            assert isinstance(loss, ValueError) and "invalid log_prob shape" in str(loss)
            with pytest.raises(DecomposeError, match="model site 'x': Pyro's validation rejects its shape"):
                decompose(model, _conj_guide, data())
        else:
            close(decompose(model, _conj_guide, data()).loss, loss)


# ----------------------------------------- a fresh or a reused Trace_ELBO (maintainer finding 3)
def test_same_draws_as_a_fresh_trace_elbo_and_as_a_reused_one_given_max_plate_nesting():
    """A vectorized Trace_ELBO guesses max_plate_nesting on its first call only.

    decompose (without max_plate_nesting) makes the guessing run on every call, as a fresh
    Trace_ELBO does; against a reused one (an SVI loss after its first step) pass
    max_plate_nesting, and neither makes the run.
    """
    model, guide, args, _ = local_latents_subsampled()
    options = dict(num_particles=4, vectorize_particles=True)
    elbo = Trace_ELBO(**options)
    pyro.set_rng_seed(0)
    first = elbo.loss(model, guide, *args)  # a fresh Trace_ELBO: it guesses
    pyro.set_rng_seed(0)
    close(decompose(model, guide, *args, **options).loss, first)
    assert elbo.max_plate_nesting == 2  # guessed 1, plus the particle plate

    pyro.set_rng_seed(1)
    again = elbo.loss(model, guide, *args)  # reused: no guessing run
    pyro.set_rng_seed(1)
    out_of_step = decompose(model, guide, *args, **options)
    assert not math.isclose(out_of_step.loss, again, rel_tol=1e-6)
    pyro.set_rng_seed(1)
    close(decompose(model, guide, *args, max_plate_nesting=1, **options).loss, again)


def test_inside_svi_after_the_first_step():
    from pyro.infer import SVI
    from pyro.optim import Adam

    model, guide, args, _ = local_latents_subsampled()
    options = dict(num_particles=3, vectorize_particles=True)
    svi = SVI(model, guide, Adam({"lr": 0.01}), Trace_ELBO(**options))
    svi.step(*args)
    pyro.set_rng_seed(3)
    loss = svi.evaluate_loss(*args)
    pyro.set_rng_seed(3)
    close(decompose(model, guide, *args, max_plate_nesting=1, **options).loss, loss)


# -------------------------------------------- TraceMeanField_ELBO's own rules (maintainer finding 4)
def test_mean_field_falls_back_to_the_sampled_term_where_torch_has_no_kl():
    """Normal || Normal in closed form, LogNormal || Gamma sampled: Pyro's per-site fallback."""

    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        rate = pyro.sample("rate", dist.Gamma(2.0, 2.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(z, rate.rsqrt()), obs=x)

    def guide(x):
        pyro.sample("z", dist.Normal(0.2, 0.7))
        pyro.sample("rate", dist.LogNormal(0.1, 0.3))

    for num_particles, vectorize in PARTICLES:
        options = dict(num_particles=num_particles, vectorize_particles=vectorize)
        pyro_says, terms = mean_field_or_error(model, guide, (data(),), **options)
        assert_mirrors_mean_field(pyro_says, terms)
        z, rate = terms.sites["z"], terms.sites["rate"]
        assert terms.kl_analytic is None and rate.kl_analytic is None
        assert z.kl_mean_field == z.kl_analytic
        close(rate.kl_mean_field, rate.log_q - rate.log_p)
        assert terms.mean_field_note is None


def test_mean_field_none_for_a_deterministic_site_in_the_guide_only():
    def guide(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.deterministic("z_twice", 2 * z)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Pyro: "non-auxiliary vars in guide but not model"
        pyro_says, terms = mean_field_or_error(_conj_model, guide, (data(),))
    assert isinstance(pyro_says, AssertionError)
    assert_mirrors_mean_field(pyro_says, terms)
    assert "'z_twice'" in terms.mean_field_note and "is_auxiliary" in terms.mean_field_note
    pyro.set_rng_seed(7)
    with pytest.warns(UserWarning, match="non-auxiliary vars in guide"):
        close(terms.loss, Trace_ELBO().loss(_conj_model, guide, data()))  # Trace_ELBO gives a number


def _coin_model(x):
    c = pyro.sample("c", dist.Bernoulli(0.3))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(c, 1.0), obs=x)


def _coin_guide(x):
    pyro.sample("c", dist.Bernoulli(0.6))


@pytest.mark.parametrize("num_particles,vectorize", PARTICLES)
def test_mean_field_with_a_score_function_site(num_particles, vectorize):
    """Bernoulli || Bernoulli has a closed form, but the guide site is not reparameterized.

    Validation on: TraceMeanField_ELBO raises NotImplementedError, decompose gives None and says
    why.  Validation off: Pyro's number (closed-form KL), which decompose matches, with a note.
    """
    options = dict(num_particles=num_particles, vectorize_particles=vectorize)
    pyro_says, terms = mean_field_or_error(_coin_model, _coin_guide, (data(),), **options)
    assert isinstance(pyro_says, NotImplementedError)
    assert_mirrors_mean_field(pyro_says, terms)
    assert "'c'" in terms.mean_field_note and "reparameterized" in terms.mean_field_note
    assert terms.kl_analytic is not None  # the closed form itself exists
    with pyro.validation_enabled(False):
        pyro_says, terms = mean_field_or_error(_coin_model, _coin_guide, (data(),), **options)
    assert_mirrors_mean_field(pyro_says, terms)
    assert "score-function term" in terms.mean_field_note
    close(terms.kl_mean_field, terms.kl_analytic)


@pytest.mark.parametrize("validation", [True, False])
def test_mean_field_with_a_score_function_site_without_a_closed_form(validation):
    """Poisson prior, Geometric guide: Pyro raises (NotImplementedError, or AttributeError without validation)."""

    def model(x):
        n = pyro.sample("n", dist.Poisson(2.0))
        pyro.sample("x", dist.Normal(n, 1.0), obs=x)

    def guide(x):
        pyro.sample("n", dist.Geometric(0.3))

    with pyro.validation_enabled(validation):
        pyro_says, terms = mean_field_or_error(model, guide, (torch.tensor(1.5),))
    assert isinstance(pyro_says, NotImplementedError if validation else AttributeError)
    assert_mirrors_mean_field(pyro_says, terms)
    assert "'n'" in terms.mean_field_note


@pytest.mark.parametrize("validation", [True, False])
def test_mean_field_with_a_score_function_auxiliary_site(validation):
    def guide(x):
        a = pyro.sample("a", dist.Bernoulli(0.5), infer={"is_auxiliary": True})
        pyro.sample("z", dist.Normal(a, 1.0))

    with pyro.validation_enabled(validation):
        pyro_says, terms = mean_field_or_error(_conj_model, guide, (data(),))
    assert isinstance(pyro_says, NotImplementedError if validation else AttributeError)
    assert_mirrors_mean_field(pyro_says, terms)
    assert "'a'" in terms.mean_field_note


def test_mean_field_kl_shape_assertion():
    """A local latent in the model's plate, one scalar guide site: Pyro's KL shape assertion fails.

    (With validation on, Pyro's model/guide shape check refuses the pair first, for Trace_ELBO too.)
    """

    def model(x):
        with pyro.plate("data", len(x)):
            w = pyro.sample("w", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(w, 1.0), obs=x)

    def guide(x):
        pyro.sample("w", dist.Normal(0.2, 1.0))

    with pyro.validation_enabled(False):
        pyro_says, terms = mean_field_or_error(model, guide, (data(),))
    assert isinstance(pyro_says, AssertionError)
    assert_mirrors_mean_field(pyro_says, terms)
    assert "'w'" in terms.mean_field_note and "batch shape" in terms.mean_field_note
    with pytest.raises(DecomposeError, match="'w'"):
        decompose(model, guide, data())


def test_mean_field_note_in_the_summary():
    terms = decompose(_coin_model, _coin_guide, data())
    assert "mean field: TraceMeanField_ELBO raises NotImplementedError" in repr(terms)
    assert "decompose-note" in terms._repr_html_()
    assert terms.to_dict()["mean_field_note"] == terms.mean_field_note


# ------------------------------------------------------------------ the table's columns
def test_site_table_columns():
    _, terms = loss_and_terms("vae-like", 2, True)
    narrow = terms.sites._repr_html_()
    assert ">batch | event shape</th>" not in narrow and ">KL(q‖p)</th>" in narrow and ">log q</th>" in narrow
    assert ">scale p / q</th>" not in narrow and ">scale p / q</th>" in terms.sites.show("all")._repr_html_()
    wide = terms.sites.show("all")
    assert wide.names == terms.sites.names and ">batch | event shape</th>" in wide._repr_html_()
    assert ">mean-field KL</th>" in wide._repr_html_() and "(2, 4) | (2,)" in repr(wide)
    picked = terms.sites.show("name", "log_p")
    assert repr(picked).splitlines()[0].split() == ["site", "log", "p"]
    assert {"batch_shape", "kl_mean_field", "estimator"} <= set(terms.sites.to_records()[0])
    with pytest.raises(ValueError, match="unknown columns"):
        terms.sites.show("nope")


# ------------------------------------------------------------- issue 13: decompose on real models
def test_item1_vectorized_particles_paired_with_a_stray_data_dim():
    """obs of shape (N, 1) in a plate of N, with N vectorized particles: particle k met only x[k].

    Pyro's Trace_ELBO returns a number (silently); decompose refuses, naming the site and saying so.
    """

    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", N):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    column = data()[:, None]
    options = dict(num_particles=N, vectorize_particles=True, max_plate_nesting=1)
    with pyro.validation_enabled(True):
        Trace_ELBO(**options).loss(model, _conj_guide, column)  # Pyro: no error
    with pytest.raises(
        DecomposeError, match=r"model site 'x'.*vectorized particles.*Trace_ELBO computes this silently"
    ):
        decompose(model, _conj_guide, column, **options)
    # the same model with data of shape (N,) is fine, and so is a value computed from the particles' draws
    decompose(model, _conj_guide, data(), **options)

    def soft(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", N):
            pyro.sample("x", dist.Normal(x, 1.0), obs=z + torch.zeros(1))

    decompose(soft, _conj_guide, data(), **options)


@pytest.mark.parametrize("validation", [True, False])
def test_item2_event_dims_that_broadcast_are_refused_whatever_the_validation_flag(validation):
    def model_latent(x):
        pyro.sample("z", dist.Normal(torch.zeros(1, 2), 1.0).to_event(2))

    def guide_latent(x):
        pyro.sample("z", dist.Normal(torch.zeros(2, 2), 1.0).to_event(2))

    def model_obs(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z * torch.ones(1, 2), 1.0).to_event(2), obs=x)

    with pyro.validation_enabled(validation):
        # with validation on, Pyro's own model/guide shape check names the site first
        pattern = r"site 'z'" if validation else r"site 'z'.*event shape \(1, 2\)"
        with pytest.raises(DecomposeError, match=pattern):
            decompose(model_latent, guide_latent, None)
        with pytest.raises(DecomposeError, match=r"model site 'x'.*event shape \(1, 2\)"):
            decompose(model_obs, _conj_guide, torch.zeros(2, 1))


@pytest.mark.parametrize("validation", [True, False])
@pytest.mark.parametrize("mpn", [None, 1])
def test_item3_a_latent_with_an_extra_batch_dim_hidden_by_max_plate_nesting(validation, mpn):
    def model(x):
        with pyro.plate("data", 4):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", 4):
            pyro.sample("z", dist.Normal(torch.zeros(4, 1), 1.0))

    x = data(4)
    if mpn == 1:
        with pyro.validation_enabled(validation):
            Trace_ELBO(max_plate_nesting=1).loss(model, guide, x)  # Pyro: accepted silently
    # with validation and the default nesting, Pyro's own check names the site first
    pattern = r"site 'z'.*\(4, 4\)" if mpn == 1 or not validation else r"site 'z'"
    with pyro.validation_enabled(validation), pytest.raises(DecomposeError, match=pattern):
        decompose(model, guide, x, max_plate_nesting=mpn)


def test_item4_a_mask_on_one_side_only_warns_like_a_one_sided_scale():
    mask = torch.tensor([True, False, True])

    def model(x):
        with pyro.plate("three", 3), poutine.mask(mask=mask):
            pyro.sample("u", dist.Normal(0.0, 1.0))

    def guide(x):
        with pyro.plate("three", 3):
            pyro.sample("u", dist.Normal(0.3, 0.5))

    with pytest.warns(ScaleMismatchWarning, match=r"'u' is masked by \[True, False, True\] in the model but not "):
        decompose(model, guide, None)
    with warnings.catch_warnings():  # the same mask on both sides: no warning
        warnings.simplefilter("error")
        decompose(model, poutine.mask(guide, mask=mask), None)


def test_item5_a_log_prob_shape_error_is_a_decompose_error_naming_the_site_with_the_cause():
    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z * torch.ones(3), 1.0).to_event(1), obs=x)

    with pyro.validation_enabled(False):
        with pytest.raises(DecomposeError, match=r"model site 'x'") as info:
            decompose(model, _conj_guide, torch.zeros(4))
    assert isinstance(info.value, ValueError)


def test_item5_a_nan_factor_names_the_site_and_chains_pyros_error():
    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.factor("penalty", z * float("nan"))

    with pyro.validation_enabled(True), pytest.raises(DecomposeError, match=r"at site 'penalty'") as info:
        decompose(model, _conj_guide, None)
    assert isinstance(info.value.__cause__, ValueError)
    with pyro.validation_enabled(False), pytest.raises(DecomposeError, match=r"model site 'penalty' is nan"):
        decompose(model, _conj_guide, None)


def test_item5_a_program_that_raises_is_a_decompose_error_with_the_cause():
    def guide(x):
        pyro.sample("z", dist.Normal(0.0, -1.0))  # a negative scale: torch's validation raises inside pyro.sample

    with pytest.raises(DecomposeError, match=r"the guide raised ValueError") as info:
        decompose(_conj_model, guide, data())
    assert isinstance(info.value.__cause__, ValueError)


def test_item6_the_classes_import_from_the_package():
    import elbo_terms

    assert elbo_terms.DecomposeError is DecomposeError and issubclass(DecomposeError, ValueError)
    assert elbo_terms.ScaleMismatchWarning is ScaleMismatchWarning
    assert elbo_terms.Decomposition is Decomposition


def test_item7_model_kwargs_named_like_an_option_pass_through():
    def model(x, num_particles=1):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(z, float(num_particles)), obs=x)

    def guide(x, num_particles=1):
        pyro.sample("z", dist.Normal(0.2, 0.5))

    pyro.set_rng_seed(0)
    loss = Trace_ELBO(num_particles=2).loss(model, guide, data(), num_particles=3)
    pyro.set_rng_seed(0)
    terms = decompose(model, guide, data(), num_particles=2, model_kwargs={"num_particles": 3})
    assert terms.loss == loss and terms.num_particles == 2
    with pytest.raises(TypeError, match="both directly and in model_kwargs"):
        decompose(model, guide, data(), model_kwargs={"y": 1}, y=2)


def test_item8_one_warning_per_call_listing_the_sites_with_tensor_scales_by_value():
    T = 8

    def model(x):
        for t in range(T):
            with poutine.scale(scale=0.5):
                pyro.sample(f"z_{t}", dist.Normal(0.0, 1.0))

    def guide(x):
        for t in range(T):
            pyro.sample(f"z_{t}", dist.Normal(0.0, 1.0))

    with pytest.warns(ScaleMismatchWarning) as rec:
        decompose(model, guide, None, num_particles=3)
    assert len(rec) == 1
    assert "latent sites 'z_0', 'z_1'" in str(rec[0].message) and "'z_7' are scaled by 0.5" in str(rec[0].message)

    def tensor_scaled(x):
        with pyro.plate("two", 2), poutine.scale(scale=torch.tensor([1.0, 1e-9])):
            pyro.sample("w", dist.Normal(0.0, 1.0))

    def tensor_guide(x):
        with pyro.plate("two", 2):
            pyro.sample("w", dist.Normal(0.0, 1.0))

    with pytest.warns(ScaleMismatchWarning, match=r"'w' is scaled by \[1, 1e-09\] in the model") as rec:
        terms = decompose(tensor_scaled, tensor_guide, None)
    assert len(rec) == 1 and "tensor(" not in str(rec[0].message)
    assert terms.sites["w"].scale == "[1, 1e-09]"


@pytest.mark.parametrize("vectorize", [False, True])
def test_item10_float32_terms_accumulate_in_float64_and_loss_stays_bit_identical(vectorize):
    """A float32 VAE with large terms: Pyro's float32 sum rounds, decompose's float64 terms add up."""
    torch.set_default_dtype(torch.float32)
    x = (data(N, 6) > 0).float()
    options = dict(num_particles=3, vectorize_particles=vectorize, max_plate_nesting=1)
    torch.manual_seed(0)
    dec = torch.nn.Sequential(torch.nn.Linear(2, 5), torch.nn.Tanh(), torch.nn.Linear(5, 6))
    enc = torch.nn.Linear(6, 4)

    def model(x):
        pyro.module("dec", dec)
        with pyro.plate("batch", N, subsample_size=B) as idx:
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=dec(z)).to_event(1), obs=x[idx] * 1000.0)

    def guide(x):
        pyro.module("enc", enc)
        with pyro.plate("batch", N, subsample_size=B) as idx:
            h = enc(x[idx])
            pyro.sample("z", dist.Normal(h[..., :2], torch.nn.functional.softplus(h[..., 2:])).to_event(1))

    with pyro.validation_enabled(False):
        pyro.set_rng_seed(1)
        loss = Trace_ELBO(**options).loss(model, guide, x)
        pyro.set_rng_seed(1)
        terms = decompose(model, guide, x, **options)
    assert terms.loss == loss  # bit-identical
    assert math.isclose(terms.reconstruction - terms.kl_mc, terms.elbo, rel_tol=1e-15)
    assert math.isclose(terms.elbo, math.fsum(terms.per_particle["elbo"]) / 3, rel_tol=1e-15)
    assert math.isclose(-terms.loss, terms.elbo, rel_tol=1e-6)  # float32 rounding of Pyro's own sum
