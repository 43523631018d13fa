"""The step-profile breakdown (``benchmarks.step_profile``): categories from cProfile's cumulative times."""

from __future__ import annotations

import cProfile
import pstats

import pytest

from benchmarks.step_profile import breakdown, breakdown_table


def _stats(entries: dict[tuple[str, str], float]) -> pstats.Stats:
    """A Stats object whose functions are ``(path, name)`` with the given cumulative seconds."""
    profile = cProfile.Profile()
    profile.enable()
    profile.disable()
    stats = pstats.Stats(profile)
    stats.stats = {(path, 1, name): (1, 1, 0.0, ct, {}) for (path, name), ct in entries.items()}
    return stats


def test_breakdown_per_step_by_hand():
    """10 steps; ``train`` 10 s cumulative: forward 4 s -> 0.4 s/step, backward 3 -> 0.3, engine step 1 -> 0.1,
    flush 0.5 -> 0.05; other = 1.0 - (0.4 + 0.3 + 0.1 + 0.05) = 0.15; a ``step`` in another file is not
    DeepSpeed's and is ignored."""
    stats = _stats(
        {
            ("/x/ray_jobs/training/recipe.py", "train"): 10.0,
            ("/x/prefopt_core/objective.py", "__call__"): 4.0,
            ("/y/deepspeed/runtime/engine.py", "backward"): 3.0,
            ("/y/deepspeed/runtime/engine.py", "step"): 1.0,
            ("/y/torch/optim/adamw.py", "step"): 0.7,
            ("/x/ray_jobs/training/recipe.py", "_flush"): 0.5,
        }
    )
    rows = breakdown(stats, 10)
    assert rows["forward + loss (policy and reference)"] == pytest.approx(0.4)
    assert rows["backward (`engine.backward`)"] == pytest.approx(0.3)
    assert rows["optimizer step (`engine.step`)"] == pytest.approx(0.1)
    assert rows["metric flush (all-reduce, host copy, MLflow)"] == pytest.approx(0.05)
    assert rows["other (loop, progress, scheduler, Python)"] == pytest.approx(0.15)
    assert rows["total"] == pytest.approx(1.0)


def test_breakdown_table_shows_ms_and_share():
    """0.25 s of a 1 s step: ``250.0 | 25.0 %``."""
    table = breakdown_table({"a": {"flush": 0.25, "total": 1.0}})
    assert table.splitlines()[2] == "| flush | 250.0 | 25.0 % |"
