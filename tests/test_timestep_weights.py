"""The timestep weight lambda(t): every variant at hand-derived points on both schedule kinds, its range and
monotonicity, the calibration table and its config key, and the shape statistics."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from prefopt_core.config import ConfigError, load_config
from prefopt_core.timestep_weights import (
    CALIBRATION_KEY,
    TIMESTEP_WEIGHTS,
    calibrated_bin_weights,
    calibration_record,
    paper_ddpm_range,
    read_calibration,
    timestep_weight,
    timestep_weight_table,
    weight_shape,
)
from prefopt_core.timesteps import NoiseSchedule

T = 1000
#: paper_ddpm_range(), as derived in its docstring.
A, B = 0.0291672, 14.61464


def ddpm(*alpha_bar: float) -> NoiseSchedule:
    return NoiseSchedule(kind="ddpm", table=torch.tensor(alpha_bar, dtype=torch.float64))


def flow(*sigma: float) -> NoiseSchedule:
    return NoiseSchedule(kind="flow", table=torch.tensor(sigma, dtype=torch.float64))


def sd15_schedule() -> NoiseSchedule:
    return NoiseSchedule.from_ddpm_scheduler(
        DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    )


def sd3_schedule(shift: float = 3.0) -> NoiseSchedule:
    return NoiseSchedule.from_flow_scheduler(FlowMatchEulerDiscreteScheduler(shift=shift))


#: A hand-made calibration (10 metric bins, least noisy first): mean |margin| halving over the noisy half.
CALIBRATION = torch.tensor([4.0, 4.0, 3.0, 3.5, 3.0, 2.5, 2.0, 1.5, 1.0, 1.0], dtype=torch.float64)


# ---------------------------------------------------------------- inv_sqrt_snr (the paper's)


def test_inv_sqrt_snr_ddpm_hand_points() -> None:
    """alpha_bar = (1, 0.5, 0.2): x = 1/sqrt(SNR) = sqrt((1 - a)/a) = (0, 1, 2), min-max (0, 0.5, 1), so
    lambda = (1, 1.5, 2)."""
    assert timestep_weight_table(ddpm(1.0, 0.5, 0.2), "inv_sqrt_snr").tolist() == [1.0, 1.5, 2.0]


def test_inv_sqrt_snr_flow_hand_points() -> None:
    """sigma = (0.2, 0.5, 0.8): x = sigma/(1 - sigma) = (0.25, 1, 4), lambda = 1 + (x - 0.25)/3.75
    = (1, 1.2, 2)."""
    lam = timestep_weight_table(flow(0.2, 0.5, 0.8), "inv_sqrt_snr")
    assert lam.tolist() == pytest.approx([1.0, 1.2, 2.0])


def test_inv_sqrt_snr_endpoints_on_real_schedules() -> None:
    """Min-max over the schedule's own range: exactly 1 at t = 0 and 2 at t = T-1 (flow sigma = 1 clipped)."""
    for schedule in (sd15_schedule(), sd3_schedule()):
        lam = timestep_weight_table(schedule, "inv_sqrt_snr")
        assert lam[0].item() == 1.0 and lam[-1].item() == 2.0


# ---------------------------------------------------------------- inv_sqrt_snr_ddpm_range


def test_paper_ddpm_range() -> None:
    """min: sqrt(0.00085/0.99915) = 0.0291672; max: alpha_bar_999 = 0.0046601 -> 14.6146 (float32 betas in
    diffusers: relative tolerance 1e-4)."""
    lo, hi = paper_ddpm_range()
    assert lo == pytest.approx(math.sqrt(0.00085 / 0.99915), rel=1e-4)
    assert hi == pytest.approx(B, rel=1e-4)


def test_ddpm_range_ddpm_hand_points() -> None:
    """alpha_bar = (0.8, 0.5, 0.2): x = (0.5, 1, 2), all inside [A, B] = [0.0291672, 14.61464], so
    lambda = 1 + (x - A)/(B - A) = 1 + (0.470833, 0.970833, 1.970833)/14.585473
    = (1.032281, 1.066562, 1.135123)."""
    lam = timestep_weight_table(ddpm(0.8, 0.5, 0.2), "inv_sqrt_snr_ddpm_range")
    assert lam.tolist() == pytest.approx([1.032281, 1.066562, 1.135123], abs=2e-5)


def test_ddpm_range_flow_hand_points() -> None:
    """sigma = (0.5, 0.75, 0.96): x = (1, 3, 24); 24 > B is clipped to B, so lambda = (1 + 0.970833/14.585473,
    1 + 2.970833/14.585473, 2) = (1.066562, 1.203684, 2)."""
    lam = timestep_weight_table(flow(0.5, 0.75, 0.96), "inv_sqrt_snr_ddpm_range")
    assert lam.tolist() == pytest.approx([1.066562, 1.203684, 2.0], abs=2e-5)


