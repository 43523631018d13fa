"""The timestep weight ``lambda(t)`` that scales the implicit reward of dpo/kto: its variants, the calibration
table of the ``calibrated`` variant, and the shape of ``lambda`` over a run's training timesteps.

Every variant maps the training timesteps of a :class:`~prefopt_core.timesteps.NoiseSchedule` into [1, 2]
and is non-decreasing in t (larger t = noisier), so it only ever *raises* the reward scale of noisy
timesteps, as Rethinking DPO (Kang et al. 2025, arXiv:2505.18736) does. ``x(t) = 1/sqrt(SNR(t))``
(:meth:`NoiseSchedule.inv_sqrt_snr`: DDPM ``sqrt((1-alpha_bar)/alpha_bar)``, flow ``sigma/(1-sigma)``).

Why several: the paper's ``inv_sqrt_snr`` is min-maxed over the schedule's own range. For DDPM (SD1.5/SDXL)
that range is [0.029, 14.6]; for flow matching it is [0.003, 999] (sigma clipped at ``FLOW_SIGMA_MAX``), so
after min-max lambda stays near 1 for almost every t (mean 1.005 on SD3's shift-3 logit-normal
timesteps) and the weight does nothing. ``inv_sqrt_snr_ddpm_range`` and ``log_snr`` are the flow-matching
forms; ``calibrated`` equalises a reward scale measured per timestep bin.

Usage::

    table = timestep_weight_table(schedule, "log_snr")                 # (T,) float32 in [1, 2]
    lam = timestep_weight(t, table)                                    # (B,)
    shape = weight_shape(table, timestep_probs(T, cfg.timestep_config()))   # mean, p10, p50, p90
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from prefopt_core.timesteps import NoiseSchedule, timestep_bin

#: The timestep weight ``lambda(t)`` of the implicit reward (:func:`timestep_weight_table`).
TimestepWeight = Literal["none", "inv_sqrt_snr", "inv_sqrt_snr_ddpm_range", "log_snr", "calibrated"]
TIMESTEP_WEIGHTS: tuple[str, ...] = get_args(TimestepWeight)

#: The config key holding the calibration table of ``calibrated`` (named in its errors).
CALIBRATION_KEY = "loss.timestep_weight_calibration"

#: The DDPM schedule of the models Rethinking DPO trained (SD1.5, SDXL): diffusers' ``scaled_linear`` betas.
PAPER_DDPM_BETA_START = 0.00085
PAPER_DDPM_BETA_END = 0.012
PAPER_DDPM_STEPS = 1000

#: ``kind`` of a calibration JSON (:func:`calibration_record`).
CALIBRATION_KIND = "prefopt.timestep_calibration"


def paper_ddpm_range() -> tuple[float, float]:
    """``(min, max)`` of ``1/sqrt(SNR)`` over SD1.5/SDXL's DDPM schedule (scaled-linear beta 0.00085 -> 0.012,
    1000 steps), built by diffusers' ``DDPMScheduler`` exactly as the SD1.5/SDXL adapters build it.

    min at t = 0: ``alpha_bar_0 = 1 - beta_0``, so ``sqrt(beta_0 / (1 - beta_0)) = sqrt(0.00085/0.99915)
    = 0.029167``; max at t = 999: ``alpha_bar_999 = prod(1 - beta_i) = 0.0046601``, so
    ``sqrt((1 - 0.0046601)/0.0046601) = 14.6146``.
    """
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(
        num_train_timesteps=PAPER_DDPM_STEPS,
        beta_schedule="scaled_linear",
        beta_start=PAPER_DDPM_BETA_START,
        beta_end=PAPER_DDPM_BETA_END,
    )
    x = NoiseSchedule.from_ddpm_scheduler(scheduler).inv_sqrt_snr()
    return float(x.min()), float(x.max())


def _minmax_to_1_2(x: Tensor, lo: float, hi: float) -> Tensor:
    """``1 + (x - lo) / (hi - lo)`` as float32 (all ones when ``hi <= lo``)."""
    if hi <= lo:
        return torch.ones_like(x, dtype=torch.float32)
    return (1.0 + (x - lo) / (hi - lo)).float()


def _pool_adjacent_violators(y: Tensor) -> Tensor:
    """The least-squares non-decreasing fit of ``y`` ``(K,)`` (equal weights), ``(K,)`` float64.

    Hand example: ``[0.5, 1.0, 0.625, 1.0]`` -> the violating pair (1.0, 0.625) is pooled to its mean
    0.8125 -> ``[0.5, 0.8125, 0.8125, 1.0]``.
    """
    blocks: list[list[float]] = []  # [mean, size] of each pooled block, left to right
    for v in y.double().tolist():
        blocks.append([v, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, n2), (m1, n1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    return torch.tensor([m for m, n in blocks for _ in range(int(n))], dtype=torch.float64)


def calibrated_bin_weights(abs_margin: Tensor) -> Tensor:
    """``lambda_k`` of the ``calibrated`` variant from the measured mean ``|reward margin|`` per metric bin.

    ``abs_margin`` ``(K,)``: bin 0 the least noisy (:func:`prefopt_core.timesteps.timestep_bin`), all > 0.
    ``r_k = 1 / abs_margin_k`` (a bin whose reward is half as large gets twice the weight); ``r`` is made
    non-decreasing in noise by isotonic regression (pool adjacent violators), then
    ``lambda_k = min(2, r_k / r_0)``: 1 at the least noisy bin, proportional to ``1/|margin|`` up to a
    ratio of 2, capped at 2 beyond. Returns ``(K,)`` float64 in [1, 2], non-decreasing.

    Hand example: ``abs_margin = [2, 1, 1.6, 1]`` -> ``r = [0.5, 1, 0.625, 1]`` -> isotonic
    ``[0.5, 0.8125, 0.8125, 1]`` -> ``lambda = [1, 1.625, 1.625, 2]``.
    """
    if abs_margin.ndim != 1 or abs_margin.numel() == 0:
        raise ValueError(f"abs_margin must have shape (K,) with K >= 1, got {tuple(abs_margin.shape)}")
    m = abs_margin.double()
    if not (torch.isfinite(m).all() and (m > 0).all()):
        raise ValueError(
            "every bin's mean |reward margin| must be finite and > 0 (a bin with no pairs, or a run that never "
            f"moved from its reference, cannot be calibrated from), got {m.tolist()}"
        )
    r = _pool_adjacent_violators(1.0 / m)
    return (r / r[0]).clamp(max=2.0)


def timestep_weight_table(
    schedule: NoiseSchedule, weight: TimestepWeight, calibration: Tensor | None = None
) -> Tensor:
    """The timestep weight ``lambda(t)`` named ``weight`` over every training timestep, ``(T,)`` float32.

    With ``x(t) = 1/sqrt(SNR(t))`` and ``logSNR(t) = -2 ln x(t)``:

    * ``"none"``: ``lambda(t) = 1``.
    * ``"inv_sqrt_snr"`` (Rethinking DPO, the paper's): ``1 + (x - min x) / (max x - min x)`` over the whole
      table: exactly 1 at t = 0 and 2 at t = T-1. On flow matching x explodes as sigma -> 1, so lambda stays
      near 1 for almost every t (see the shapes below).
    * ``"inv_sqrt_snr_ddpm_range"``: ``x`` clipped to the range ``[a, b] = [0.029167, 14.6146]`` of the DDPM
      schedule the paper used (:func:`paper_ddpm_range`), then ``1 + (clip(x) - a) / (b - a)``: flow and
      DDPM share one scale, and on SD1.5/SDXL's schedule it equals ``inv_sqrt_snr``. For flow
      (``x = sigma/(1-sigma)``) lambda rises linearly in x up to ``sigma = b/(1+b) = 0.936``, 2 beyond
      (sigma = 0.5: ``1 + (1 - a)/(b - a) = 1.0664``; sigma = 0.75: ``1 + (3 - a)/(b - a) = 1.2033``).
    * ``"log_snr"``: min-max over log-SNR, ``1 + (logSNR_max - logSNR(t)) / (logSNR_max - logSNR_min)``,
      i.e. ``1 + ln(x / min x) / ln(max x / min x)``: linear in ``ln x``, so the flow schedule's clipped tail
      no longer squeezes the rest (SD3 shift 3: ``min x = 0.003/0.999``, ``max x = 999``; sigma = 0.5 gives
      ``1 + ln 333 / ln(999 * 333) = 1.4568``).
    * ``"calibrated"``: piecewise constant over the K bins of :func:`prefopt_core.timesteps.timestep_bin`,
      ``lambda(t) = w[bin(t)]`` with ``w = calibrated_bin_weights(calibration)``; ``calibration`` ``(K,)``
      is the measured mean ``|reward margin|`` per bin (:func:`read_calibration`), required.

    Each is non-decreasing in t, lies in [1, 2] and is finite (see :meth:`NoiseSchedule.inv_sqrt_snr` for the
    clips); a constant ``x`` (e.g. T = 1) gives all ones.

    Shapes, mean (p10 / p50 / p90) of lambda over the training timesteps (``prefopt timesteps CONFIG``):

    ========================  ======================  ======================  ======================
    weight                    SD1.5 DDPM, uniform     SD3 flow shift 3,       SD3 flow shift 3,
                                                      logit-normal(0, 1)      gamma 0.9, 50 bins
    ========================  ======================  ======================  ======================
    inv_sqrt_snr              1.205 (1.02/1.11/1.57)  1.005 (1.00/1.00/1.01)  1.071 (1.00/1.02/1.16)
    inv_sqrt_snr_ddpm_range   1.205 (1.02/1.11/1.57)  1.300 (1.06/1.20/1.74)  1.796 (1.27/2.00/2.00)
    log_snr                   1.646 (1.40/1.65/1.91)  1.543 (1.44/1.54/1.64)  1.700 (1.57/1.69/1.85)
    ========================  ======================  ======================  ======================
    """
    T = schedule.num_train_timesteps
    if weight == "none":
        return torch.ones(T, dtype=torch.float32)
    if weight == "calibrated":
        if calibration is None:
            raise ValueError(
                f"timestep weight 'calibrated' needs a calibration table: set {CALIBRATION_KEY} to the JSON "
                "written by `prefopt timesteps CONFIG --calibrate RUN_ID`"
            )
        w = calibrated_bin_weights(calibration)  # (K,)
        return w[timestep_bin(torch.arange(T), T, w.numel())].float()
    if weight not in TIMESTEP_WEIGHTS:
        raise ValueError(f"unknown timestep weight {weight!r}; valid options: {list(TIMESTEP_WEIGHTS)}")
    x = schedule.inv_sqrt_snr()  # (T,) float64, non-decreasing
    if weight == "inv_sqrt_snr":
        return _minmax_to_1_2(x, float(x.min()), float(x.max()))
    if weight == "inv_sqrt_snr_ddpm_range":
        lo, hi = paper_ddpm_range()
        return _minmax_to_1_2(x.clamp(lo, hi), lo, hi)
    log_x = x.log()  # = -logSNR / 2
    return _minmax_to_1_2(log_x, float(log_x.min()), float(log_x.max()))


def timestep_weight(t: Tensor, table: Tensor) -> Tensor:
    """``lambda`` at integer timesteps ``t`` ``(B,)``: ``table[t]`` ``(B,)`` on ``t``'s device."""
    return table.to(t.device)[t.long()]


# ------------------------------------------------------------------------------------------- calibration
def calibration_record(abs_margin: list[float], source: dict[str, Any]) -> dict[str, Any]:
    """The calibration JSON: ``abs_margin`` per metric bin (bin 0 the least noisy) and where it came from."""
    return {
        "kind": CALIBRATION_KIND,
        "num_bins": len(abs_margin),
        "abs_margin": [float(m) for m in abs_margin],
        "source": source,
    }


def parse_calibration(record: Any, where: str) -> Tensor:
    """The ``(K,)`` float64 ``abs_margin`` of a calibration record; ``ValueError`` naming ``where`` otherwise."""
    ok = isinstance(record, dict) and record.get("kind") == CALIBRATION_KIND
    values = record.get("abs_margin") if ok else None
    if not (isinstance(values, list) and values and all(isinstance(v, (int, float)) for v in values)):
        raise ValueError(
            f"{where} is not a timestep calibration table (a JSON object with kind {CALIBRATION_KIND!r} and a "
            "non-empty list abs_margin); write one with `prefopt timesteps CONFIG --calibrate RUN_ID`"
        )
    if record.get("num_bins") != len(values):
        raise ValueError(f"{where}: num_bins {record.get('num_bins')} != {len(values)} abs_margin values")
    margin = torch.tensor(values, dtype=torch.float64)
    calibrated_bin_weights(margin)  # validates the values
    return margin


def read_calibration(where: str) -> Tensor:
    """The calibration table at ``where`` (a local path or an object-store URI) as ``(K,)`` float64."""
    import json

    from prefopt_core.storage import Location

    location = Location(where)
    if not location.exists():
        raise ValueError(f"{CALIBRATION_KEY}: {where} does not exist")
    try:
        record = json.loads(location.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{CALIBRATION_KEY}: {where} is not valid JSON ({err})") from None
    return parse_calibration(record, where)


# ------------------------------------------------------------------------------------------- shape
@dataclass(frozen=True)
class WeightShape:
    """``lambda`` over a run's training timesteps: its mean and 10/50/90th percentiles."""

    mean: float
    p10: float
    p50: float
    p90: float


def weight_shape(table: Tensor, probs: Tensor) -> WeightShape:
    """Mean and percentiles of ``lambda = table[t]`` for ``t ~ probs``; ``table``, ``probs`` ``(T,)``.

    The q-th percentile is the smallest ``lambda`` whose cumulative probability reaches q (of the discrete
    distribution: no interpolation). Hand example: ``table = [1, 1.5, 2]``, ``probs = [0.5, 0.25, 0.25]``:
    mean ``0.5 + 0.375 + 0.5 = 1.375``, p10 = p50 = 1 (the cumulative 0.5 reaches 0.5), p90 = 2.
    """
    if table.shape != probs.shape or table.ndim != 1:
        raise ValueError(f"table and probs must both be (T,), got {tuple(table.shape)}, {tuple(probs.shape)}")
    lam, p = table.double(), probs.double() / probs.double().sum()
    order = lam.argsort()
    lam, cdf = lam[order], p[order].cumsum(0)

    def percentile(q: float) -> float:
        i = int(torch.searchsorted(cdf, torch.tensor([q - 1e-12], dtype=torch.float64)).item())
        return float(lam[min(i, lam.numel() - 1)])

    mean = float((lam * p[order]).sum())
    if not math.isfinite(mean):
        raise ValueError("lambda or the probabilities are not finite")
    return WeightShape(mean=mean, p10=percentile(0.1), p50=percentile(0.5), p90=percentile(0.9))
