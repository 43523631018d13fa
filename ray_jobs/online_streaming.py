"""``prefopt online CONFIG online.mode=streaming``: one training run fed by rollout actors.

::

    RolloutWorker x online.rollout_actors ──push rows (version v)──▶ PairBuffer ──take──▶ Ray Train workers
          ▲  (restarted by Ray when they die)    (capacity, staleness,  (one run, train.max_steps steps,
          │                                        at-most-once ledger)   the recipe of `prefopt train`)
          └──────── PolicyStore ◀── rank 0 publishes weights every online.sync_every steps ──┘

The driver starts the buffer, the policy store and the rollouts, waits for the first rows (their shapes
are the recipe's "manifest"; the first ``reference.probe_size`` rows are the divergence probe), fits one
``TorchTrainer`` whose workers run :class:`ray_jobs.training.recipe.WorkerRecipe` on a
:class:`~ray_jobs.training.context.StreamingContext`, restarts rollout loops whose actor died (Ray
restarts the actor; the driver counts it), then closes the buffer, evaluates the export on held-out
prompts (``eval`` section, logged as ``eval/<scorer>/...`` at the last step of the training run) and
writes ``<workdir>/online_summary.json``. With ``online.eval_every`` an evaluator actor
(:mod:`ray_jobs.online_eval`) also scores the policy published every ``eval_every`` steps while training
goes on (logged at those steps); the driver waits for its queue after training.

Everything lives under ``<workdir>/online_stream/``: ``ledger.jsonl`` (every row handed to training),
``attempt`` (launch counter: a rerun samples new ids and seeds) and the training run's ``ray_results``.
A rerun after the driver died resumes the training run from its last checkpoint (``train.resume=auto``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from prefopt_core.config import ConfigError, RunConfig, config_from_dict, flatten
from ray_jobs.online_common import eval_config, eval_metrics, online_settings, resolve_prompts
from ray_jobs.online_eval import await_results, eval_steps

logger = logging.getLogger(__name__)

STREAM_DIR = "online_stream"
#: Seconds the driver waits for the rollouts' first rows before giving up.
FIRST_ROWS_TIMEOUT_S = 600.0
#: Seconds the driver waits, after training, for the periodic evaluations still queued.
EVAL_TIMEOUT_S = 1800.0


def next_attempt(stream_dir: Path) -> int:
    """The launch number of this driver (0, 1, ...), persisted so a rerun never reuses pair ids."""
    path = stream_dir / "attempt"
    attempt = int(path.read_text()) + 1 if path.exists() else 0
    stream_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(str(attempt))
    return attempt


def streaming_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker: the training recipe on the pair buffer."""
    from ray_jobs.training.context import StreamingContext
    from ray_jobs.training.recipe import WorkerRecipe, run_recipe

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = loop_config["inputs"].config
    ctx = StreamingContext(
        loop_config["buffer"],
        loop_config["store"],
        cfg.online.sync_every,
        loop_config.get("progress_sink"),
        eval_every=cfg.online.eval_every,
        max_steps=cfg.train.max_steps,
    )
    run_recipe(WorkerRecipe(loop_config["inputs"], ctx))


