"""The ``online`` benchmark row: streaming vs round-based online training on the toy base.

Both arms start from the same toy base (the shipped one, ``pipelines.toy_base_asset.shipped_base``), sample the same toy-world prompts with the same scorer, make the same number of optimizer steps
on the same number of pairs, with the same Ray (same CPUs): ``ROUNDS`` rounds of ``STEPS_PER_ROUND`` steps
on ``PROMPTS`` fresh prompts each (rounds: one pass over each round's pairs) vs one streaming run of
``ROUNDS * STEPS_PER_ROUND`` steps fed by one rollout actor. Reported, interleaved over the size's repeats:
wall time of the whole command (median ratio streaming / rounds) and the final held-out ``outline_style``
mean of each arm's last policy (the ``eval`` section: the same prompts and seeds for both); the spread of
each arm's reward over the repeats is the run-to-run noise the comparison is read against.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Row, fmt, interleaved, median, paired_ratio

logger = logging.getLogger("benchmarks.online")

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 2
STEPS_PER_ROUND = 8
BATCH, WORKERS = 2, 2
#: One pass per round: every kept pair of a round is trained once, as in the streaming arm.
PROMPTS = STEPS_PER_ROUND * BATCH * WORKERS
REWARD = "eval/outline_style/mean"


def online_config(workdir: Path, base: Path, mode: str, name: str):
    """The arm's config: configs/online_streaming_toy.yaml with the shared base, prompts and steps."""
    from prefopt_core.config import load_config

    return load_config(
        ROOT / "configs/online_streaming_toy.yaml",
        [
            f"run.name={name}",
            f"run.workdir={workdir}",
            f"model.pretrained={base}",
            "model.max_sequence_length=16",
            f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
            f"online.mode={mode}",
            f"online.rounds={ROUNDS}",
            f"online.steps_per_round={STEPS_PER_ROUND}",
            f"online.num_prompts={PROMPTS}",
            "online.num_actors=1",
            "online.rollout_actors=1",
            f"train.max_steps={ROUNDS * STEPS_PER_ROUND}",
            f"train.batch_size={BATCH}",
            f"train.num_workers={WORKERS}",
            "train.checkpoint_every=0",
            "train.resume=never",
            "train.sample_prompts=0",
            "online.eval_every=null",  # no evaluator actor taking CPUs from the streaming arm
        ],
    )


def final_reward(summary: dict[str, Any]) -> float:
    """The held-out reward of the arm's last policy (streaming: its run; rounds: the last round)."""
    metrics = summary["metrics"]
    if summary.get("mode") == "streaming":
        return float(metrics[REWARD])
    return float(metrics[f"r{summary['rounds'] - 1}/{REWARD}"])


def bench_online(ctx) -> list[Row]:
    """Streaming vs rounds: wall time and final held-out reward, side by side in one run."""
    from pipelines.toy_base_asset import shipped_base
    from ray_jobs.online_loop import run_online

    base = shipped_base()
    walls: dict[str, list[float]] = {"streaming": [], "rounds": []}
    rewards: dict[str, list[float]] = {"streaming": [], "rounds": []}
    for r, arm in interleaved(["streaming", "rounds"], ctx.size.repeats):
        ctx.settle()
        workdir = ctx.workdir / "runs" / f"online-{arm}-r{r}"
        t0 = time.perf_counter()
        summary = run_online(online_config(workdir, base, arm, f"online-{arm}-r{r}"))
        walls[arm].append(time.perf_counter() - t0)
        rewards[arm].append(final_reward(summary))
        logger.info("online repeat %d %-9s %.1f s, reward %.4f", r, arm, walls[arm][-1], rewards[arm][-1])

    def spread(arm: str) -> str:
        return f"{fmt(min(rewards[arm]))}–{fmt(max(rewards[arm]))}"

    common = (
        f"toy base, {PROMPTS} prompts x {ROUNDS} rounds, {ROUNDS * STEPS_PER_ROUND} DPO steps of "
        f"{BATCH} x {WORKERS} pairs, periodic reference; {ctx.size.repeats} repeat(s)"
    )
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
            notes=f"{common}; whole command incl. start-up and the final evaluation",
        ),
        Row(
            "`prefopt online`: final held-out outline-style reward",
            "streaming",
            "rounds",
            median(rewards["streaming"]),
            median(rewards["rounds"]),
            "mean score",
            ratio=paired_ratio(rewards["streaming"], rewards["rounds"]),
            notes=f"{common}; run-to-run noise = range over repeats: streaming {spread('streaming')}, "
            f"rounds {spread('rounds')}",
        ),
    ]
