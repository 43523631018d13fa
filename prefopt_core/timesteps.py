"""The training noise schedule, training-timestep samplers and how a run draws them (:class:`TimestepConfig`).

Convention for every model family: integer training timesteps ``t in {0, ..., T-1}`` with
``T = num_train_timesteps`` (default 1000), and **larger t = noisier**. For DDPM-family models (SD1.5,
SDXL) ``t`` is the scheduler's own timestep. For flow matching (SD3) ``t`` indexes the training sigmas in
ascending order, ``sigma = NoiseSchedule.table[t]``; note that diffusers' flow scheduler stores its sigmas
(and ``timesteps``) in *descending* order, so index ``t`` here is index ``T-1-t`` there.

Samplers take a ``torch.Generator`` so the trainer can draw the timestep of pair ``p`` in epoch ``k``
from a generator seeded by ``(p, k)`` (needed for precomputed reference errors).

Usage::

    schedule = NoiseSchedule.from_ddpm_scheduler(DDPMScheduler.from_pretrained(path, subfolder="scheduler"))
    g = torch.Generator().manual_seed(1234)
    t = sample_timesteps(1, schedule.num_train_timesteps, sampling="gamma", generator=g)   # (1,)
    probs = timestep_probs(schedule.num_train_timesteps, TimestepConfig(sampling="gamma"))  # (T,), sums to 1

The timestep weight ``lambda(t)`` built on these schedules lives in :mod:`prefopt_core.timestep_weights`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

ScheduleKind = Literal["ddpm", "flow"]
SCHEDULE_KINDS: tuple[str, ...] = get_args(ScheduleKind)

Sampling = Literal["uniform", "logit_normal", "gamma"]
SAMPLINGS: tuple[str, ...] = get_args(Sampling)

# Flow matching: 1/sqrt(SNR) = sigma / (1 - sigma) is infinite at sigma = 1 (pure noise, the last training
# sigma). sigma is clipped to at most 1 - 1e-3 (the second-largest unshifted sigma for T = 1000), so the
# largest value is 999.
FLOW_SIGMA_MAX = 1.0 - 1e-3
# DDPM with zero terminal SNR has alpha_bar[T-1] = 0; diffusers' Euler scheduler replaces it with 2**-24.
# alpha_bar is clipped to at least that, so the largest 1/sqrt(SNR) stays finite (about 4096).
DDPM_ALPHA_BAR_MIN = 2.0**-24


#: Timestep bins of the per-bin training metrics (:func:`timestep_bin`, ``prefopt_core.metrics.BinAccumulator``).
METRIC_BINS = 10


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """The training noise schedule, indexed by the integer training timestep ``t`` (larger = noisier).

    ``kind="ddpm"``: ``table[t] = alpha_bar_t`` (``alphas_cumprod``, non-increasing in t, in [0, 1]).
    ``kind="flow"``: ``table[t] = sigma_t`` in (0, 1], non-decreasing in t (``x_t = (1-sigma) x0 + sigma eps``).
    ``table`` is ``(T,)`` float64.
    """

    kind: ScheduleKind
    table: Tensor

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"unknown schedule kind {self.kind!r}; valid kinds: {list(SCHEDULE_KINDS)}")
        table = self.table
        if table.ndim != 1 or table.numel() == 0:
            raise ValueError(f"table must have shape (T,) with T >= 1, got {tuple(table.shape)}")
        if not torch.isfinite(table).all():
            raise ValueError("table must be finite")
        steps = table.diff()
        if self.kind == "ddpm" and not ((steps <= 0).all() and table.min() >= 0 and table.max() <= 1):
            raise ValueError("a ddpm table (alphas_cumprod) must be non-increasing in t and lie in [0, 1]")
        if self.kind == "flow" and not ((steps >= 0).all() and table.min() > 0 and table.max() <= 1):
            raise ValueError("a flow table (sigmas, ascending in t) must be non-decreasing and lie in (0, 1]")

    @property
    def num_train_timesteps(self) -> int:
        return self.table.numel()

    @classmethod
    def from_ddpm_scheduler(cls, scheduler: Any) -> NoiseSchedule:
        """From any diffusers scheduler exposing ``alphas_cumprod`` (DDPM, DDIM, EulerDiscrete, ...)."""
        alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
        if alphas_cumprod is None:
            raise ValueError(
                f"{type(scheduler).__name__} has no alphas_cumprod; is it a flow-matching scheduler?"
            )
        table = torch.as_tensor(alphas_cumprod).detach().to(device="cpu", dtype=torch.float64).clone()
        return cls(kind="ddpm", table=table)

    @classmethod
    def from_flow_scheduler(cls, scheduler: Any) -> NoiseSchedule:
        """From a diffusers ``FlowMatchEulerDiscreteScheduler``: its training sigmas, shift included.

        A fresh scheduler is built from ``scheduler.config`` so that a previous ``set_timesteps`` (which
        replaces ``scheduler.sigmas`` with inference sigmas) cannot leak in. At init diffusers builds
        ``sigmas = shift*s / (1 + (shift-1)*s)`` with ``s = T/T, (T-1)/T, ..., 1/T`` (descending, length T,
        no trailing 0; the shift is skipped when ``use_dynamic_shifting``); the table is that, ascending.
        """
        fresh = type(scheduler).from_config(scheduler.config)
        sigmas = torch.as_tensor(fresh.sigmas).detach().to(device="cpu", dtype=torch.float64)
        num_train_timesteps = int(scheduler.config.num_train_timesteps)
        if sigmas.numel() != num_train_timesteps:
            raise ValueError(
                f"expected {num_train_timesteps} training sigmas from {type(scheduler).__name__}, "
                f"got {sigmas.numel()}"
            )
        return cls(kind="flow", table=sigmas.flip(0).clone())

    @classmethod
    def from_scheduler_config(cls, kind: ScheduleKind, config: Mapping[str, Any]) -> NoiseSchedule:
        """From a pipeline's ``scheduler/scheduler_config.json`` (no weights): ``"ddpm"`` through diffusers'
        ``DDPMScheduler`` (as the SD1.5/SDXL adapters train), ``"flow"`` through
        ``FlowMatchEulerDiscreteScheduler`` (SD3, its ``shift`` included)."""
        from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

        if kind == "ddpm":
            return cls.from_ddpm_scheduler(DDPMScheduler.from_config(dict(config)))
        if kind == "flow":
            return cls.from_flow_scheduler(FlowMatchEulerDiscreteScheduler.from_config(dict(config)))
        raise ValueError(f"unknown schedule kind {kind!r}; valid kinds: {list(SCHEDULE_KINDS)}")

    def sigma(self) -> Tensor:
        """The noise coefficient of ``x_t``, ``(T,)`` float64, non-decreasing in t.

        Flow: ``sigma_t`` (``x_t = (1-sigma) x0 + sigma eps``); DDPM: ``sqrt(1 - alpha_bar_t)``
        (``x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps``).
        """
        return self.table.clone() if self.kind == "flow" else (1.0 - self.table).sqrt()

    def inv_sqrt_snr(self) -> Tensor:
        """``1/sqrt(SNR(t))``, ``(T,)`` float64, finite and non-decreasing in t.

        DDPM: ``sqrt((1 - alpha_bar) / alpha_bar)`` with ``alpha_bar >= DDPM_ALPHA_BAR_MIN``.
        Flow: ``sigma / (1 - sigma)`` with ``sigma <= FLOW_SIGMA_MAX`` (SNR = ((1-sigma)/sigma)^2).
        """
        if self.kind == "ddpm":
            alpha_bar = self.table.clamp(min=DDPM_ALPHA_BAR_MIN)
            return ((1.0 - alpha_bar) / alpha_bar).sqrt()
        sigma = self.table.clamp(max=FLOW_SIGMA_MAX)
        return sigma / (1.0 - sigma)


@dataclass(frozen=True)
class TimestepConfig:
    """How training timesteps are drawn: the :func:`sample_timesteps` arguments besides ``n`` and ``T``.

    Built from a run config by :meth:`prefopt_core.config.RunConfig.timestep_config`; its fields are also the
    timestep keys of a latent cache's precomputed-reference settings (:meth:`from_mapping` reads them back).
    """

    sampling: Sampling = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    gamma: float = 0.9
    bins: int = 50

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> TimestepConfig:
        """From a mapping holding (at least) every field, e.g. ``dataclasses.asdict`` of one plus other keys."""
        return cls(**{f.name: values[f.name] for f in fields(cls)})


def gamma_bin_bounds(num_train_timesteps: int, bins: int) -> tuple[Tensor, Tensor]:
    """Half-open timestep ranges ``[lo[k], hi[k])`` of the gamma-sampling bins, ``k = 0`` the noisiest.

    ``[0, T)`` is cut into ``bins`` contiguous ranges at ``j*T // bins`` (``j = 0..bins``); when T is not
    divisible by ``bins`` the sizes differ by at most one (e.g. T=10, bins=3: sizes 3, 3, 4 from least to
    most noisy, so bin 0 = [6, 10)). Returns two ``(bins,)`` int64 tensors.
    """
    if not 1 <= bins <= num_train_timesteps:
        raise ValueError(f"bins must be in [1, num_train_timesteps={num_train_timesteps}], got {bins}")
    edges = torch.arange(bins + 1, dtype=torch.int64) * num_train_timesteps // bins  # ascending in noise
    lo_ascending, hi_ascending = edges[:-1], edges[1:]
    return lo_ascending.flip(0), hi_ascending.flip(0)


def gamma_bin_sigma_ranges(schedule: NoiseSchedule, bins: int) -> Tensor:
    """The sigma range of each gamma-sampling bin, ``(bins, 2)`` float64: row k = ``[min, max]`` of
    :meth:`NoiseSchedule.sigma` over the bin's timesteps, k = 0 the noisiest.

    The bins cut the training timesteps the scheduler actually uses, so for flow matching they are ranges
    of *shifted* sigmas. Hand case: T = 1000, shift 3, 10 bins. Timestep t has ``s = (t+1)/1000`` and
    ``sigma = 3s/(1+2s)``; bin k holds ``t = 900-100k .. 999-100k``, so ``s`` from ``0.901-0.1k`` to
    ``1-0.1k``, i.e. (to 6 decimals)::

        k:        0        1        2        3        4        5        6        7        8        9
        lo: 0.964668 0.923520 0.875520 0.818801 0.750749 0.667592 0.563670 0.430100 0.252080 0.002994
        hi: 1        0.964286 0.923077 0.875    0.818182 0.75     0.666667 0.5625   0.428571 0.25

    (e.g. k = 0: ``3*0.901/(1+1.802) = 0.964668``; k = 1: ``2.403/2.602 = 0.923520``; k = 9: ``0.003/1.002 = 0.002994`` to ``0.3/1.2 = 0.25``).
    Half of all draws' bins (k = 0..4 of 10) lie above sigma = 0.75 although they are half the timesteps.
    """
    lo, hi = gamma_bin_bounds(schedule.num_train_timesteps, bins)
    sigma = schedule.sigma()  # (T,) non-decreasing
    return torch.stack([sigma[lo], sigma[hi - 1]], dim=1)


def timestep_probs(num_train_timesteps: int, config: TimestepConfig) -> Tensor:
    """The probability of each training timestep under ``config``'s sampling, ``(T,)`` float64, exact.

    * ``"uniform"``: ``1/T``.
    * ``"logit_normal"``: ``t = floor(u*T)``, ``u = sigmoid(z)``, ``z ~ N(m, s)``, so
      ``P(t) = Phi((logit((t+1)/T) - m)/s) - Phi((logit(t/T) - m)/s)`` (``logit(0) = -inf``, ``logit(1) = inf``).
    * ``"gamma"``: ``P(bin k) / size_k`` for t in bin k (:func:`gamma_bin_bounds`, :func:`gamma_bin_probs`).
    """
    T = num_train_timesteps
    if config.sampling not in SAMPLINGS:
        raise ValueError(f"unknown timestep sampling {config.sampling!r}; valid options: {list(SAMPLINGS)}")
    if config.sampling == "uniform":
        return torch.full((T,), 1.0 / T, dtype=torch.float64)
    if config.sampling == "logit_normal":
        edges = torch.arange(T + 1, dtype=torch.float64) / T  # (T+1,) u at the cell edges
        z = (torch.logit(edges) - config.logit_mean) / config.logit_std  # -inf at 0, inf at 1
        cdf = torch.special.ndtr(z)
        return cdf[1:] - cdf[:-1]
    lo, hi = gamma_bin_bounds(T, config.bins)
    per_bin = gamma_bin_probs(config.bins, config.gamma) / (hi - lo).double()  # (bins,)
    probs = torch.zeros(T, dtype=torch.float64)
    for k in range(config.bins):
        probs[lo[k] : hi[k]] = per_bin[k]
    return probs


def gamma_bin_probs(bins: int, gamma: float) -> Tensor:
    """``P(bin k) = gamma^k / sum_j gamma^j`` for ``k = 0..bins-1`` (bin 0 the noisiest), ``(bins,)`` float64."""
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    weights = torch.full((bins,), float(gamma), dtype=torch.float64) ** torch.arange(
        bins, dtype=torch.float64
    )
    return weights / weights.sum()


def _sample_gamma(
    n: int, num_train_timesteps: int, gamma: float, bins: int, generator: torch.Generator
) -> Tensor:
    """Rethinking-DPO gamma sampling: bin k with probability proportional to gamma^k, then uniform in the bin."""
    lo, hi = gamma_bin_bounds(num_train_timesteps, bins)
    probs = gamma_bin_probs(bins, gamma)
    device = generator.device
    k = torch.multinomial(probs.to(device), n, replacement=True, generator=generator)  # (n,)
    lo, hi = lo.to(device)[k], hi.to(device)[k]  # (n,)
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)  # (n,) in [0, 1)
    return (lo + (u * (hi - lo)).long()).clamp(max=hi - 1)


def sample_timesteps(
    n: int,
    num_train_timesteps: int,
    *,
    sampling: Sampling,
    generator: torch.Generator,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    gamma: float = 0.9,
    bins: int = 50,
) -> Tensor:
    """Draw ``n`` training timesteps in ``[0, T)`` (larger = noisier), int64 ``(n,)`` on ``generator.device``.

    * ``"uniform"``: uniform over ``{0..T-1}`` (DDPM/Diffusion-DPO default).
    * ``"logit_normal"``: ``u = sigmoid(N(logit_mean, logit_std))`` from diffusers'
      ``compute_density_for_timestep_sampling`` (SD3, Esser et al. 2024), ``t = floor(u*T)``. ``u`` is the
      noise fraction as in the SD3 paper, so ``logit_mean > 0`` favours noisier timesteps. (diffusers' SD3
      training scripts index their *descending* ``timesteps`` with ``u*T``, i.e. use ``1-u``; the two agree
      for ``logit_mean = 0``, where the distribution is symmetric.)
    * ``"gamma"``: Rethinking DPO (Kang et al. 2025) timestep-aware sampling: ``bins`` contiguous bins,
      bin 0 the noisiest (see :func:`gamma_bin_bounds`), bin k drawn with probability proportional to
      ``gamma^k`` (:func:`gamma_bin_probs`), then uniform inside the bin.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"unknown timestep sampling {sampling!r}; valid options: {list(SAMPLINGS)}")
    if n < 1 or num_train_timesteps < 1:
        raise ValueError(f"need n >= 1 and num_train_timesteps >= 1, got n={n}, T={num_train_timesteps}")
    device = generator.device
    if sampling == "uniform":
        return torch.randint(0, num_train_timesteps, (n,), generator=generator, device=device)
    if sampling == "logit_normal":
        # Imported here: diffusers.training_utils pulls in the model zoo (seconds of import time).
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(
            "logit_normal", n, logit_mean=logit_mean, logit_std=logit_std, device=device, generator=generator
        )  # (n,) in [0, 1]; sigmoid can round to exactly 1 in float32
        return (u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)
    return _sample_gamma(n, num_train_timesteps, gamma, bins, generator)


def timestep_bin(t: Tensor, num_train_timesteps: int, num_bins: int = METRIC_BINS) -> Tensor:
    """Metric bin of each timestep, ``t * num_bins // T`` (int64, same shape as ``t``).

    Bins ascend with t like the timesteps themselves: bin 0 is the least noisy, bin ``num_bins-1`` the
    noisiest (the reverse of the gamma-sampling bins, whose bin 0 is the noisiest, as in the paper).
    """
    if not 1 <= num_bins <= num_train_timesteps:
        raise ValueError(
            f"num_bins must be in [1, num_train_timesteps={num_train_timesteps}], got {num_bins}"
        )
    return (t.long() * num_bins // num_train_timesteps).clamp(0, num_bins - 1)
