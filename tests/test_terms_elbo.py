"""``elbo_terms.TermsTrace_ELBO`` / ``TermsTraceMeanField_ELBO`` (issue 18): a drop-in ELBO that keeps its terms.

* same draws, same numbers: training the book's example VAE with the recorder and with Pyro's
  class from one seed gives bit-identical losses per step and parameters at the end
  (sequential and vectorized particles, with and without a subsampled plate, with a beta scale
  on both sides; loss_and_grads, loss, differentiable_loss, the ELBOModule form);
* per record, reconstruction - kl_mc == elbo == -loss (float64) and the record equals
  ``decompose`` on the same draws;
* every=k, max_history, plot(); refusals and the one-sided scale warning on the first step;
* the Pyro version guard (``elbo_terms._versions``).
"""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from elbo_terms import (
    DecomposeError,
    ScaleMismatchWarning,
    TermsRecord,
    TermsTrace_ELBO,
    TermsTraceMeanField_ELBO,
    UntestedPyroError,
    decompose,
)
from elbo_terms import _versions as V
from elbo_terms.chapters.decompose_checks import example_data, example_vae
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.optim import Adam

STEPS = 3
BETA = 0.5
PYRO_CLASS = {TermsTrace_ELBO: Trace_ELBO, TermsTraceMeanField_ELBO: TraceMeanField_ELBO}
OPTIONS = {
    "sequential": dict(num_particles=2),
    "vectorized": dict(num_particles=3, vectorize_particles=True, max_plate_nesting=1),
    "vectorized-guessed": dict(num_particles=3, vectorize_particles=True),
}


pytestmark = pytest.mark.usefixtures("pyro_float64")


def vae(subsample=True, beta=None):
    """The book's example VAE (its minibatch plate, or the whole data), optionally with beta on both sides."""
    x = example_data()[:96]
    model, guide = example_vae(batch_size=24 if subsample else len(x), hidden=16)
    if beta == "all":  # poutine.scale around both programs
        model, guide = poutine.scale(model, scale=BETA), poutine.scale(guide, scale=BETA)
    elif beta == "z":  # beta on the latent site only, in both programs (a beta-VAE)
        model, guide = _beta_on_z(model, BETA), _beta_on_z(guide, BETA)
    return model, guide, x


def _beta_on_z(fn, beta):
    """poutine.scale(beta) on the site z only (the KL of a beta-VAE), for model or guide."""

    class OnZ(poutine.messenger.Messenger):
        def _pyro_sample(self, msg):
            if msg["name"] == "z":
                msg["scale"] = msg["scale"] * beta

    return OnZ()(fn)


def train(elbo_class, make, steps=STEPS, seed=0, **options):
    """Train a fresh pair from ``make()`` (its torch modules are new: training changes them in place)."""
    pyro.clear_param_store()
    model, guide, x = make()
    pyro.set_rng_seed(seed)
    elbo = elbo_class(**options)
    svi = SVI(model, guide, Adam({"lr": 1e-2}), elbo)
    losses = [svi.step(x) for _ in range(steps)]
    params = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    return losses, params, elbo


def assert_identities(record: TermsRecord, mean_field=False):
    assert math.isclose(record.reconstruction - record.kl_mc, record.elbo, rel_tol=1e-12)
    assert math.isclose(record.log_q - record.log_prior, record.kl_mc, rel_tol=1e-12, abs_tol=1e-9)
    if mean_field:
        assert math.isclose(-record.loss, record.reconstruction - record.kl_mean_field, rel_tol=1e-12)
    else:
        assert math.isclose(-record.loss, record.elbo, rel_tol=1e-12)


# --------------------------------------------------------------------- same draws, same numbers
CASES = [(setting, subsample, None) for setting in sorted(OPTIONS) for subsample in (True, False)]
CASES += [("vectorized", True, "z"), ("sequential", True, "z"), ("vectorized", True, "all")]


