"""Training in operation: a tracking server that is down.

(A worker failure, a killed driver and ZeRO-2/ZeRO-3 equivalence are in tests/test_train.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from prefopt_core.config import load_config
from ray_jobs.training.driver import run_training
from tests._runs import train_overrides

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_run_with_tracking_server_down_spills_and_replays(tmp_path, tiny_sd3, cache8):
    """Nothing listens at the MLflow URI: training still completes (the summary has no run id), the
    metrics of every step are spilled to ``<workdir>/mlflow_pending.jsonl``, and they replay into a real
    store afterwards (steps 1..4 of ``loss``, each once). LoRA is tested in tests/test_recipe.py."""
    from ray_jobs.tracking import replay_pending

    cfg = load_config(
        ROOT / "configs/demo.yaml",
        [
            *train_overrides(tmp_path, tiny_sd3, cache8, "down"),
            "train.max_steps=4",
            "train.eval_every=2",
            "tracking.uri=http://127.0.0.1:9",
            "tracking.require_server=false",
        ],
    )
    summary = run_training(cfg)
    assert summary.mlflow_run_id is None and summary.final_metrics["step"] == 4

    pending = Path(cfg.workdir) / "mlflow_pending.jsonl"
    rows = [json.loads(line) for line in pending.read_text().splitlines()]
    assert sorted({r["step"] for r in rows if r["key"] == "loss"}) == [1, 2, 3, 4]
    uri = f"sqlite:///{tmp_path / 'later.db'}"
    assert replay_pending(uri, pending) == len(rows)
    client = mlflow.MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])[0]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
