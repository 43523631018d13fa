"""``prefopt demo``: the whole path once, on embedded defaults (``configs/demo.yaml``).

synthetic Pick-a-Pic-schema pairs -> Ray Data latent cache -> Ray Train + DeepSpeed Diffusion-DPO on a
tiny SD3 -> MLflow -> diffusers export; writes ``<workdir>/demo_summary.json``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefopt_core.config import RunConfig

logger = logging.getLogger(__name__)

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def run_demo(cfg: RunConfig) -> dict[str, Any]:
    from ray_jobs.cache import run_cache
    from ray_jobs.train import run_training

    cache = run_cache(cfg)
    train = run_training(cfg)
    return {
        "mlflow_tracking_uri": train.mlflow_tracking_uri,
        "mlflow_run_id": train.mlflow_run_id,
        "export_dir": train.export_dir,
        "base_model_dir": cache["base_model_dir"],
        "cache_dir": cache["cache_dir"],
        "num_pairs": cache["num_pairs"],
        "num_quarantined": cache["num_quarantined"],
        "final_metrics": train.final_metrics,
    }
