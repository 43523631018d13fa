"""Periodic held-out evaluation of streaming online training (``online.eval_every``), beside the trainer.

:class:`PolicyEvaluator` is a Ray actor holding the base pipeline, the eval scorers (``eval.scorers``) and
the held-out prompts (``eval.prompts`` / ``eval.num_prompts``). It generates the base model's images for
``prompts x eval.seeds`` once; then, for each publication the policy store hands it
(:func:`ray_jobs.training.policy_sync.eval_due` steps), it loads the published weights into its own copy
of the denoiser, generates the same prompts from the same paired noise, scores them and logs
``eval/<scorer>/{mean,win_rate,adoption_rate,base_mean}`` (the final evaluation's names,
:func:`ray_jobs.online_common.eval_metrics`) at that step in the run's MLflow run. Its calls queue in the
actor; the trainer only publishes and never waits for them.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from prefopt_core.config import RunConfig

logger = logging.getLogger(__name__)


class PolicyEvaluator:
    """Ray actor (``ray.remote(PolicyEvaluator)``); ``run_id`` None: nothing is logged (MLflow down),
    results are still returned by :meth:`results`. ``lora``: as :class:`pipelines.rollout.RolloutWorker`'s."""

    def __init__(self, cfg: RunConfig, base_model_dir: str, run_id: str | None, lora: dict | None) -> None:
        from pipelines.evaluation import load_prompts
        from pipelines.rewards import build_scorer
        from pipelines.rollout import attach_lora, pipeline_denoiser
        from prefopt_core.models.base import TORCH_DTYPES
        from prefopt_core.models.registry import adapter_for
        from ray_jobs.evaluate import scorer_labels

        self.cfg, self.run_id, self.lora = cfg, run_id, lora
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = TORCH_DTYPES[cfg.model.dtype]
        self.pipe = adapter_for(cfg.model, base_model_dir).pipeline(dtype=dtype).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.denoiser = pipeline_denoiser(self.pipe)
        self.prompts = load_prompts(cfg.eval.prompts, cfg.eval.num_prompts)
        labels = scorer_labels(cfg.eval.scorers)
        self.scorers = dict(zip(labels, (build_scorer(spec) for spec in cfg.eval.scorers), strict=True))
        self.base = self._score()  # before any policy is loaded: the base model
        attach_lora(self.denoiser, lora)
        self.done: dict[int, dict[str, float]] = {}

    def _score(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray | None]]:
        """``({scorer: (S, P) scores}, {scorer: (S, P) detections or None})`` of the pipeline as it is."""
        from pipelines.evaluation import detect_grid, generate_images, score_grid

        e, family = self.cfg.eval, self.cfg.model.family
        images = generate_images(
            self.pipe,
            self.prompts,
            e.seeds,
            resolution=self.cfg.model.resolution,
            num_inference_steps=e.num_inference_steps,
            guidance_scale=e.guidance_scale,
            batch_size=e.batch_size,
            call_kwargs={"max_sequence_length": self.cfg.model.max_sequence_length}
            if family == "sd3"
            else {},
        )
        scores = {label: score_grid(s, images, self.prompts) for label, s in self.scorers.items()}
        return scores, {label: detect_grid(s, images) for label, s in self.scorers.items()}

    def evaluate(self, step: int, state_ref: list) -> dict[str, float]:
        """Evaluate the policy published after ``step`` (``[object ref]`` of its state dict) against the
        base model and log the metrics at ``step``."""
        import ray

        from pipelines.evaluation import summarize
        from pipelines.rollout import load_policy_state
        from ray_jobs import tracking
        from ray_jobs.evaluate import BASELINE_NAME, flat_metrics
        from ray_jobs.online_common import POLICY_NAME, eval_metrics

        load_policy_state(self.denoiser, ray.get(state_ref[0]), self.lora)
        scores, detections = self._score()
        results = summarize(
            {BASELINE_NAME: self.base[0], POLICY_NAME: scores},
            BASELINE_NAME,
            {BASELINE_NAME: self.base[1], POLICY_NAME: detections},
        )
        metrics = eval_metrics(flat_metrics(results))
        if self.run_id is not None:
            tracking.log_metrics(self.cfg.tracking_uri, self.run_id, metrics, step=step)
        logger.info("held-out evaluation at step %d: %s", step, metrics)
        self.done[step] = metrics
        return metrics

    def results(self) -> dict[int, dict[str, float]]:
        """``{step: metrics}`` of the evaluations finished so far (a step evaluated again after a training
        restart keeps its latest)."""
        return dict(self.done)


def eval_steps(eval_every: int | None, max_steps: int) -> list[int]:
    """The steps the periodic evaluation covers: ``eval_every``, ``2 * eval_every``, ... below ``max_steps``."""
    from ray_jobs.training.policy_sync import eval_due

    return [s for s in range(1, max_steps) if eval_due(s, eval_every, max_steps)]


def await_results(evaluator: Any, steps: list[int], timeout_s: float) -> dict[int, dict[str, float]]:
    """The evaluator's results once every one of ``steps`` is done (or ``timeout_s`` passed: a warning
    names the missing ones)."""
    import time

    import ray

    deadline = time.perf_counter() + timeout_s
    while True:
        done = ray.get(evaluator.results.remote())
        missing = [s for s in steps if s not in done]
        if not missing:
            return done
        if time.perf_counter() > deadline:
            logger.warning(
                "held-out evaluations of steps %s did not finish within %.0f s", missing, timeout_s
            )
            return done
        time.sleep(0.5)
