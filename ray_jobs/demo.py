"""``prefopt demo``: the whole path once, on embedded defaults (``configs/demo.yaml``).

toy base (the tiny SD3 trained on the toy world and shipped in ``pipelines/assets/toy_base``, hash-checked) ->
synthetic Pick-a-Pic-schema pairs that prefer the outlined ("cartoon") image -> Ray Data latent cache -> Ray
Train + DeepSpeed Diffusion-DPO -> MLflow -> diffusers export -> style adoption rate *and* fidelity (colour and
shape accuracy: does the sample still show what the prompt names?) of the base and the trained model on
held-out prompts x ``eval.seeds``. Writes ``<workdir>/demo_summary.json``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefopt_core.config import TOY_BASE_REBUILD, RunConfig

logger = logging.getLogger(__name__)

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
#: Scorer whose ``adoption_rate`` the demo reports.
STYLE_SCORER = "outline_style"
#: Fidelity scorers whose mean (fraction of samples right) the demo reports before -> after.
FIDELITY_SCORERS: tuple[str, ...] = ("color_accuracy", "shape_accuracy")


def evaluation_config(cfg: RunConfig, export_dir: str) -> RunConfig:
    """``cfg`` with ``eval`` set to: the trained export vs the base, outline-style scorer, held-out prompts.

    The prompts are the toy testbed's held-out colour x shape captions (written to ``<workdir>/eval_prompts.txt``)
    unless ``eval.prompts`` is set; seeds, steps and guidance come from ``cfg.eval``.
    """
    from pipelines.toy_prompts import heldout_prompts

    data = cfg.to_dict()
    ev = data["eval"]
    if ev["prompts"] is None:
        path = cfg.workdir / "eval_prompts.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(heldout_prompts()) + "\n")
        ev["prompts"] = str(path)
    ev["models"] = [f"trained={export_dir}"]
    for name in (STYLE_SCORER, *FIDELITY_SCORERS):
        if not any(spec.get("name") == name for spec in ev["scorers"]):
            ev["scorers"] = [*ev["scorers"], {"name": name}]
    return RunConfig.model_validate(data)


def run_demo(cfg: RunConfig) -> dict[str, Any]:
    from ray_jobs.cache import run_cache
    from ray_jobs.evaluate import run_eval
    from ray_jobs.training.driver import run_training

    if cfg.model.pretrained == TOY_BASE_REBUILD and not (cfg.base_model_dir / "model_index.json").exists():
        logger.info(
            "demo: training the toy base into %s first (once; tens of minutes on a CPU)", cfg.base_model_dir
        )
    cache = run_cache(cfg)
    train = run_training(cfg)
    summary: dict[str, Any] = {
        "mlflow_tracking_uri": train.mlflow_tracking_uri,
        "mlflow_run_id": train.mlflow_run_id,
        "export_dir": train.export_dir,
        "base_model_dir": cache["base_model_dir"],
        "cache_dir": cache["cache_dir"],
        "num_pairs": cache["num_pairs"],
        "num_quarantined": cache["num_quarantined"],
        "final_metrics": train.final_metrics,
    }
    if train.export_dir is None:
        logger.warning("demo: train.export=false, so there is no trained model to evaluate")
        return summary
    evaluation = run_eval(evaluation_config(cfg, train.export_dir))
    metrics = evaluation["metrics"]
    before = metrics[f"eval/base/{STYLE_SCORER}/adoption_rate"]
    after = metrics[f"eval/trained/{STYLE_SCORER}/adoption_rate"]
    summary.update(
        eval_run_id=evaluation["mlflow_run_id"],
        eval_grid=evaluation["grid"],
        adoption_rate_before=before,
        adoption_rate_after=after,
        win_rate_vs_base=metrics[f"eval/trained/{STYLE_SCORER}/win_rate"],
        fidelity={
            name: {"before": metrics[f"eval/base/{name}/mean"], "after": metrics[f"eval/trained/{name}/mean"]}
            for name in FIDELITY_SCORERS
        },
    )
    n = evaluation["num_prompts"] * len(evaluation["seeds"])
    logger.info(
        "demo: style adoption rate on %d held-out samples (prompts without the style word): base %.3f -> "
        "trained %.3f; per-sample win rate vs base %.3f; grid %s",
        n,
        before,
        after,
        summary["win_rate_vs_base"],
        evaluation["grid"],
    )
    return summary


def outcome_lines(summary: dict[str, Any]) -> list[str]:
    """The demo's last words on the console: style adoption and fidelity (colour, shape accuracy), each
    base -> trained, on the held-out prompts without the style word."""
    if "adoption_rate_before" not in summary:
        return ["no trained model was evaluated (train.export=false)"]
    lines = [
        f"style adoption rate (held-out prompts without the style word): base "
        f"{summary['adoption_rate_before']:.3f} -> trained {summary['adoption_rate_after']:.3f}"
    ]
    for name, values in summary.get("fidelity", {}).items():
        label = name.replace("_", " ")
        lines.append(
            f"fidelity, {label} (same samples): base {values['before']:.3f} -> trained {values['after']:.3f}"
        )
    return lines
