"""Test helper: the overrides of the small SD3 training runs and MLflow metric histories."""

from __future__ import annotations

import mlflow


def train_overrides(workdir, tiny_sd3, cache, name) -> list[str]:
    """2 workers x 2 pairs, DPO beta 500 at lr 1e-3, a periodic reference (tau 5) with gamma-sampled
    timesteps and the lambda(t) timestep weight: the whole Rethinking-DPO recipe on the tiny SD3."""
    return [
        f"run.workdir={workdir}",
        f"run.name={name}",
        f"model.pretrained={tiny_sd3}",
        "model.max_sequence_length=256",  # the shared cache's (schema default); demo.yaml's toy base reads 16
        f"cache.dir={cache}",
        "train.num_workers=2",
        "train.batch_size=2",
        "train.lr=1e-3",
        "loss.beta=500",
        "reference.strategy=periodic",
        "reference.tau=5",
        "train.eval_every=5",
        "timesteps.sampling=gamma",
        "timesteps.bins=10",
        "loss.timestep_weight=inv_sqrt_snr",
        "train.sample_prompts=0",  # no end-of-run sample grid (tests/test_train_families.py checks it)
    ]


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """``[(step, value), ...]`` of one metric, sorted by step."""
    client = mlflow.MlflowClient(uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