@pytest.mark.parametrize("setting,subsample,beta", CASES)
@pytest.mark.parametrize("elbo_class", [TermsTrace_ELBO, TermsTraceMeanField_ELBO])
def test_training_is_bit_identical_to_pyros_class(elbo_class, setting, subsample, beta):
    options = OPTIONS[setting]
    ours = train(elbo_class, lambda: vae(subsample, beta), **options)
    theirs = train(PYRO_CLASS[elbo_class], lambda: vae(subsample, beta), **options)
    assert ours[0] == theirs[0]  # every loss, bit for bit
    assert ours[1].keys() == theirs[1].keys()
    assert all(torch.equal(ours[1][k], theirs[1][k]) for k in ours[1])
    history = ours[2].history
    assert [r.step for r in history] == list(range(STEPS)) and [r.loss for r in history] == ours[0]
    for record in history:
        assert_identities(record, mean_field=elbo_class is TermsTraceMeanField_ELBO)
        assert record.kl_analytic is not None  # a Normal guide against a Normal prior
    if beta == "z":
        assert {k: dict(v) for k, v in history[0].scaled.items()} == {"log_prior": {"z": BETA}, "log_q": {"z": BETA}}
    elif beta == "all":
        assert set(history[0].scaled) == {"reconstruction", "log_prior", "log_q"}
    else:
        assert dict(history[0].scaled) == {}  # the N/B of subsampling is not a poutine.scale


@pytest.mark.parametrize("setting", ["sequential", "vectorized"])
def test_float32_training_is_bit_identical(setting):
    torch.set_default_dtype(torch.float32)
    ours = train(TermsTrace_ELBO, vae, **OPTIONS[setting])
    theirs = train(Trace_ELBO, vae, **OPTIONS[setting])
    assert ours[0] == theirs[0]
    assert all(torch.equal(ours[1][k], theirs[1][k]) for k in ours[1])
    for record in ours[2].history:
        assert math.isclose(record.reconstruction - record.kl_mc, record.elbo, rel_tol=1e-12)
        # Pyro adds each site's float32 sum; the record sums every site in float64: float32 rounding apart
        assert math.isclose(-record.loss, record.elbo, rel_tol=1e-6)


@pytest.mark.parametrize("setting", ["sequential", "vectorized"])
@pytest.mark.parametrize("elbo_class", [TermsTrace_ELBO, TermsTraceMeanField_ELBO])
def test_loss_and_differentiable_loss_and_the_module_form(elbo_class, setting):
    model, guide, x = vae()
    options = OPTIONS[setting]
    guide(x)  # create the parameters
    ours, theirs = elbo_class(**options), PYRO_CLASS[elbo_class](**options)
    for method in ("loss", "differentiable_loss"):
        values = []
        for elbo in (ours, theirs):
            pyro.set_rng_seed(3)
            values.append(getattr(elbo, method)(model, guide, x))
        assert torch.equal(torch.as_tensor(values[0]), torch.as_tensor(values[1])), method
    # the module form: elbo(model, guide) is a torch.nn.Module whose forward is differentiable_loss
    grads = []
    for elbo in (ours, theirs):
        module = elbo(model, guide)
        pyro.set_rng_seed(4)
        loss = module(x)
        params = [p for _, p in sorted(pyro.get_param_store().named_parameters())]
        grads.append(torch.autograd.grad(loss, params))
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    assert [r.step for r in ours.history] == [0, 1, 2]
    for record in ours.history:
        assert math.isclose(record.reconstruction - record.kl_mc, record.elbo, rel_tol=1e-12)


@pytest.mark.parametrize("setting", sorted(OPTIONS))
@pytest.mark.parametrize("elbo_class", [TermsTrace_ELBO, TermsTraceMeanField_ELBO])
def test_a_record_is_decompose_on_the_same_draws(elbo_class, setting):
    model, guide, x = vae()
    options = OPTIONS[setting]
    guide(x)
    pyro.set_rng_seed(5)
    recorder = elbo_class(**options)
    recorder.loss(model, guide, x)
    record = recorder.history[-1]
    pyro.set_rng_seed(5)
    terms = decompose(model, guide, x, **options)
    assert record.loss == (terms.loss if elbo_class is TermsTrace_ELBO else -terms.elbo_mean_field) or math.isclose(
        record.loss, -terms.elbo_mean_field, rel_tol=1e-12
    )
    for name in ("elbo", "reconstruction", "log_prior", "log_q", "kl_mc", "kl_analytic"):
        assert getattr(record, name) == getattr(terms, name), name  # the same code on the same draws
    if elbo_class is TermsTraceMeanField_ELBO:
        assert record.kl_mean_field == terms.kl_mean_field
    else:
        assert record.kl_mean_field is None