class RolloutSupervisor:
    """Keeps one ``run`` call in flight per rollout actor until the buffer closes; a call that fails
    because its actor died (Ray restarts the actor) is counted and started again."""

    def __init__(self, actors: list, buffer: Any, store: Any) -> None:
        self.actors, self.buffer, self.store = actors, buffer, store
        self.restarts = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rollout-supervisor", daemon=True)

    def start(self) -> RolloutSupervisor:
        self._thread.start()
        return self

    def _loop(self) -> None:
        import ray
        from ray.exceptions import RayActorError

        pending = {a.run.remote(self.buffer, self.store): a for a in self.actors}
        while pending and not self._stop.is_set():
            done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in done:
                actor = pending.pop(ref)
                try:
                    ray.get(ref)
                except RayActorError as exc:
                    if self._stop.is_set():
                        continue
                    self.restarts += 1
                    logger.warning("rollout actor died (%s): waiting for Ray to restart it", exc)
                    self.buffer.forget.remote(self.actors.index(actor))
                    if self._await_restart(actor):
                        pending[actor.run.remote(self.buffer, self.store)] = actor
                except Exception as exc:  # a bug in sampling: keep it for the summary, do not loop on it
                    self.errors.append(repr(exc))
                    logger.error("rollout loop failed: %r", exc)

    def _await_restart(self, actor: Any) -> bool:
        """Block until ``actor`` answers again (calls made while it restarts fail); False when stopped."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        while not self._stop.is_set():
            try:
                ray.get(actor.pid.remote(), timeout=5.0)
                return True
            except (RayActorError, GetTimeoutError):
                time.sleep(0.5)
        return False

    def stop(self, timeout_s: float = 60.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)


def rollout_actor_name(cfg: RunConfig, index: int) -> str:
    """The Ray actor name of rollout ``index`` of a run (``ray.get_actor`` finds it while the run lives)."""
    return f"{cfg.run.name}-rollout-{index}"


def _start_actors(
    cfg: RunConfig, base: Path, prompts: list[str], attempt: int, stream_dir: Path, run_id: str | None
):
    """``(buffer, store, rollout actors, evaluator or None)``; the evaluator (``online.eval_every``) asks
    for the resources of one rollout actor."""
    import ray

    from pipelines.rollout import RolloutWorker
    from ray_jobs.online_eval import PolicyEvaluator
    from ray_jobs.training.pair_buffer import PairBuffer
    from ray_jobs.training.policy_sync import PolicyStore

    o, m = cfg.online, cfg.model
    lora = (
        {"rank": m.lora_rank, "alpha": m.lora_alpha, "targets": list(m.lora_targets)} if m.lora_rank else None
    )
    evaluator = None
    if o.eval_every is not None:
        evaluator = ray.remote(num_cpus=o.rollout_cpus, num_gpus=o.rollout_gpus)(PolicyEvaluator).remote(
            cfg, str(base), run_id, lora
        )
    buffer = ray.remote(num_cpus=0)(PairBuffer).remote(
        o.buffer_pairs,
        o.max_staleness,
        o.reuse,
        str(stream_dir / "ledger.jsonl"),
        o.on_stale,
        o.sync_every,
        cfg.train.batch_size * cfg.train.num_workers,
    )
    store = ray.remote(num_cpus=0)(PolicyStore).remote(evaluator)
    settings = vars(online_settings(cfg, base, m.init_denoiser, attempt)).copy()
    actor_cls = ray.remote(num_cpus=o.rollout_cpus, num_gpus=o.rollout_gpus, max_restarts=-1)(RolloutWorker)
    actors = [
        actor_cls.options(name=rollout_actor_name(cfg, i)).remote(settings, prompts, lora, i)
        for i in range(o.rollout_actors)
    ]
    return buffer, store, actors, evaluator


def _first_rows(buffer: Any, n: int, supervisor: RolloutSupervisor):
    """The first ``n`` (or fewer) buffered rows, once there are any: shapes and divergence probe."""
    import ray

    t0 = time.perf_counter()
    while (rows := ray.get(buffer.peek.remote(n))) is None:
        if supervisor.errors:
            raise RuntimeError(f"rollouts failed before the first pair: {supervisor.errors[0]}")
        if time.perf_counter() - t0 > FIRST_ROWS_TIMEOUT_S:
            raise TimeoutError(
                f"no pair within {FIRST_ROWS_TIMEOUT_S:.0f} s: every prompt's samples scored within "
                "online.min_margin? lower it or raise online.samples_per_prompt"
            )
        time.sleep(0.2)
    return rows


def _manifest_of(rows) -> dict[str, Any]:
    """The part of a cache manifest the recipe reads: per-row shapes of the tensor columns."""
    from pipelines.cache_format import SHAPES_KEY

    return {"columns": json.loads(rows.schema.metadata[SHAPES_KEY.encode()])}


def build_streaming_trainer(cfg: RunConfig, loop_config: dict[str, Any], storage: Path):
    """One ``TorchTrainer`` (no datasets: the workers read the pair buffer), checkpoints and restarts as
    ``prefopt train``'s."""
    from ray_jobs.training.driver import make_trainer

    return make_trainer(cfg, streaming_loop_per_worker, loop_config, storage=storage)


def _open_run(cfg: RunConfig):
    """``(identity, run_id)`` of the streaming run's MLflow run; ``run_id`` None when MLflow is down."""
    from ray_jobs import tracking
    from ray_jobs.training.driver import tracking_run_key

    tags = {"prefopt.command": "online", "prefopt.online_mode": "streaming", "prefopt.loss": cfg.loss.name}
    identity = tracking.RunIdentity(
        cfg.tracking.experiment, f"{tracking_run_key(cfg)}#stream", cfg.run.name, tags
    )
    try:
        run_id, _ = tracking.find_or_create_run(
            cfg.tracking_uri, identity.experiment, identity.run_key, identity.run_name, tags
        )
        tracking.log_params_once(cfg.tracking_uri, run_id, flatten(cfg.to_dict()))
        return identity, run_id
    except Exception as exc:
        logger.warning(
            "MLflow at %s unreachable (%s): metrics are spilled to the workdir", cfg.tracking_uri, exc
        )
        return identity, None


