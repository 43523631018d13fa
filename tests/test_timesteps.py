"""Timestep samplers, TimestepConfig and the timestep weight lambda(t) against hand-derived values."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from scipy.stats import chisquare

from prefopt_core.timesteps import (
    TIMESTEP_WEIGHTS,
    NoiseSchedule,
    TimestepConfig,
    gamma_bin_bounds,
    gamma_bin_probs,
    sample_timesteps,
    timestep_bin,
    timestep_weight,
    timestep_weight_table,
)

T = 1000


def sd15_schedule() -> NoiseSchedule:
    return NoiseSchedule.from_ddpm_scheduler(
        DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    )


def sd3_schedule() -> NoiseSchedule:
    return NoiseSchedule.from_flow_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- gamma sampling


def test_gamma_bin_frequencies_match_geometric_law() -> None:
    """T=1000, K=10 bins of 100 steps, bin 0 = [900, 1000) (noisiest), so bin(t) = (999 - t) // 100.
    P(k) = 0.9^k / sum_{j<10} 0.9^j = 0.9^k * 0.1 / (1 - 0.9^10) (P(0) = 0.1535). 200k draws, chi-square
    goodness of fit against those probabilities, 9 dof; a wrong law (e.g. bins reversed) gives p ~ 0."""
    t = sample_timesteps(200_000, T, sampling="gamma", generator=gen(0), gamma=0.9, bins=10)
    k = (T - 1 - t) // 100
    observed = torch.bincount(k, minlength=10).double()
    expected = gamma_bin_probs(10, 0.9) * len(t)
    assert expected[0].item() / len(t) == pytest.approx(0.1 / (1 - 0.9**10))
    assert chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3
    # Inside the noisiest bin the 100 timesteps 900..999 are equally likely (about 30.7k draws).
    inside = torch.bincount(t[k == 0] - 900, minlength=100).double()
    assert inside.min() > 0
    assert chisquare(inside.numpy()).pvalue > 1e-3


def test_gamma_bin_zero_holds_the_largest_timesteps() -> None:
    """gamma = 1e-12 puts probability 1 - ~1e-12 on bin 0, so every draw lands in [900, 1000)."""
    t = sample_timesteps(5000, T, sampling="gamma", generator=gen(1), gamma=1e-12, bins=10)
    assert t.min().item() >= 900 and t.max().item() <= 999


def test_gamma_bins_when_t_not_divisible() -> None:
    """T=10, K=3: ascending edges j*10//3 = 0, 3, 6, 10 -> ranges [0,3) [3,6) [6,10); bin 0 is the
    noisiest, so lo = [6, 3, 0], hi = [10, 6, 3]. Draws with gamma=1 cover all 10 timesteps and with
    gamma=1e-12 stay in [6, 10)."""
    lo, hi = gamma_bin_bounds(10, 3)
    assert lo.tolist() == [6, 3, 0] and hi.tolist() == [10, 6, 3]
    t = sample_timesteps(3000, 10, sampling="gamma", generator=gen(2), gamma=1.0, bins=3)
    assert sorted(t.unique().tolist()) == list(range(10))
    t0 = sample_timesteps(500, 10, sampling="gamma", generator=gen(3), gamma=1e-12, bins=3)
    assert t0.min().item() >= 6 and t0.max().item() <= 9


def test_gamma_rejects_more_bins_than_timesteps() -> None:
    with pytest.raises(ValueError, match="bins must be in"):
        sample_timesteps(1, 10, sampling="gamma", generator=gen(0), bins=11)


# ---------------------------------------------------------------- uniform / logit-normal


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal", "gamma"])
def test_samplers_in_range_and_reproducible(sampling: str) -> None:
    """Same seed -> identical draws; another seed -> different draws; all in [0, T), int64, shape (n,)."""
    a = sample_timesteps(4096, T, sampling=sampling, generator=gen(7))  # type: ignore[arg-type]
    b = sample_timesteps(4096, T, sampling=sampling, generator=gen(7))  # type: ignore[arg-type]
    c = sample_timesteps(4096, T, sampling=sampling, generator=gen(8))  # type: ignore[arg-type]
    assert a.dtype == torch.int64 and a.shape == (4096,)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min().item() >= 0 and a.max().item() <= T - 1


@pytest.mark.parametrize(("logit_mean", "median"), [(0.0, 500), (1.0, 731)])
def test_logit_normal_median_and_direction(logit_mean: float, median: int) -> None:
    """u = sigmoid(z), z ~ N(m, 1), t = floor(u*T): median(t) = floor(sigmoid(m)*1000), i.e. 500 for m=0 and
    floor(731.06) = 731 for m=1 (a positive mean favours noisier t). Standard error of the sample median
    for 20k draws is about 2-3 steps; the tolerance is 15."""
    t = sample_timesteps(20_000, T, sampling="logit_normal", generator=gen(4), logit_mean=logit_mean)
    assert abs(t.double().median().item() - median) <= 15


def test_invalid_sampling_lists_valid_options() -> None:
    with pytest.raises(ValueError, match=r"'uniform', 'logit_normal', 'gamma'"):
        sample_timesteps(1, T, sampling="beta", generator=gen(0))  # type: ignore[arg-type]


# ---------------------------------------------------------------- schedules and lambda(t)


def test_ddpm_inv_sqrt_snr_hand_values() -> None:
    """SD1.5 scaled_linear: beta_0 = 0.00085, alpha_bar_0 = 0.99915, 1/sqrt(SNR_0) = sqrt(0.00085/0.99915)
    = 0.0291671582. DDPM linear (1e-4 .. 0.02): beta_1 = 1e-4 + 0.0199/999 = 1.199199e-4,
    alpha_bar_1 = 0.9999 * (1 - 1.199199e-4) = 0.9997800921, 1/sqrt(SNR_1) = 0.0148309237.
    diffusers stores alphas_cumprod in float32, whose spacing near 1 (6e-8) is ~7e-5 of 1 - alpha_bar_0,
    so the comparison is to rel=1e-4 (a missing sqrt or an inverted ratio is off by orders of magnitude)."""
    assert sd15_schedule().inv_sqrt_snr()[0].item() == pytest.approx(0.0291671582, rel=1e-4)
    linear = NoiseSchedule.from_ddpm_scheduler(DDPMScheduler(beta_schedule="linear"))
    assert linear.table[1].item() == pytest.approx(0.9997800921, rel=1e-6)
    assert linear.inv_sqrt_snr()[1].item() == pytest.approx(0.0148309237, rel=1e-4)


def test_flow_table_is_ascending_shifted_sigmas() -> None:
    """shift=3: sigma(s) = 3s/(1+2s) with s = (t+1)/T. t=0: s=0.001 -> 0.003/1.002 = 0.0029940120 and
    1/sqrt(SNR) = sigma/(1-sigma) = 3s/(1-s) = 0.003/0.999 = 0.0030030030; t=T-1: s=1 -> sigma = 1.
    A previous set_timesteps (inference sigmas) must not change the training table."""
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    table = NoiseSchedule.from_flow_scheduler(sched).table
    assert table[0].item() == pytest.approx(0.0029940120, rel=1e-6)
    assert table[-1].item() == 1.0
    assert (table.diff() >= 0).all()
    assert sd3_schedule().inv_sqrt_snr()[0].item() == pytest.approx(0.0030030030, rel=1e-5)
    sched.set_timesteps(28)
    assert torch.equal(NoiseSchedule.from_flow_scheduler(sched).table, table)


@pytest.mark.parametrize("make_schedule", [sd15_schedule, sd3_schedule], ids=["ddpm_sd15", "flow_sd3"])
def test_inv_sqrt_snr_weight_endpoints_monotone_finite(make_schedule) -> None:
    """lambda = 1 + (x - min x)/(max x - min x) with x = 1/sqrt(SNR) non-decreasing in t, so lambda(0) = 1
    and lambda(T-1) = 2 exactly, non-decreasing and finite in between (flow sigma = 1 at T-1 is clipped)."""
    lam = timestep_weight_table(make_schedule(), "inv_sqrt_snr")
    assert lam.shape == (T,)
    assert lam[0].item() == 1.0 and lam[-1].item() == 2.0
    assert torch.isfinite(lam).all() and (lam.diff() >= 0).all()


def test_inv_sqrt_snr_weight_at_hand_derived_points() -> None:
    """alpha_bar = (1, 0.5, 0.2): 1/sqrt(SNR) = sqrt((1 - a)/a) = (0, 1, 2), min-max (0, 0.5, 1), so
    lambda = (1, 1.5, 2)."""
    schedule = NoiseSchedule(kind="ddpm", table=torch.tensor([1.0, 0.5, 0.2], dtype=torch.float64))
    assert timestep_weight_table(schedule, "inv_sqrt_snr").tolist() == [1.0, 1.5, 2.0]


def test_none_weight_is_one_everywhere() -> None:
    """weight "none": lambda(t) = 1 for all T timesteps."""
    assert torch.equal(timestep_weight_table(sd3_schedule(), "none"), torch.ones(T))


def test_unknown_timestep_weight_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="valid options: \\['none', 'inv_sqrt_snr'\\]"):
        timestep_weight_table(sd15_schedule(), "snr")  # type: ignore[arg-type]
    assert TIMESTEP_WEIGHTS == ("none", "inv_sqrt_snr")


def test_timestep_weight_gathers_table() -> None:
    """timestep_weight(t, table) = table[t]; SD1.5 endpoints: lambda(0) = 1, lambda(999) = 2."""
    table = timestep_weight_table(sd15_schedule(), "inv_sqrt_snr")
    t = torch.tensor([999, 0, 500])
    torch.testing.assert_close(timestep_weight(t, table), torch.stack([table[999], table[0], table[500]]))
    assert timestep_weight(t, table)[:2].tolist() == [2.0, 1.0]


def test_timestep_config_from_mapping_reads_its_fields_only() -> None:
    """A cache's precompute settings hold the TimestepConfig fields plus other keys (epochs, reference)."""
    settings = {
        "epochs": 2,
        "sampling": "gamma",
        "logit_mean": 0.5,
        "logit_std": 2.0,
        "gamma": 0.8,
        "bins": 10,
        "reference": None,
    }
    assert TimestepConfig.from_mapping(settings) == TimestepConfig("gamma", 0.5, 2.0, 0.8, 10)
    with pytest.raises(KeyError, match="bins"):
        TimestepConfig.from_mapping({k: v for k, v in settings.items() if k != "bins"})


def test_schedule_validation() -> None:
    with pytest.raises(ValueError, match=r"'ddpm', 'flow'"):
        NoiseSchedule(kind="edm", table=torch.ones(3))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-increasing"):
        NoiseSchedule(kind="ddpm", table=torch.tensor([0.5, 0.9]))


def test_timestep_bin() -> None:
    """bin = t*10 // 1000: t=0,99 -> 0; t=100 -> 1; t=999 -> 9 (bin 9 the noisiest)."""
    t = torch.tensor([0, 99, 100, 999])
    assert timestep_bin(t, T).tolist() == [0, 0, 1, 9]
