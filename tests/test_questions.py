"""Part III ``questions-*``: the demonstrations behind the answers to Pyro users' questions.

The identities and claims themselves (and their must-fail variants) are checked by
``tests/test_identities.py``; these tests pin down the demonstrations the pages print.
"""

import math

import pyro
import pytest
import torch
from elbo_terms._util import t64
from elbo_terms.build.identity import IDENTITIES
from elbo_terms.chapters import conjugate as C
from elbo_terms.chapters import questions as Q


@pytest.fixture(autouse=True)
def _validation():
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()


def test_every_question_identity_names_a_question_page():
    pages = {Q.LOSS_PAGE, Q.MASKS_PAGE, Q.DISCRETE_PAGE, Q.BOUNDS_PAGE, Q.CUSTOM_PAGE, Q.GUIDES_PAGE}
    mine = [i for i in IDENTITIES.values() if i.chapter.startswith("questions")]
    assert len(mine) >= 20
    assert {i.chapter for i in mine} == pages
    assert "q-iwae-bound-chain" in IDENTITIES and "q-enum-exact-marginal" in IDENTITIES


# ------------------------------------------------------------------ loss values
def test_loss_table_is_minus_the_evidence_and_marks_missing_methods():
    table = Q.loss_table(Q.SAMPLE_PATH_CLASSES[:2])
    assert table["TraceGraph_ELBO", "differentiable_loss"].startswith("AttributeError")
    values = [v for v in table.values() if isinstance(v, float)]
    assert len(values) == 9
    assert values == pytest.approx([-C.log_evidence()] * 9, rel=1e-12)
    text = Q.format_loss_table(table)
    assert len(text.splitlines()) == 3 and "(none)" in text


def test_binary_entropy_and_the_pixel_mean_baseline():
    p = t64([0.0, 0.5, 0.2, 1.0])
    expected = [0.0, math.log(2), -(0.2 * math.log(0.2) + 0.8 * math.log(0.8)), 0.0]
    assert Q.binary_entropy(p).tolist() == pytest.approx(expected, abs=1e-15)
    per_example, entropy, n = Q.per_example_baseline()
    assert n > 1000 and 0 < per_example < 64 * math.log(2)
    assert per_example == pytest.approx(entropy, rel=1e-9)


def test_grey_levels_are_rejected_and_split_into_floor_and_gap():
    assert "Boolean" in Q.grey_level_error()
    nll, floor, kl, _ = Q.grey_level_terms()
    assert floor > 0 and kl > 0 and nll == pytest.approx(floor + kl, rel=1e-9)


def test_the_joint_falls_while_the_elbo_rises():
    joint0, elbo0 = Q.joint_and_elbo(Q.SHARP_FACTOR)
    joint1, elbo1 = Q.joint_and_elbo(1.0)
    assert elbo1 > elbo0 and joint1 < joint0
    assert elbo1 == pytest.approx(C.log_evidence(), rel=1e-9)  # q = posterior: the bound is tight


# ------------------------------------------------------------------------ masks
def test_block_on_a_latent_decouples_guide_and_model():
    z_guide, z_model, warns = Q.blocked_latent_demo()
    assert z_guide != z_model
    assert any("guide but not model" in w for w in warns)


def test_nan_needs_filling_before_masking():
    error, loss, grad_raw, grad_filled = Q.nan_gradient_demo()
    assert "support" in error and "site 'x'" in error
    assert math.isnan(grad_raw) and math.isfinite(grad_filled) and math.isfinite(loss)


def test_obs_mask_splits_the_site():
    sites = dict(Q.obs_mask_sites())
    assert sites == {"z": False, "x_observed": True, "x_unobserved": False, "x": True}


# --------------------------------------------------------------------- discrete
def test_enumeration_rules_raise_pyros_errors():
    assert "sequential enumeration is not implemented" in Q.sequential_enum_error()
    assert "common poutine.scale" in Q.mixed_scale_error()


def test_score_gradient_scales_once():
    grad_c, by_hand_c = Q.score_gradient_at(Q.SCALE)
    grad_1, by_hand_1 = Q.score_gradient_at(1.0)
    assert grad_c == pytest.approx(Q.SCALE * grad_1, rel=1e-9)
    assert grad_1 == pytest.approx(by_hand_1, rel=1e-9)


# ----------------------------------------------------------------------- bounds
def test_renyi_weights_each_data_point_when_every_site_is_in_the_plate():
    v = Q.renyi_plate_values()
    assert -v["loss"] == pytest.approx(v["per_point"], rel=1e-9)
    assert abs(v["per_point"] - v["joint"]) > 1e-3


def test_snr_helper():
    r, se = Q.snr([1.0, 2.0, 3.0, 4.0])
    assert r == pytest.approx(2.5 / torch.tensor([1.0, 2.0, 3.0, 4.0]).std().item())
    assert se == pytest.approx(math.sqrt((1 + r**2 / 2) / 4))


# ----------------------------------------------------------------------- custom
def test_elbo_module_trains_with_local_params():
    d = Q.elbo_module_demo(steps=20)
    assert d["param_store"] == []
    assert set(d["names"]) == {"guide.m_unconstrained", "guide.s_unconstrained"}
    assert d["first"] == pytest.approx(d["same_draw"], rel=1e-12)
    assert d["elbo_after"] > d["elbo_before"]


def test_surrogate_first_derivative_unbiased_second_not():
    d = Q.surrogate_derivatives()
    q1 = d["q1"]
    grad = (1 - q1) * d[0][1] + q1 * d[1][1]
    hess = (1 - q1) * d[0][2] + q1 * d[1][2]
    assert grad == pytest.approx(d["exact"][1], rel=1e-9)
    assert abs(hess - d["exact"][2]) > 0.1
    value = (1 - q1) * d[0][0] + q1 * d[1][0]
    assert value == pytest.approx(d["exact"][0], rel=1e-9)  # the values average to -ELBO too


# ----------------------------------------------------------------------- guides
def test_entropy_reward_inflates_the_scale():
    first, last, rho = Q.guide_observed_training(steps=20)
    assert rho > 2 and last < first


def test_support_mismatch_errors_only_with_validation():
    z, error, value = Q.support_demo()
    assert z < 0 and "site 'z'" in error and math.isfinite(value)


def test_top_down_guide_gets_the_mean_field_warning():
    assert any("mean field" in w for w in Q.top_down_warning())


def test_first_error_line_is_none_when_nothing_fails():
    assert Q.first_error_line(lambda: 1) is None
    assert Q.first_error_line(lambda: 1 / 0).startswith("ZeroDivisionError")