def test_ddpm_range_equals_inv_sqrt_snr_on_the_paper_schedule() -> None:
    """On SD1.5/SDXL's own schedule the fixed range is the schedule's range: the two variants agree."""
    schedule = sd15_schedule()
    torch.testing.assert_close(
        timestep_weight_table(schedule, "inv_sqrt_snr_ddpm_range"),
        timestep_weight_table(schedule, "inv_sqrt_snr"),
        atol=1e-6,
        rtol=0,
    )


# ---------------------------------------------------------------- log_snr


def test_log_snr_ddpm_hand_points() -> None:
    """alpha_bar = (0.8, 0.5, 0.2): x = (1/2, 1, 2), ln x = (-ln 2, 0, ln 2), min-max -> (1, 1.5, 2)."""
    lam = timestep_weight_table(ddpm(0.8, 0.5, 0.2), "log_snr")
    assert lam.tolist() == pytest.approx([1.0, 1.5, 2.0])


def test_log_snr_flow_hand_points() -> None:
    """sigma = (0.2, 0.5, 0.8): x = (1/4, 1, 4), ln x = (-2 ln 2, 0, 2 ln 2) -> (1, 1.5, 2), whereas
    inv_sqrt_snr gives 1.2 at sigma = 0.5."""
    lam = timestep_weight_table(flow(0.2, 0.5, 0.8), "log_snr")
    assert lam.tolist() == pytest.approx([1.0, 1.5, 2.0])


def test_log_snr_sd3_midpoint() -> None:
    """SD3, shift 3: t = 249 has s = 0.25 and sigma = 0.75/1.5 = 0.5 (x = 1); min x = 0.003/0.999 (t = 0),
    max x = 999 (sigma clipped at 0.999), so lambda = 1 + ln(333)/ln(999 * 333) = 1.456798."""
    lam = timestep_weight_table(sd3_schedule(), "log_snr")
    assert lam[249].item() == pytest.approx(1 + math.log(333) / math.log(999 * 333), abs=1e-5)


# ---------------------------------------------------------------- calibrated


def test_calibrated_bin_weights_isotonic_hand_example() -> None:
    """abs_margin (2, 1, 1.6, 1): r = 1/m = (0.5, 1, 0.625, 1), pooled (1, 0.625) -> 0.8125, lambda = r/r_0
    = (1, 1.625, 1.625, 2)."""
    w = calibrated_bin_weights(torch.tensor([2.0, 1.0, 1.6, 1.0]))
    assert w.tolist() == pytest.approx([1.0, 1.625, 1.625, 2.0])


def test_calibrated_bin_weights_cap_at_two() -> None:
    """abs_margin (4, 2, 1, 0.5): r/r_0 = (1, 2, 4, 8), capped at 2 -> (1, 2, 2, 2)."""
    assert calibrated_bin_weights(torch.tensor([4.0, 2.0, 1.0, 0.5])).tolist() == [1.0, 2.0, 2.0, 2.0]


def test_calibrated_table_is_piecewise_constant_over_the_bins() -> None:
    """T = 8, 4 bins: bin(t) = t*4 // 8 = t // 2, weights (1, 1.625, 1.625, 2) from the isotonic example, so
    lambda = (1, 1, 1.625, 1.625, 1.625, 1.625, 2, 2), whatever the schedule kind."""
    calibration = torch.tensor([2.0, 1.0, 1.6, 1.0])
    expected = [1.0, 1.0, 1.625, 1.625, 1.625, 1.625, 2.0, 2.0]
    for schedule in (
        ddpm(*torch.linspace(0.9, 0.1, 8).tolist()),
        flow(*torch.linspace(0.1, 0.9, 8).tolist()),
    ):
        assert timestep_weight_table(schedule, "calibrated", calibration).tolist() == expected


def test_calibrated_without_table_names_the_config_key() -> None:
    with pytest.raises(ValueError, match=CALIBRATION_KEY.replace(".", r"\.")):
        timestep_weight_table(sd3_schedule(), "calibrated")


def test_calibrated_rejects_a_zero_margin_bin() -> None:
    """A bin that never moved (|margin| = 0) has no finite weight: a sentence, not an inf."""
    with pytest.raises(ValueError, match="must be finite and > 0"):
        calibrated_bin_weights(torch.tensor([1.0, 0.0]))


# ---------------------------------------------------------------- every variant


