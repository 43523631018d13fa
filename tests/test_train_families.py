"""`prefopt train` through Ray + DeepSpeed for the UNet families, with the full Rethinking-DPO recipe.

(SD3 runs the same recipe in tests/test_train.py: periodic reference, gamma sampling, lambda(t).)
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from prefopt_core.config import load_config
from ray_jobs.cache import run_cache
from ray_jobs.training.driver import run_training

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_refupdate_gamma_lambda_recipe_runs(family, tmp_path, tiny_unets, ray_cluster):
    """Cache + 4 steps with a periodic reference (tau 2, delta inf), gamma-sampled timesteps and the
    lambda(t) timestep weight. Expected from the recipe: reference updates at steps 2 and 4 (ref/updates
    = 2, never frozen); the divergence monitor logs ``kl/policy_init`` at step 0 (policy == init, so
    exactly 0) and at every tau-check (steps 2 and 4, > 0 once the policy has moved); per-bin metrics."""
    cfg = load_config(
        ROOT / "configs/demo.yaml",
        [
            f"run.workdir={tmp_path}",
            f"run.name={family}",
            f"model.family={family}",
            f"model.pretrained={tiny_unets[family]}",
            "data.synthetic.num_pairs=6",
            "data.synthetic.tie_fraction=0",
            "cache.rows_per_shard=6",
            "train.num_workers=1",
            "train.batch_size=2",
            "train.max_steps=4",
            "train.eval_every=4",
            "train.sample_prompts=2",
            "train.sample_steps=2",
            "reference.strategy=periodic",
            "reference.tau=2",
            "timesteps.sampling=gamma",
            "timesteps.bins=10",
            "loss.timestep_weight=inv_sqrt_snr",
            "loss.beta=500",
        ],
    )
    cache = run_cache(cfg)
    assert cache["num_pairs"] == 6
    summary = run_training(cfg)
    client = mlflow.MlflowClient(summary.mlflow_tracking_uri)
    run = client.get_run(summary.mlflow_run_id)
    assert run.data.metrics["ref/updates"] == 2.0 and run.data.metrics["ref/frozen"] == 0.0
    kl = client.get_metric_history(summary.mlflow_run_id, "kl/policy_init")
    assert [m.step for m in kl] == [0, 2, 4] and kl[0].value == 0.0 and kl[1].value > 0 and kl[2].value > 0
    assert any(k.startswith("bins/acc_") for k in run.data.metrics)
    artifacts = [a.path for a in client.list_artifacts(summary.mlflow_run_id, "samples")]
    assert artifacts == ["samples/step_00000004.png"]
    assert (Path(summary.export_dir) / "config.json").exists() and Path(summary.export_dir).name == "unet"
