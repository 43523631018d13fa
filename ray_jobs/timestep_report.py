"""``prefopt timesteps CONFIG``: the shape of every timestep weight ``lambda(t)`` over a config's training
timesteps, the sigma range of its gamma bins, and the calibration table of ``lambda = calibrated``.

    prefopt timesteps configs/sd3_refupdate_dpo.yaml                    # shapes + gamma bins' sigma ranges
    prefopt timesteps CONFIG --calibrate RUN_ID [--out PATH]           # + write the calibration JSON

The schedule is read from the pipeline's ``scheduler/scheduler_config.json`` (its shift included), no
weights; a ``tiny`` pipeline is built first when missing. The training-timestep distribution is exact
(:func:`prefopt_core.timesteps.timestep_probs`: the config's sampling, logit mean/std, gamma and bins), and
for each variant the table prints the mean and the 10/50/90th percentiles of ``lambda`` under it.

``--calibrate RUN_ID``: the calibration of ``lambda = calibrated`` from a finished (short) run in the config's
MLflow store (``--tracking-uri`` wins): per metric bin ``k`` the mean over the run's logged history of
``bins/abs_margin_k`` (runs that predate it: ``|bins/margin_k|``). Calibrate from a run trained with
``loss.timestep_weight=none``, so that the margins are the unweighted reward scale. The JSON is written to
``--out`` (default ``<workdir>/timestep_calibration.json``) and the overrides that use it are printed.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from prefopt_core.config import ConfigError, RunConfig
from prefopt_core.storage import Location
from prefopt_core.timestep_weights import (
    CALIBRATION_KEY,
    TIMESTEP_WEIGHTS,
    calibration_record,
    parse_calibration,
    read_calibration,
    timestep_weight_table,
    weight_shape,
)
from prefopt_core.timesteps import METRIC_BINS, NoiseSchedule, gamma_bin_sigma_ranges, timestep_probs

logger = logging.getLogger(__name__)

#: The file name of the calibration JSON in a workdir (``--out`` default).
CALIBRATION_FILE = "timestep_calibration.json"


def schedule_of(cfg: RunConfig) -> NoiseSchedule:
    """The training noise schedule of ``cfg``'s model, from its pipeline's scheduler config (no weights)."""
    root = cfg.base_model_dir
    path = root / "scheduler" / "scheduler_config.json"
    if not path.exists() and cfg.tiny_preset is not None:
        from pipelines.base_model import prepare_base_model

        root = prepare_base_model(cfg)
        path = root / "scheduler" / "scheduler_config.json"
    if not path.exists():
        raise ConfigError(
            f"model.pretrained={cfg.model.pretrained!r}: {path} does not exist; point model.pretrained at a "
            "diffusers pipeline (the toy base is built by `prefopt cache CONFIG`)"
        )
    kind = "flow" if cfg.model.family == "sd3" else "ddpm"
    return NoiseSchedule.from_scheduler_config(kind, path.read_json())


def bin_abs_margins(
    histories: dict[str, list[tuple[int, float]]], num_bins: int = METRIC_BINS
) -> tuple[list[float], str]:
    """Per metric bin, the mean over a run's history of ``bins/abs_margin_k`` (else of ``|bins/margin_k|``).

    ``histories``: ``{metric: [(step, value), ...]}``. Returns the ``num_bins`` values (bin 0 the least noisy)
    and the metric used; :class:`ConfigError` when a bin was never logged.
    """
    for name, transform in (("abs_margin", float), ("margin", abs)):
        keys = [f"bins/{name}_{k}" for k in range(num_bins)]
        if all(histories.get(key) for key in keys):
            means = [sum(transform(v) for _, v in histories[key]) / len(histories[key]) for key in keys]
            return means, f"bins/{name}" + ("" if name == "abs_margin" else " (absolute value)")
    missing = [k for k in range(num_bins) if not histories.get(f"bins/abs_margin_{k}")]
    raise ConfigError(
        f"the run logged no bins/abs_margin (nor bins/margin) for bins {missing}: calibrate from a dpo/kto "
        "training run long enough to reach an eval (train.eval_every) with pairs in every timestep bin"
    )


def calibrate_from_run(uri: str, run_id: str, out: Location) -> dict[str, Any]:
    """Write the calibration JSON of MLflow run ``run_id`` to ``out``; returns the record."""
    from ray_jobs.compare import fetch_histories, select_runs

    runs = select_runs(uri, None, [run_id])
    metrics = [f"bins/{n}_{k}" for n in ("abs_margin", "margin") for k in range(METRIC_BINS)]
    histories = fetch_histories(uri, runs, metrics)[runs[0].run_id]
    means, metric = bin_abs_margins(histories)
    record = calibration_record(means, {"run_id": run_id, "run_name": runs[0].name, "metric": metric})
    parse_calibration(record, f"run {run_id}")  # every bin must have a finite, positive scale
    out.write_json(record, indent=1)
    return record


def shape_lines(cfg: RunConfig, schedule: NoiseSchedule, calibration: Any | None) -> list[str]:
    """One line per timestep weight: mean and 10/50/90th percentiles over the config's training timesteps."""
    T = schedule.num_train_timesteps
    timesteps = cfg.timestep_config()
    probs = timestep_probs(T, timesteps)
    lines = [f"{'weight':<26}{'mean':>7}{'p10':>7}{'p50':>7}{'p90':>7}"]
    for weight in TIMESTEP_WEIGHTS:
        if weight == "calibrated" and calibration is None:
            lines.append(f"{weight:<26}  (needs {CALIBRATION_KEY} or --calibrate RUN_ID)")
            continue
        s = weight_shape(timestep_weight_table(schedule, weight, calibration), probs)  # type: ignore[arg-type]
        mark = "  <- loss.timestep_weight" if weight == cfg.loss.timestep_weight else ""
        lines.append(f"{weight:<26}{s.mean:>7.3f}{s.p10:>7.3f}{s.p50:>7.3f}{s.p90:>7.3f}{mark}")
    return lines


