"""Training in operation: LoRA adapters with a tracking server that is down.

(A worker failure, a killed driver and ZeRO-2/ZeRO-3 equivalence are in tests/test_train.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from prefopt_core.config import load_config
from ray_jobs.train import run_training
from tests._runs import train_overrides

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_lora_run_with_tracking_server_down(tmp_path, tiny_sd3, cache8):
    """LoRA rank 4 with nothing listening at the MLflow URI (one run checks both: each Ray Train run costs
    tens of seconds of start-up on 2 cores).

    LoRA: only adapter weights train; the reference is the base with adapters disabled (its probe errors
    stay those of the pretrained model: kl/ref_init == 0, read from the Ray Train result, not MLflow);
    the adapters load with pipe.load_lora_weights and give the same images as the fused full export.
    MLflow down: training still completes, and the metrics of every step are spilled locally and replay
    into a real store afterwards (steps 1..4 of `loss`)."""
    from ray_jobs.tracking import replay_pending

    cfg = load_config(
        ROOT / "configs/demo.yaml",
        [
            *train_overrides(tmp_path, tiny_sd3, cache8, "lora"),
            "reference.strategy=frozen",
            "model.lora_rank=4",
            "train.max_steps=4",
            "train.eval_every=2",
            "tracking.uri=http://127.0.0.1:9",
            "tracking.require_server=false",
        ],
    )
    summary = run_training(cfg)
    assert summary.mlflow_run_id is None and summary.final_metrics["step"] == 4
    assert summary.final_metrics["kl/ref_init"] == 0.0 and summary.final_metrics["kl/policy_init"] > 0

    pending = Path(cfg.workdir) / "mlflow_pending.jsonl"
    rows = [json.loads(line) for line in pending.read_text().splitlines()]
    assert sorted({r["step"] for r in rows if r["key"] == "loss"}) == [1, 2, 3, 4]
    uri = f"sqlite:///{tmp_path / 'later.db'}"
    assert replay_pending(uri, pending) == len(rows)
    client = mlflow.MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])[0]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]

    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    def sample(pipe):
        return pipe(
            "a red circle",
            height=32,
            width=32,
            num_inference_steps=3,
            guidance_scale=1.0,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images[0]

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    base = sample(pipe)
    pipe.load_lora_weights(Path(cfg.workdir) / "export" / "lora")
    with_lora = sample(pipe)
    fused = sample(
        StableDiffusion3Pipeline.from_pretrained(
            tiny_sd3, transformer=SD3Transformer2DModel.from_pretrained(summary.export_dir)
        )
    )
    assert np.abs(with_lora - base).max() > 1e-4
    np.testing.assert_allclose(with_lora, fused, atol=1e-4)