def _final_eval(cfg: RunConfig, export: Path, base: Path, run_id: str | None) -> dict[str, float]:
    """Held-out evaluation of the export against the base model, logged at the last step."""
    from ray_jobs import tracking
    from ray_jobs.evaluate import run_eval

    data = cfg.to_dict()
    data["run"]["workdir"] = str(cfg.workdir / STREAM_DIR)
    ev = run_eval(eval_config(config_from_dict(data), str(export), base))
    metrics = eval_metrics(ev["metrics"])
    if run_id is not None and metrics:
        tracking.log_metrics(cfg.tracking_uri, run_id, metrics, step=cfg.train.max_steps)
    return metrics


def _wind_down(cfg: RunConfig, buffer: Any, store: Any, actors: list, evaluator: Any):
    """After training: ``(buffer stats, publications, {step: periodic eval metrics})``; the rollouts are
    stopped, the evaluator once its queued evaluations are done."""
    import ray

    stats = ray.get(buffer.stats.remote())
    history = ray.get(store.get_history.remote())
    for handle in actors:
        ray.kill(handle, no_restart=True)
    periodic = {}
    if evaluator is not None:
        steps = eval_steps(cfg.online.eval_every, cfg.train.max_steps)
        periodic = await_results(evaluator, steps, EVAL_TIMEOUT_S)
        ray.kill(evaluator)
    return stats, history, periodic


def run_streaming(cfg: RunConfig) -> dict[str, Any]:
    """Streaming online training (see the module docstring); returns (and writes) the summary."""
    import ray

    from pipelines.base_model import prepare_base_model
    from ray_jobs import tracking
    from ray_jobs.cluster import ensure_ray
    from ray_jobs.training.progress_relay import ProgressRelay
    from ray_jobs.training.state import RecipeInputs

    if cfg.reference.strategy == "precomputed":
        raise ConfigError(
            "online.mode=streaming trains on fresh samples, which have no precomputed reference errors: "
            "use reference.strategy=frozen, periodic or none"
        )
    prompts = resolve_prompts(cfg)
    ensure_ray(cfg)
    stream_dir = cfg.workdir / STREAM_DIR
    storage = stream_dir / "ray_results"
    if cfg.train.resume == "never":
        import shutil

        shutil.rmtree(stream_dir, ignore_errors=True)
    attempt = next_attempt(stream_dir)
    base = prepare_base_model(cfg)
    identity, run_id = _open_run(cfg)
    buffer, store, actors, evaluator = _start_actors(cfg, base, prompts, attempt, stream_dir, run_id)
    supervisor = RolloutSupervisor(actors, buffer, store).start()
    export_dir = stream_dir / "export"
    t0 = time.perf_counter()
    try:
        rows = _first_rows(buffer, cfg.reference.probe_size, supervisor)
        inputs = RecipeInputs(
            config=cfg,
            manifest=_manifest_of(rows),
            tracking_uri=cfg.tracking_uri,
            base_model_dir=str(base),
            export_dir=str(export_dir),
            run_id=run_id,
            run_identity=identity,
            probe=rows,
        )
        with ProgressRelay() as relay:
            loop_config = {"inputs": inputs, "buffer": buffer, "store": store, "progress_sink": relay.sink}
            result = build_streaming_trainer(cfg, loop_config, storage).fit()
        train_s = time.perf_counter() - t0
    except BaseException:
        if run_id is not None:
            tracking.set_terminated(cfg.tracking_uri, run_id, "FAILED")
        raise
    finally:
        ray.get(buffer.close.remote())
        supervisor.stop()
    stats, history, periodic = _wind_down(cfg, buffer, store, actors, evaluator)
    denoiser = export_dir / _denoiser_subfolder(cfg, base)
    evals = _final_eval(cfg, denoiser, base, run_id) if cfg.train.export else {}
    if run_id is not None:
        tracking.set_terminated(cfg.tracking_uri, run_id, "FINISHED")
    summary = {
        "mode": "streaming",
        "mlflow_tracking_uri": cfg.tracking_uri,
        "mlflow_run_id": run_id,
        "attempt": attempt,
        "worker_group_starts": sum(1 for p in history if p["start"]),
        "train_wall_s": train_s,
        "num_prompts": len(prompts),
        "base_model_dir": str(base),
        "final_export": str(denoiser) if cfg.train.export else None,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "ledger": str(stream_dir / "ledger.jsonl"),
        "publications": history,
        "rollout_restarts": supervisor.restarts,
        "rollout_errors": supervisor.errors,
        "periodic_evals": {str(step): metrics for step, metrics in sorted(periodic.items())},
        "metrics": {**stats, **evals},
    }
    (cfg.workdir / "online_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _denoiser_subfolder(cfg: RunConfig, base: Path) -> str:
    from prefopt_core.models.registry import adapter_for

    return adapter_for(cfg.model, base).denoiser_subfolder