def gamma_lines(schedule: NoiseSchedule, bins: int, gamma: float) -> list[str]:
    """The sigma range of each gamma bin (bin 0 the noisiest) with its sampling probability."""
    from prefopt_core.timesteps import gamma_bin_probs

    ranges, probs = gamma_bin_sigma_ranges(schedule, bins), gamma_bin_probs(bins, gamma)
    lines = [f"gamma bins (gamma {gamma:g}, bin 0 the noisiest): bin  P(bin)  sigma range"]
    for k in range(bins):
        lo, hi = ranges[k].tolist()
        lines.append(f"  {k:>3}  {float(probs[k]):.4f}  [{lo:.6f}, {hi:.6f}]")
    return lines


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``prefopt timesteps`` (the CLI builds the parser)."""
    p.add_argument("config", help="CONFIG.yaml, then dotted.key=value overrides")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--calibrate", metavar="RUN_ID", help="write the calibration JSON from this MLflow run")
    p.add_argument("--out", help=f"where --calibrate writes (default <workdir>/{CALIBRATION_FILE})")
    p.add_argument("--tracking-uri", help="MLflow tracking URI of --calibrate (default: the config's)")


def run(ns: argparse.Namespace) -> int:
    """Print the shapes (and write the calibration): raise :class:`ConfigError` for what the user must change."""
    from ray_jobs.preflight import load_user_config

    cfg = load_user_config(ns.config, ns.overrides)
    if ns.out and not ns.calibrate:
        raise ConfigError("--out is where --calibrate RUN_ID writes; pass --calibrate too")
    schedule = schedule_of(cfg)
    try:
        calibration = None
        if ns.calibrate:
            out = Location(ns.out) if ns.out else cfg.workdir / CALIBRATION_FILE
            record = calibrate_from_run(ns.tracking_uri or cfg.tracking_uri, ns.calibrate, out)
            calibration = parse_calibration(record, str(out))
            print(f"wrote {out}: use loss.timestep_weight=calibrated {CALIBRATION_KEY}={out}", flush=True)
        elif cfg.loss.timestep_weight_calibration is not None:
            calibration = read_calibration(cfg.loss.timestep_weight_calibration)
    except ValueError as err:  # a calibration table that cannot be used: the user's to fix
        raise ConfigError(str(err)) from None
    t = cfg.timestep_config()
    detail = f", gamma {t.gamma:g}, {t.bins} bins" if t.sampling == "gamma" else ""
    if t.sampling == "logit_normal":
        detail = f", mean {t.logit_mean:g}, std {t.logit_std:g}"
    print(
        f"lambda(t) over the training timesteps of {ns.config}: {cfg.model.family} ({schedule.kind} schedule, "
        f"T = {schedule.num_train_timesteps}), sampling {t.sampling}{detail}",
        flush=True,
    )
    print("\n".join(shape_lines(cfg, schedule, calibration)), flush=True)
    if t.sampling == "gamma":
        print("\n".join(gamma_lines(schedule, t.bins, t.gamma)), flush=True)
    return 0
