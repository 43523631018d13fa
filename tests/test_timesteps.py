"""Noise schedules, timestep samplers, their exact distributions and the gamma bins' sigma ranges against
hand-derived values (lambda(t) is tested in test_timestep_weights.py)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from scipy.stats import chisquare

from prefopt_core.timesteps import (
    NoiseSchedule,
    TimestepConfig,
    gamma_bin_bounds,
    gamma_bin_probs,
    gamma_bin_sigma_ranges,
    sample_timesteps,
    timestep_bin,
    timestep_probs,
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


# ---------------------------------------------------------------- gamma bins on flow matching


def test_gamma_bin_sigma_ranges_flow_shift3() -> None:
    """T = 1000, shift 3, 10 bins: t has s = (t+1)/1000 and sigma = 3s/(1+2s); bin k (0 the noisiest) holds
    t = 900-100k .. 999-100k, so its sigmas run from sigma(0.901-0.1k) to sigma(1-0.1k).
    k = 0: 2.703/2.802 = 0.964668 .. 1;   k = 1: 2.403/2.602 = 0.923520 .. 2.7/2.8 = 0.964286;
    k = 5: 1.203/1.802 = 0.667592 .. 1.5/2 = 0.75;   k = 9: 0.003/1.002 = 0.002994 .. 0.3/1.2 = 0.25.
    diffusers stores the sigmas in float32, hence the 1e-6 relative tolerance."""
    ranges = gamma_bin_sigma_ranges(sd3_schedule(), 10)
    assert ranges.shape == (10, 2)
    expected = {0: (0.964668, 1.0), 1: (0.923520, 0.964286), 5: (0.667592, 0.75), 9: (0.002994, 0.25)}
    for k, (lo, hi) in expected.items():
        assert ranges[k].tolist() == pytest.approx([lo, hi], rel=1e-5), k


def test_gamma_bin_sigma_ranges_descend_with_k() -> None:
    """Bin 0 is the noisiest: every bin's sigmas lie above the next bin's (flow and DDPM alike)."""
    for schedule in (sd3_schedule(), sd15_schedule()):
        ranges = gamma_bin_sigma_ranges(schedule, 10)
        assert (ranges[:-1, 0] > ranges[1:, 1]).all()
        assert (ranges[:, 0] <= ranges[:, 1]).all()


def test_ddpm_sigma_is_sqrt_one_minus_alpha_bar() -> None:
    """alpha_bar = (0.75, 0.36): sigma = sqrt(1 - alpha_bar) = (0.5, 0.8)."""
    schedule = NoiseSchedule(kind="ddpm", table=torch.tensor([0.75, 0.36], dtype=torch.float64))
    assert schedule.sigma().tolist() == pytest.approx([0.5, 0.8])


def test_schedule_from_scheduler_config_matches_the_scheduler() -> None:
    """A scheduler's saved config rebuilds the same table (the shift of a flow config included)."""
    flow = FlowMatchEulerDiscreteScheduler(shift=3.0)
    rebuilt = NoiseSchedule.from_scheduler_config("flow", flow.config)
    assert torch.equal(rebuilt.table, NoiseSchedule.from_flow_scheduler(flow).table)
    ddpm = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert torch.equal(NoiseSchedule.from_scheduler_config("ddpm", ddpm.config).table, sd15_schedule().table)


# ---------------------------------------------------------------- exact timestep distributions


def test_timestep_probs_gamma_hand_values() -> None:
    """T = 10, 3 bins, gamma = 0.5: bins [6,10) [3,6) [0,3) with P = (4, 2, 1)/7, so each t in bin 0 has
    (4/7)/4 = 1/7, in bin 1 (2/7)/3 = 2/21, in bin 2 (1/7)/3 = 1/21."""
    probs = timestep_probs(10, TimestepConfig(sampling="gamma", gamma=0.5, bins=3))
    assert probs.tolist() == pytest.approx([1 / 21] * 3 + [2 / 21] * 3 + [1 / 7] * 4)


def test_timestep_probs_logit_normal_hand_values() -> None:
    """T = 2, logit_normal(0, 1): t = 0 iff u < 1/2 iff z < 0, so P = (1/2, 1/2); with mean 1:
    P(t = 0) = Phi(0 - 1) = 0.158655."""
    assert timestep_probs(2, TimestepConfig(sampling="logit_normal")).tolist() == pytest.approx([0.5, 0.5])
    shifted = timestep_probs(2, TimestepConfig(sampling="logit_normal", logit_mean=1.0))
    assert shifted.tolist() == pytest.approx([0.158655, 0.841345], abs=1e-6)


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal", "gamma"])
def test_timestep_probs_match_the_sampler(sampling: str) -> None:
    """The exact distribution is the sampler's: 100k draws binned into 10 ranges of 100 timesteps, chi-square
    goodness of fit against the summed probabilities (9 dof)."""
    config = TimestepConfig(sampling=sampling, gamma=0.9, bins=10)  # type: ignore[arg-type]
    t = sample_timesteps(
        100_000, T, sampling=config.sampling, generator=gen(5), gamma=config.gamma, bins=config.bins
    )
    observed = torch.bincount(t // 100, minlength=10).double()
    expected = timestep_probs(T, config).reshape(10, 100).sum(1) * len(t)
    assert expected.sum().item() == pytest.approx(len(t))
    assert chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3
