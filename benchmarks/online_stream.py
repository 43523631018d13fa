"""The ``online`` benchmark row: streaming vs round-based online training on the toy base.

Both arms start from the same toy base (the shipped one, ``pipelines.toy_base_asset.shipped_base``), sample the
same toy-world prompts with the same scorer, make the same number of optimizer steps on the same number of
pairs, with the same Ray (same CPUs): ``ROUNDS`` rounds of ``STEPS_PER_ROUND`` steps on ``PROMPTS`` fresh
prompts each (rounds: one pass over each round's pairs, the policy refreshed every ``STEPS_PER_ROUND`` steps)
vs one streaming run of ``ROUNDS * STEPS_PER_ROUND`` steps fed by one rollout actor that takes the policy
every ``online.sync_every`` = ``STEPS_PER_ROUND`` steps: both sample from a policy at most one refresh old.

Reported, interleaved over the size's repeats (repeat ``r`` runs both arms with ``run.seed = r``, so the
repeats differ as two runs of a user would): the wall time of the whole command (median ratio streaming /
rounds; rounds evaluates after every round, as that mode does, streaming only its export) and the held-out
``outline_style`` mean of each arm's final export, measured after all repeats by one common ``prefopt eval`` of
every export (untimed; the config's held-out prompts x ``EVAL_SEEDS`` seeds, the same for every export). The
reward comparison is read against :func:`reward_noise`: the run-to-run std over the repeats and the
evaluation's sampling error, whichever is larger.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import Row, fmt, interleaved, median, paired_ratio

logger = logging.getLogger("benchmarks.online")

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 4
STEPS_PER_ROUND = 4
BATCH, WORKERS = 2, 2
#: One pass per round: every kept pair of a round is trained once, as in the streaming arm.
PROMPTS = STEPS_PER_ROUND * BATCH * WORKERS
#: Seeds per held-out prompt of the common evaluation of the final exports (the config's 8 prompts: 128
#: samples per export, a sampling error of about 0.04 on a score with std 0.5).
EVAL_SEEDS = 16
SCORER = "outline_style"


def online_config(workdir: Path, base: Path, mode: str, name: str, seed: int = 0):
    """The arm's config: configs/online_streaming_toy.yaml with the shared base, prompts, steps and seed."""
    from prefopt_core.config import load_config

    return load_config(
        ROOT / "configs/online_streaming_toy.yaml",
        [
            f"run.name={name}",
            f"run.workdir={workdir}",
            f"run.seed={seed}",
            f"model.pretrained={base}",
            "model.max_sequence_length=16",
            f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
            f"online.mode={mode}",
            f"online.rounds={ROUNDS}",
            f"online.steps_per_round={STEPS_PER_ROUND}",
            f"online.num_prompts={PROMPTS}",
            "online.num_actors=1",
            "online.rollout_actors=1",
            f"online.sync_every={STEPS_PER_ROUND}",
            f"train.max_steps={ROUNDS * STEPS_PER_ROUND}",
            f"train.batch_size={BATCH}",
            f"train.num_workers={WORKERS}",
            "train.checkpoint_every=0",
            "train.resume=never",
            "train.sample_prompts=0",
            "online.eval_every=null",  # no evaluator actor taking CPUs from the streaming arm
        ],
    )


def common_eval(workdir: Path, base: Path, exports: dict[str, str]) -> dict[str, tuple[float, float, int]]:
    """``{name: (mean, per-sample std, samples)}`` of the ``outline_style`` score of every export, by one
    ``prefopt eval`` on the held-out prompts x ``EVAL_SEEDS`` seeds."""
    from prefopt_core.config import config_from_dict
    from ray_jobs.evaluate import run_eval

    data = online_config(workdir, base, "rounds", "online-eval").to_dict()
    data["eval"].update(
        models=[f"{name}={path}" for name, path in exports.items()],
        baseline=str(base),
        seeds=list(range(EVAL_SEEDS)),
    )
    cfg = config_from_dict(data)
    metrics = run_eval(cfg)["metrics"]
    samples = (cfg.eval.num_prompts or 0) * len(cfg.eval.seeds)
    return {
        name: (
            float(metrics[f"eval/{name}/{SCORER}/mean"]),
            float(metrics[f"eval/{name}/{SCORER}/std"]),
            samples,
        )
        for name in exports
    }


