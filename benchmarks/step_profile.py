"""Where a ``prefopt train`` step's time goes: the ``step_profile`` benchmark (``python -m benchmarks.run --only
step_profile``).

One worker (the ``train_overhead`` setting: the benchmark model, DPO, live frozen reference, ZeRO-2, all cores)
runs ``WorkerRecipe.train`` under :mod:`cProfile`, once with ``train.log_every=1`` (metrics reduced, copied to
the host and logged after every step) and once with the default ``log_every``. The breakdown is the cumulative
time of the functions below, per optimizer step, over the whole ``train`` call (warm-up steps and the final
checkpoint included, so the shares describe a short run; the benchmark's step-time ratios exclude them).
cProfile adds a per-Python-call cost, so Python-heavy parts (batch conversion, metric bookkeeping) read a
little high against the tensor kernels; compare rows within one table.
"""

from __future__ import annotations

import cProfile
import logging
import pstats
from pathlib import Path
from typing import Any

logger = logging.getLogger("benchmarks.step_profile")

_PROFILES = "profile"
#: Breakdown rows: (label, (path suffix, function name) of each function whose cumulative time counts).
CATEGORIES: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("forward + loss (policy and reference)", (("prefopt_core/objective.py", "__call__"),)),
    ("backward (`engine.backward`)", (("deepspeed/runtime/engine.py", "backward"),)),
    ("optimizer step (`engine.step`)", (("deepspeed/runtime/engine.py", "step"),)),
    ("batch iteration and conversion", (("ray_jobs/training/recipe.py", "_batches"), ("objective.py", "to"))),
    ("per-bin metric accumulation", (("prefopt_core/metrics.py", "update"),)),
    ("grad norm read", (("deepspeed/runtime/engine.py", "get_global_grad_norm"),)),
    ("reference strategy (per step)", (("prefopt_core/reference.py", "on_optimizer_step"),)),
    ("metric flush (all-reduce, host copy, MLflow)", (("ray_jobs/training/recipe.py", "_flush"),)),
    ("eval metrics (probe KL, bins)", (("ray_jobs/training/recipe.py", "_eval_metrics"),)),
    ("checkpoint", (("ray_jobs/training/recipe.py", "_checkpoint"),)),
)
TOTAL = ("ray_jobs/training/recipe.py", "train")


def profiling_train_loop(loop_config: dict[str, Any]) -> None:
    """``ray_jobs.training.recipe.train_loop_per_worker`` with ``WorkerRecipe.train`` run under cProfile; the
    stats go to ``<run.workdir>/profile/rank<R>.pstats``."""
    from unittest import mock

    import ray.train

    from ray_jobs.training import recipe as train

    rank_file = Path(loop_config["inputs"].config.workdir) / _PROFILES

    class ProfiledRecipe(train.WorkerRecipe):
        def train(self) -> dict[str, float]:
            profiler = cProfile.Profile()
            try:
                return profiler.runcall(super().train)
            finally:
                rank_file.mkdir(parents=True, exist_ok=True)
                profiler.dump_stats(str(rank_file / f"rank{ray.train.get_context().get_world_rank()}.pstats"))

    with mock.patch.object(train, "WorkerRecipe", ProfiledRecipe):
        train.train_loop_per_worker(loop_config)


def cumulative(stats: pstats.Stats, where: tuple[str, str]) -> float:
    """Cumulative seconds of the functions whose file ends with ``where[0]`` and whose name is ``where[1]``
    (summed over the matches; recursion counted once by cProfile's cumulative time)."""
    suffix, name = where
    return sum(
        entry[3]
        for (path, _, func), entry in stats.stats.items()  # type: ignore[attr-defined]
        if func == name and path.replace("\\", "/").endswith(suffix)
    )


def breakdown(stats: pstats.Stats, steps: int) -> dict[str, float]:
    """``{label: seconds per optimizer step}`` for :data:`CATEGORIES`, plus ``"other"`` (the rest of ``train``)
    and ``"total"``."""
    total = cumulative(stats, TOTAL)
    rows = {label: sum(cumulative(stats, w) for w in where) / steps for label, where in CATEGORIES}
    rows["other (loop, progress, scheduler, Python)"] = max(0.0, total / steps - sum(rows.values()))
    rows["total"] = total / steps
    return rows


def breakdown_table(arms: dict[str, dict[str, float]]) -> str:
    """Markdown: one row per category, per arm ``s/step`` and share of the arm's total."""
    names = list(arms)
    lines = [
        "| part of `WorkerRecipe.train` | " + " | ".join(f"{n}: ms/step | share" for n in names) + " |",
        "|---|" + "---|---|" * len(names),
    ]
    for label in next(iter(arms.values())):
        cells = []
        for n in names:
            value, total = arms[n][label], arms[n]["total"]
            cells.append(f"{1000 * value:.1f} | {100 * value / total:.1f} %")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bench_step_profile(ctx) -> list:
    """The two profiled runs (``ctx``: ``benchmarks.run.Context``); writes the breakdown table next to the
    results file (``step_profile.md``) and returns one results row (profiled ms/step, default vs
    ``log_every=1``)."""
    import shutil

    from benchmarks.common import Row, workers_run
    from prefopt_core.config import TrainSection
    from ray_jobs.training.driver import run_training

    s = ctx.size
    steps = max(s.warmup + s.steps, 20)  # the default log_every must flush at least twice
    default = TrainSection.model_fields["log_every"].default
    arms: dict[str, dict[str, float]] = {}
    for log_every in (1, default):
        ctx.settle()
        cfg = ctx.config(
            f"step-profile-log{log_every}",
            "train.num_workers=1",
            f"train.cpus_per_worker={ctx.threads}",
            f"train.max_steps={steps}",
            f"train.log_every={log_every}",
        )
        shutil.rmtree(cfg.workdir, ignore_errors=True)
        with workers_run(profiling_train_loop):
            run_training(cfg)
        profile = pstats.Stats(str(Path(cfg.workdir) / _PROFILES / "rank0.pstats"))
        arms[f"log_every={log_every}"] = breakdown(profile, steps)
    out = Path(__file__).resolve().parent / "step_profile.md"
    out.write_text(
        "# Where a `prefopt train` step goes\n\n"
        f"`python -m benchmarks.run --only step_profile` ({s.name} size, {steps} steps, 1 worker, "
        f"{ctx.threads} threads; see `benchmarks/step_profile.py`).\n\n{breakdown_table(arms)}\n"
    )
    flush = "metric flush (all-reduce, host copy, MLflow)"
    one, dflt = arms["log_every=1"], arms[f"log_every={default}"]
    return [
        Row(
            f"Step profile (cProfile, 1 worker): log_every={default} (default) vs log_every=1",
            f"log_every={default}",
            "log_every=1",
            1000 * dflt["total"],
            1000 * one["total"],
            "ms/step",
            ratio=dflt["total"] / one["total"],
            higher_is_better=False,
            bold=False,  # one profiled run per arm, no repeats: a breakdown, not a comparison
            notes=f"metric flush {1000 * dflt[flush]:.1f} vs {1000 * one[flush]:.1f} ms/step; forward + loss "
            f"{100 * dflt['forward + loss (policy and reference)'] / dflt['total']:.0f} %, backward "
            f"{100 * dflt['backward (`engine.backward`)'] / dflt['total']:.0f} % of the default's step; "
            f"whole breakdown in `benchmarks/step_profile.md`; {steps} steps incl. warm-up and checkpoint; one "
            "run per arm, so the ratio is within run-to-run noise",
        )
    ]
