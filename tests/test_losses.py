"""Preference losses against hand-derived values (derivations in each docstring)."""

from __future__ import annotations

import math

import pytest
import torch

from prefopt_core.losses import (
    DEFAULT_BETA,
    LOSSES,
    compute_loss,
    diffusion_dpo,
    get_loss,
    kto,
    mapo,
    mapo_score,
    sft,
)

LN2 = math.log(2.0)


def t64(*values: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


# ---------------------------------------------------------------- Diffusion-DPO


@pytest.mark.parametrize("convention", ["official", "diffusers"])
@pytest.mark.parametrize("beta", [1.0, 5000.0])
def test_dpo_is_ln2_when_policy_equals_reference(convention: str, beta: float) -> None:
    """policy == reference => model_diff == ref_diff => inside = 0 => loss = -log sigmoid(0) = ln 2.

    Every margin is exactly 0, a tie, which counts as wrong (official ``inside > 0``): implicit_acc = 0.
    """
    err_w = torch.tensor([0.1, 0.7, 2.0, 0.0], dtype=torch.float64)
    err_l = torch.tensor([0.4, 0.2, 2.0, 1e-3], dtype=torch.float64)
    out = diffusion_dpo(err_w, err_l, err_w.clone(), err_l.clone(), beta=beta, convention=convention)
    torch.testing.assert_close(out.losses, torch.full((4,), LN2, dtype=torch.float64))
    assert out.metrics["implicit_acc"].item() == 0.0
    assert out.metrics["reward_margin"].item() == 0.0


def test_dpo_worked_example_official_and_diffusers() -> None:
    """beta=2, e_w=0.3, e_ref_w=0.5, e_l=0.6, e_ref_l=0.4.

    official:  inside = -0.5*2*((0.3-0.5) - (0.6-0.4)) = -1*(-0.4) = 0.4,
               loss = ln(1 + e^-0.4) = 0.5130152524; implicit_acc = 1; margin = 0.4.
    diffusers: inside = -2*(-0.4) = 0.8, loss = ln(1 + e^-0.8) = 0.3711006659.
    model_diff = 0.3-0.6 = -0.3, ref_diff = 0.5-0.4 = 0.1.
    """
    args = (t64(0.3), t64(0.6), t64(0.5), t64(0.4))
    out = diffusion_dpo(*args, beta=2.0)
    assert out.losses.item() == pytest.approx(0.5130152524, abs=1e-9)
    assert out.metrics["reward_margin"].item() == pytest.approx(0.4, abs=1e-6)
    assert out.metrics["implicit_acc"].item() == 1.0
    assert out.metrics["dpo/model_diff"].item() == pytest.approx(-0.3, abs=1e-6)
    assert out.metrics["dpo/ref_diff"].item() == pytest.approx(0.1, abs=1e-6)
    out_d = diffusion_dpo(*args, beta=2.0, convention="diffusers")
    assert out_d.losses.item() == pytest.approx(0.3711006659, abs=1e-9)


def test_dpo_official_beta_equals_diffusers_half_beta_exactly() -> None:
    """official: -0.5*beta*x; diffusers: -1*(beta/2)*x. For beta=5000 both coefficients are -2500.0
    exactly, so the two conventions give bit-identical losses (diffusers 2500 == official 5000)."""
    gen = torch.Generator().manual_seed(0)
    errs = [torch.rand(16, generator=gen) * 1e-3 for _ in range(4)]
    official = diffusion_dpo(*errs, beta=5000.0, convention="official")
    diffusers = diffusion_dpo(*errs, beta=2500.0, convention="diffusers")
    assert torch.equal(official.losses, diffusers.losses)


def test_dpo_timestep_weight_multiplies_inside() -> None:
    """Worked example above (inside = 0.4 at lambda = 1) with lambda = [1, 2]:
    inside = [0.4, 0.8], loss = [ln(1+e^-0.4), ln(1+e^-0.8)] = [0.5130152524, 0.3711006659],
    reward_margin = mean(0.4, 0.8) = 0.6."""
    args = (t64(0.3, 0.3), t64(0.6, 0.6), t64(0.5, 0.5), t64(0.4, 0.4))
    out = diffusion_dpo(*args, beta=2.0, timestep_weight=t64(1.0, 2.0))
    torch.testing.assert_close(out.losses, t64(0.5130152524, 0.3711006659))
    assert out.metrics["reward_margin"].item() == pytest.approx(0.6, abs=1e-6)


def test_dpo_gradient_direction_and_value() -> None:
    """L = -log sigmoid(inside), inside = -0.5*beta*((e_w - e_ref_w) - (e_l - e_ref_l)).
    dL/d e_w = sigmoid(-inside) * 0.5*beta, dL/d e_l = -sigmoid(-inside) * 0.5*beta.
    Worked example (beta=2, inside=0.4): sigmoid(-0.4) = 0.4013123399, so dL/de_w = +0.4013 (lowering
    e_w lowers the loss) and dL/de_l = -0.4013 (raising e_l lowers it). The reference gets no gradient."""
    e_w, e_l = t64(0.3, grad=True), t64(0.6, grad=True)
    r_w, r_l = t64(0.5, grad=True), t64(0.4, grad=True)
    diffusion_dpo(e_w, e_l, r_w, r_l, beta=2.0).losses.sum().backward()
    assert e_w.grad.item() == pytest.approx(0.4013123399, abs=1e-9)
    assert e_l.grad.item() == pytest.approx(-0.4013123399, abs=1e-9)
    assert r_w.grad is None and r_l.grad is None


def test_dpo_rejects_bad_convention_and_shapes() -> None:
    """Unknown convention -> ValueError naming both valid options; (B,1) errors -> ValueError."""
    e = t64(0.1)
    with pytest.raises(ValueError, match=r"official.*diffusers"):
        diffusion_dpo(e, e, e, e, beta=1.0, convention="trl")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        diffusion_dpo(e[:, None], e[:, None], e[:, None], e[:, None], beta=1.0)
    with pytest.raises(ValueError, match="share one shape"):
        diffusion_dpo(t64(0.1, 0.2), e, e, e, beta=1.0)


# ---------------------------------------------------------------- MaPO


def test_mapo_score_matches_closed_form_and_limits() -> None:
    """s(x) = x/(e^x - 1) with x = c*e. Hand values (c=1): s(1) = 1/(e-1) = 0.5819767069,
    s(0.2) = 0.2/(e^0.2-1) = 0.9033311132; s(0) = 1 (limit); s(1e4) = 1e4*e^-1e4 = 0 (underflow, finite).
    c=0.5, e=2 -> x=1 -> 0.5819767069."""
    e = t64(1.0, 0.2, 0.0, 1e4)
    torch.testing.assert_close(mapo_score(e, 1.0), t64(0.5819767069, 0.9033311132, 1.0, 0.0))
    assert mapo_score(t64(2.0), 0.5).item() == pytest.approx(0.5819767069, abs=1e-9)


def test_mapo_equal_errors_give_ew_plus_beta_ln2() -> None:
    """e_w == e_l => s(e_w) == s(e_l) => margin 0 => ratio = log sigmoid(0) = -ln 2
    => loss = e_w - beta*(-ln 2) = e_w + beta*ln 2. With beta = 0.1: [0.5, 0.0] + 0.0693147181."""
    e = t64(0.5, 0.0)
    out = mapo(e, e.clone(), beta=0.1)
    torch.testing.assert_close(out.losses, e + 0.1 * LN2)
    assert out.metrics["reward_margin"].item() == 0.0
    assert out.metrics["implicit_acc"].item() == 0.0


def test_mapo_worked_example() -> None:
    """c=1, T=10, beta=0.1, e_w=0.2, e_l=1.0:
    s(0.2) = 0.9033311132, s(1) = 0.5819767069, margin = 10*(0.9033311132-0.5819767069) = 3.2135440636,
    ratio = -ln(1 + e^-3.2135440636) = -0.0394263074, loss = 0.2 + 0.1*0.0394263074 = 0.2039426307.
    sft_loss = 0.2, ratio_loss = 0.0039426307; they add up to the loss. s_w > s_l -> implicit_acc = 1."""
    out = mapo(t64(0.2), t64(1.0), beta=0.1, snr_value=1.0, num_train_timesteps=10)
    assert out.losses.item() == pytest.approx(0.2039426307, abs=1e-9)
    assert out.metrics["reward_margin"].item() == pytest.approx(3.2135440636, abs=1e-6)
    assert out.metrics["mapo/sft_loss"].item() == pytest.approx(0.2, abs=1e-6)
    assert out.metrics["mapo/ratio_loss"].item() == pytest.approx(0.0039426307, abs=1e-6)
    assert out.metrics["implicit_acc"].item() == 1.0


def test_mapo_value_and_gradient_at_zero_error() -> None:
    """e_w = e_l = 0, c = 0.5, T = 1000, beta = 0.1. s(0) = 1, s'(x) at 0 = -1/2, margin m = 0.
    L = e_w - beta*log sigmoid(m), dL/dm = -beta*sigmoid(-m) = -0.05.
    dm/de_w = T*c*s'(0) = 1000*0.5*(-0.5) = -250;  dm/de_l = +250.
    dL/de_w = 1 + (-0.05)(-250) = 13.5;  dL/de_l = (-0.05)(250) = -12.5;  L = 0 + 0.1*ln 2."""
    e_w, e_l = t64(0.0, grad=True), t64(0.0, grad=True)
    out = mapo(e_w, e_l, beta=0.1, snr_value=0.5, num_train_timesteps=1000)
    out.losses.sum().backward()
    assert out.losses.item() == pytest.approx(0.1 * LN2, abs=1e-12)
    assert e_w.grad.item() == pytest.approx(13.5, abs=1e-9)
    assert e_l.grad.item() == pytest.approx(-12.5, abs=1e-9)


def test_mapo_gradient_direction() -> None:
    """dL/de_w = 1 - beta*sigmoid(-m)*T*c*s'(c e_w) > 0 since s' < 0 (lowering e_w lowers the loss);
    dL/de_l = beta*sigmoid(-m)*T*c*s'(c e_l) < 0 (raising e_l lowers it). Checked at e_w=0.3, e_l=0.6."""
    e_w, e_l = t64(0.3, grad=True), t64(0.6, grad=True)
    mapo(e_w, e_l).losses.sum().backward()
    assert e_w.grad.item() > 0
    assert e_l.grad.item() < 0


# ---------------------------------------------------------------- SFT


def test_sft_is_chosen_error() -> None:
    """loss = e_w per pair; d(sum loss)/d e_w = 1."""
    e_w = t64(0.25, 1.5, grad=True)
    out = sft(e_w)
    torch.testing.assert_close(out.losses, t64(0.25, 1.5))
    out.losses.sum().backward()
    torch.testing.assert_close(e_w.grad, t64(1.0, 1.0))
    assert out.metrics["sft/mse_w"].item() == pytest.approx(0.875)


# ---------------------------------------------------------------- Diffusion-KTO


@pytest.mark.parametrize(
    ("errs", "weights", "expected"),
    [
        # g_w = 0.5-0.3 = 0.2, g_l = 0.4-0.6 = -0.2, z0 = max(0, 0) = 0;
        # 1 - sigmoid(2*0.2) = 1 - sigmoid(2*0.2) = 0.4013123399 each; loss = (0.4013 + 0.4013)/2.
        ((0.3, 0.6, 0.5, 0.4), (1.0, 1.0), 0.4013123399),
        # g_w = 0.6-0.3 = 0.3, g_l = 0.4-0.5 = -0.1, z0 = max(0, 0.1) = 0.1;
        # desirable 1 - sigmoid(2*(0.3-0.1)) = 0.4013123399, undesirable 1 - sigmoid(2*(0.1+0.1)) = same;
        # weights (2, 1): loss = (2*0.4013123399 + 0.4013123399)/2 = 0.6019685098.
        ((0.3, 0.5, 0.6, 0.4), (2.0, 1.0), 0.6019685098),
        # g_w = 0.4-0.5 = -0.1, g_l = 0.4-0.7 = -0.3, mean = -0.2 -> clamped z0 = 0;
        # 1 - sigmoid(-0.2) = 0.5498339973, 1 - sigmoid(0.6) = 0.3543436938; loss = 0.4520888455.
        ((0.5, 0.7, 0.4, 0.4), (1.0, 1.0), 0.4520888455),
    ],
)
def test_kto_worked_values(errs: tuple[float, ...], weights: tuple[float, float], expected: float) -> None:
    """beta = 2, one pair (e_w, e_l, e_ref_w, e_ref_l); g = e_ref - e, z0 = max(0, mean(g_w, g_l)),
    loss = (w_D*(1 - sigmoid(beta*(g_w - z0))) + w_U*(1 - sigmoid(beta*(z0 - g_l)))) / 2 (values inline)."""
    e_w, e_l, r_w, r_l = (t64(v) for v in errs)
    out = kto(e_w, e_l, r_w, r_l, beta=2.0, desirable_weight=weights[0], undesirable_weight=weights[1])
    assert out.losses.item() == pytest.approx(expected, abs=1e-9)


def test_kto_reference_point_is_detached() -> None:
    """Second worked case (z0 = 0.1 > 0) with weights w_D = 2, w_U = 1, beta = 2; both logits are 0.4.
    z0 detached: only the desirable half depends on e_w, L_w = 0.5*2*(1 - sigmoid(2*(0.6 - e_w - z0))), so
    dL/de_w = 0.5*2*2*sigmoid'(0.4) = 2*sigmoid(0.4)*sigmoid(-0.4) = 2*0.2402607457 = 0.4805214915, and
    dL/de_l = -0.5*1*2*sigmoid'(0.4) = -0.2402607457. (Were z0 = mean(g) differentiated, dz0/de_w = -1/2
    would give dL/de_w = 0.5*(2 + 1)*2*sigmoid'(0.4)/2 = 0.3603911186 instead.)
    Metrics: kto/kl = 0.1, reward_margin = 2*(0.3 - (-0.1)) = 0.8, implicit_acc = 1."""
    e_w, e_l = t64(0.3, grad=True), t64(0.5, grad=True)
    out = kto(e_w, e_l, t64(0.6), t64(0.4), beta=2.0, desirable_weight=2.0, undesirable_weight=1.0)
    out.losses.sum().backward()
    assert e_w.grad.item() == pytest.approx(0.4805214915, abs=1e-9)
    assert e_l.grad.item() == pytest.approx(-0.2402607457, abs=1e-9)
    assert out.metrics["kto/kl"].item() == pytest.approx(0.1, abs=1e-6)
    assert out.metrics["reward_margin"].item() == pytest.approx(0.8, abs=1e-6)
    assert out.metrics["implicit_acc"].item() == 1.0


# ---------------------------------------------------------------- all losses


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("scale", [1e-8, 1e4])
def test_extreme_errors_give_finite_losses_and_grads(name: str, scale: float) -> None:
    """float32 errors spanning [0, 2*scale] with beta 5000 (0.1 for MaPO): -logsigmoid, the MaPO score and
    the KTO sigmoids saturate without overflow, so every loss and gradient stays finite."""
    gen = torch.Generator().manual_seed(1)
    errs = [(torch.rand(8, generator=gen) * 2 * scale).requires_grad_() for _ in range(4)]
    errs[0].data[0] = 0.0  # an exact zero too
    params = {"beta": 0.1 if name == "mapo" else 5000.0} if "beta" in LOSSES[name].params else {}
    out = compute_loss(name, *errs, **params)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all()
    for e in errs:
        assert e.grad is None or torch.isfinite(e.grad).all()
    assert all(torch.isfinite(v).all() for v in out.metrics.values())


# ---------------------------------------------------------------- registry


def test_registry_flags() -> None:
    """DPO/KTO need a reference, MaPO/SFT do not; only SFT ignores the rejected sample."""
    assert {n: (s.needs_reference, s.uses_rejected) for n, s in LOSSES.items()} == {
        "dpo": (True, True),
        "mapo": (False, True),
        "sft": (False, False),
        "kto": (True, True),
    }


def test_default_beta_per_loss() -> None:
    """Each loss's default beta is its official code's default, written out here by hand:
    dpo 5000 (SalesforceAIResearch/DiffusionDPO launchers, --beta_dpo 5000, official 0.5 convention),
    mapo 0.1 (mapo-t2i train.py --beta_mapo), kto 1000 (jacklishufan/diffusion-kto train_kto_sd_v1.5.py
    --beta_dpo default, not overridden by its exps/example.sh), sft 0 (no preference term)."""
    assert DEFAULT_BETA == {"dpo": 5000.0, "mapo": 0.1, "kto": 1000.0, "sft": 0.0}


def test_timestep_weight_compatibility_is_owned_by_the_spec() -> None:
    """lambda(t) scales an implicit reward: dpo/kto accept any weight, mapo/sft only "none"."""
    for name in ("dpo", "kto"):
        get_loss(name).check_timestep_weight("inv_sqrt_snr")
    for name in ("mapo", "sft"):
        get_loss(name).check_timestep_weight("none")
        with pytest.raises(ValueError, match=f"loss.name={name} has none"):
            get_loss(name).check_timestep_weight("inv_sqrt_snr")


def test_get_loss_unknown_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"'dpo'.*'kto'.*'mapo'.*'sft'"):
        get_loss("orpo")