def sampling_error(scores: dict[str, tuple[float, float, int]], arms: Sequence[str]) -> float:
    """The sampling error of the difference of two arms' evaluations, ``sqrt(se_a² + se_b²)``; an arm's ``se``
    is the mean over its exports (``"<arm>-r<repeat>"`` in ``scores``) of ``std / sqrt(samples)``."""
    per_arm = [
        statistics.fmean(
            std / math.sqrt(n) for name, (_, std, n) in scores.items() if name.startswith(f"{arm}-")
        )
        for arm in arms
    ]
    return math.sqrt(sum(se**2 for se in per_arm))


def reward_noise(streaming: Sequence[float], rounds: Sequence[float], sample_se: float) -> float:
    """The noise a difference of the two arms' mean rewards is read against: the larger of the run-to-run
    std (pooled over the arms' repeats, ddof 1: ``sqrt((sd_s² + sd_r²) / 2)``; 0 with one repeat) and
    ``sample_se``, the sampling error of the difference of two evaluations (``sqrt(se_s² + se_r²)``, each
    ``se = per-sample std / sqrt(samples)``)."""
    sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in (streaming, rounds)]
    return max(math.sqrt((sd[0] ** 2 + sd[1] ** 2) / 2), sample_se)


def reward_verdict(streaming: Sequence[float], rounds: Sequence[float], noise: float) -> str:
    """``"not lower beyond noise"`` when ``mean(streaming) - mean(rounds) >= -noise``, else ``"lower beyond
    noise"``."""
    diff = statistics.fmean(streaming) - statistics.fmean(rounds)
    return "not lower beyond noise" if diff >= -noise else "lower beyond noise"


def bench_online(ctx) -> list[Row]:
    """Streaming vs rounds: wall time and final held-out reward, side by side in one run."""
    from pipelines.toy_base_asset import shipped_base
    from ray_jobs.online_loop import run_online

    base = shipped_base()
    walls: dict[str, list[float]] = {"streaming": [], "rounds": []}
    exports: dict[str, str] = {}
    for r, arm in interleaved(["streaming", "rounds"], ctx.size.repeats):
        ctx.settle()
        workdir = ctx.workdir / "runs" / f"online-{arm}-r{r}"
        t0 = time.perf_counter()
        summary = run_online(online_config(workdir, base, arm, f"online-{arm}-r{r}", seed=r))
        walls[arm].append(time.perf_counter() - t0)
        exports[f"{arm}-r{r}"] = summary["final_export"]
        logger.info("online repeat %d %-9s %.1f s", r, arm, walls[arm][-1])
    scores = common_eval(ctx.workdir / "runs" / "online-eval", base, exports)
    rewards = {arm: [scores[f"{arm}-r{r}"][0] for r in range(ctx.size.repeats)] for arm in walls}
    se = sampling_error(scores, list(walls))
    noise = reward_noise(rewards["streaming"], rewards["rounds"], se)
    verdict = reward_verdict(rewards["streaming"], rewards["rounds"], noise)

    def spread(arm: str) -> str:
        values = rewards[arm]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{fmt(statistics.fmean(values))} ± {fmt(sd, 2)}"

    common = (
        f"toy base, {PROMPTS} prompts x {ROUNDS} rounds, {ROUNDS * STEPS_PER_ROUND} DPO steps of "
        f"{BATCH} x {WORKERS} pairs, policy refreshed every {STEPS_PER_ROUND} steps in both arms, periodic "
        f"reference; {ctx.size.repeats} repeat(s), run.seed = repeat"
    )
    diff = statistics.fmean(rewards["streaming"]) - statistics.fmean(rewards["rounds"])
    return [
        Row(
            "`prefopt online`: streaming vs rounds, wall time",
            "streaming",
            "rounds",
            median(walls["streaming"]),
            median(walls["rounds"]),
            "s",
            ratio=paired_ratio(walls["streaming"], walls["rounds"]),
            higher_is_better=False,
            notes=f"{common}; whole command incl. start-up, rounds' per-round evaluations and the final one",
        ),
        Row(
            "`prefopt online`: final held-out outline-style reward",
            "streaming",
            "rounds",
            statistics.fmean(rewards["streaming"]),
            statistics.fmean(rewards["rounds"]),
            "mean score",
            ratio=None,
            bold=False,
            notes=f"{common}; mean ± std over repeats: streaming {spread('streaming')}, rounds "
            f"{spread('rounds')}; difference {diff:+.3f}, noise {noise:.3f} (larger of the repeats' pooled std "
            f"and the evaluation's sampling error {se:.3f}: one common eval of the final exports, {EVAL_SEEDS} "
            "seeds x 8 held-out prompts): streaming's "
            f"reward is **{verdict}**",
        ),
    ]