# ------------------------------------------------------------------------- thinning, bounds, plot
def test_every_and_max_history():
    losses, _, elbo = train(TermsTrace_ELBO, vae, steps=10, every=3, max_history=2, num_particles=1)
    assert elbo.evaluations == 10
    assert [r.step for r in elbo.history] == [6, 9]
    assert [r.loss for r in elbo.history] == [losses[6], losses[9]]
    cols = elbo.columns()
    assert cols["step"] == [6, 9] and len(cols["kl_mc"]) == 2
    elbo.clear()
    assert len(elbo.history) == 0
    with pytest.raises(ValueError, match="every"):
        TermsTrace_ELBO(every=0)
    with pytest.raises(ValueError, match="max_history"):
        TermsTrace_ELBO(max_history=0)


def test_plot_returns_a_figure():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    *_, elbo = train(TermsTraceMeanField_ELBO, vae, steps=3, num_particles=1)
    fig = elbo.plot(title="example")
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    labels = [line.get_label() for line in fig.axes[1].get_lines()]
    assert labels == ["kl_mc (sampled)", "kl_analytic", "kl_mean_field"]
    with pytest.raises(ValueError, match="nothing recorded"):
        TermsTrace_ELBO().plot()


# ------------------------------------------------------------------------------------ bad input
def _model(x):
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def _guide(x):
    m = pyro.param("m", torch.tensor(0.1))
    pyro.sample("z", dist.Normal(m, 1.0))


def test_refuses_a_guide_lacking_a_latent_on_the_first_step():
    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        w = pyro.sample("w_missing", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(z + w, 1.0), obs=x)

    svi = SVI(model, _guide, Adam({"lr": 0.1}), TermsTrace_ELBO())
    with pytest.raises(DecomposeError, match="'w_missing'"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        svi.step(torch.zeros(3))
    assert pyro.param("m").item() == pytest.approx(0.1)  # no step was taken


def test_refuses_an_enumerated_site():
    def model(x):
        c = pyro.sample("c", dist.Bernoulli(0.5))
        pyro.sample("x", dist.Normal(c, 1.0), obs=x)

    def guide(x):
        pyro.sample("c", dist.Bernoulli(0.5), infer={"enumerate": "sequential"})

    with pytest.raises(DecomposeError, match="guide site 'c' is marked for enumeration"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        TermsTrace_ELBO().loss(model, guide, torch.tensor(0.5))


def test_one_sided_scale_warns_once():
    def model(x):
        with poutine.scale(scale=0.1):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    elbo = TermsTrace_ELBO()
    with pytest.warns(ScaleMismatchWarning, match="'z' is scaled by 0.1") as rec:
        for _ in range(3):
            elbo.loss(model, _guide, torch.zeros(3))
    assert len([w for w in rec if issubclass(w.category, ScaleMismatchWarning)]) == 1
    assert {k: dict(v) for k, v in elbo.history[0].scaled.items()} == {"log_prior": {"z": 0.1}}


# --------------------------------------------------------------------------- the Pyro range
@pytest.mark.parametrize("version", ["1.8.3", "1.10.0", "2.0.0"])
def test_a_pyro_outside_the_tested_range_is_refused(monkeypatch, version):
    monkeypatch.delenv(V.ALLOW_ENV, raising=False)
    monkeypatch.setattr(pyro, "__version__", version)
    with pytest.raises(UntestedPyroError, match=f"pyro-ppl {version} is installed.*{V.ALLOW_ENV}=1"):
        decompose(_model, _guide, torch.zeros(3))
    with pytest.raises(UntestedPyroError, match=f"TermsTrace_ELBO is tested with pyro-ppl {V.PYRO_MIN}"):
        TermsTrace_ELBO()
    monkeypatch.setenv(V.ALLOW_ENV, "1")  # the escape hatch
    decompose(_model, _guide, torch.zeros(3))
    TermsTraceMeanField_ELBO()


@pytest.mark.parametrize("version", [V.PYRO_MIN, V.PYRO_MAX, "1.9.0", "1.9.1+local"])
def test_a_pyro_inside_the_range_is_accepted(monkeypatch, version):
    monkeypatch.delenv(V.ALLOW_ENV, raising=False)
    monkeypatch.setattr(pyro, "__version__", version)
    decompose(_model, _guide, torch.zeros(3))
    TermsTrace_ELBO()


def test_the_installed_pyro_is_in_the_range():
    assert V._release(V.PYRO_MIN) <= V._release(pyro.__version__) <= V._release(V.PYRO_MAX)