def test_compute_loss_reference_loss_without_reference_raises() -> None:
    e = t64(0.1)
    with pytest.raises(ValueError, match="reference errors"):
        compute_loss("dpo", e, e, beta=1.0)
    with pytest.raises(ValueError, match="reference errors"):
        compute_loss("kto", e, e, e, None, beta=1.0)


def test_compute_loss_dispatch_matches_direct_calls() -> None:
    """compute_loss passes each loss its own params and timestep_weight reaches DPO/KTO only (MaPO/SFT ignore
    it). Worked DPO example with lambda = 2: inside 0.8 -> 0.3711006659."""
    args = (t64(0.3), t64(0.6), t64(0.5), t64(0.4))
    out = compute_loss("dpo", *args, timestep_weight=t64(2.0), beta=2.0, convention="official")
    assert out.losses.item() == pytest.approx(0.3711006659, abs=1e-9)
    torch.testing.assert_close(
        compute_loss("mapo", *args, timestep_weight=t64(2.0), beta=2.0, num_train_timesteps=10).losses,
        mapo(args[0], args[1], beta=2.0, num_train_timesteps=10).losses,
    )
    torch.testing.assert_close(
        compute_loss("kto", *args, timestep_weight=t64(1.0), beta=2.0, desirable_weight=1.0).losses,
        kto(*args, beta=2.0).losses,
    )
    torch.testing.assert_close(compute_loss("sft", args[0]).losses, args[0])


def test_compute_loss_missing_beta_is_the_default() -> None:
    """No beta: DEFAULT_BETA["dpo"] = 5000."""
    args = (t64(0.3), t64(0.6), t64(0.5), t64(0.4))
    torch.testing.assert_close(compute_loss("dpo", *args).losses, diffusion_dpo(*args, beta=5000.0).losses)


def test_compute_loss_refuses_a_parameter_of_another_loss() -> None:
    """Parameters are filtered once (loss_kwargs); compute_loss names the ones the loss takes."""
    e = t64(0.1)
    with pytest.raises(ValueError, match=r"does not take parameter\(s\) \['snr_value'\]; its parameters: "):
        compute_loss("dpo", e, e, e, e, snr_value=0.5)
    with pytest.raises(ValueError, match=r"\['betta'\]; its parameters: \[\]"):
        compute_loss("sft", e, betta=1.0)