@pytest.mark.parametrize("weight", [w for w in TIMESTEP_WEIGHTS if w != "none"])
@pytest.mark.parametrize(
    "make", [sd15_schedule, sd3_schedule, lambda: sd3_schedule(1.0)], ids=["sd15", "sd3", "flow1"]
)
def test_every_variant_in_1_2_and_monotone(weight: str, make) -> None:
    """On SD1.5's DDPM and on flow schedules of shift 3 and 1: finite, within [1, 2], non-decreasing in t,
    1 at t = 0 and > 1 somewhere."""
    lam = timestep_weight_table(make(), weight, CALIBRATION)  # type: ignore[arg-type]
    assert lam.shape == (T,) and torch.isfinite(lam).all()
    assert lam.min().item() >= 1.0 and lam.max().item() <= 2.0
    assert (lam.diff() >= 0).all()
    assert lam[0].item() == pytest.approx(1.0) and lam.max().item() > 1.0


def test_none_weight_is_one_everywhere() -> None:
    assert torch.equal(timestep_weight_table(sd3_schedule(), "none"), torch.ones(T))


def test_unknown_timestep_weight_lists_the_valid_ones() -> None:
    with pytest.raises(
        ValueError, match=r"valid options: \['none', 'inv_sqrt_snr', 'inv_sqrt_snr_ddpm_range'"
    ):
        timestep_weight_table(sd15_schedule(), "snr")  # type: ignore[arg-type]


def test_timestep_weight_gathers_table() -> None:
    """timestep_weight(t, table) = table[t]; SD1.5 endpoints: lambda(0) = 1, lambda(999) = 2."""
    table = timestep_weight_table(sd15_schedule(), "inv_sqrt_snr")
    t = torch.tensor([999, 0, 500])
    torch.testing.assert_close(timestep_weight(t, table), torch.stack([table[999], table[0], table[500]]))
    assert timestep_weight(t, table)[:2].tolist() == [2.0, 1.0]


# ---------------------------------------------------------------- calibration file and config key


def test_calibration_file_round_trip(tmp_path) -> None:
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(calibration_record(CALIBRATION.tolist(), {"run_id": "abc"})))
    assert torch.equal(read_calibration(str(path)), CALIBRATION)


def test_calibration_file_errors_are_sentences(tmp_path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        read_calibration(str(tmp_path / "missing.json"))
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"abs_margin": [1.0]}))
    with pytest.raises(ValueError, match="is not a timestep calibration table"):
        read_calibration(str(wrong))


def test_config_calibrated_needs_the_calibration_key() -> None:
    with pytest.raises(
        ConfigError, match=r"loss\.timestep_weight=calibrated needs loss\.timestep_weight_calibration"
    ):
        load_config(None, ["loss.timestep_weight=calibrated"])


def test_config_calibration_without_calibrated_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"is read only by loss\.timestep_weight=calibrated"):
        load_config(None, ["loss.timestep_weight=log_snr", "loss.timestep_weight_calibration=c.json"])


def test_config_accepts_calibrated_with_a_table() -> None:
    cfg = load_config(None, ["loss.timestep_weight=calibrated", "loss.timestep_weight_calibration=c.json"])
    assert cfg.loss.timestep_weight_calibration == "c.json"


# ---------------------------------------------------------------- shape


def test_weight_shape_hand_example() -> None:
    """lambda = (1, 1.5, 2) with P = (0.5, 0.25, 0.25): mean 0.5 + 0.375 + 0.5 = 1.375; the cumulative
    (0.5, 0.75, 1) reaches 0.1 and 0.5 at lambda = 1 and 0.9 at lambda = 2."""
    shape = weight_shape(torch.tensor([1.0, 1.5, 2.0]), torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64))
    assert (shape.mean, shape.p10, shape.p50, shape.p90) == pytest.approx((1.375, 1.0, 1.0, 2.0))


def test_objective_reads_the_calibration_of_its_config(tmp_path) -> None:
    """PreferenceObjective.from_config builds lambda from the config's calibration file: T = 8 flow sigmas,
    table (2, 1, 1.6, 1) over 4 bins -> (1, 1, 1.625, 1.625, 1.625, 1.625, 2, 2) as in the piecewise test."""
    from types import SimpleNamespace

    from prefopt_core.objective import PreferenceObjective

    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(calibration_record([2.0, 1.0, 1.6, 1.0], {})))
    cfg = load_config(None, ["loss.timestep_weight=calibrated", f"loss.timestep_weight_calibration={path}"])
    adapter = SimpleNamespace(schedule=flow(*torch.linspace(0.1, 0.9, 8).tolist()))
    objective = PreferenceObjective.from_config(adapter, cfg)  # type: ignore[arg-type]
    assert objective.lambda_table.tolist() == [1.0, 1.0, 1.625, 1.625, 1.625, 1.625, 2.0, 2.0]
