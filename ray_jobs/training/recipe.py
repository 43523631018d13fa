"""One training worker, read top to bottom: ``setup -> train -> export -> cleanup``.

DeepSpeed engine (ZeRO 0-3) over the trainable denoiser, a frozen reference (or none), the family-agnostic
:class:`prefopt_core.objective.PreferenceObjective`, metrics reduced over workers and logged by rank 0,
sharded checkpoints handed to the runtime, resume from the latest one, progress records for the driver's
console, and a ``save_pretrained`` export of the trained denoiser.

The recipe gets everything it needs as :class:`RecipeInputs` and a :class:`~ray_jobs.training.context.WorkerContext`
(rank, batches, checkpoints): under Ray Train that is :class:`~ray_jobs.training.context.RayTrainContext`
(:func:`train_loop_per_worker`), and a unit test runs the same recipe in one process with
:class:`~ray_jobs.training.context.LocalContext`.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pipelines.cache_reader import batch_from_table
from pipelines.progress import Progress
from prefopt_core.metrics import BinAccumulator
from prefopt_core.objective import PreferenceBatch
from prefopt_core.reference import LIVE_STRATEGIES
from prefopt_core.storage import Location
from ray_jobs.training.context import RayTrainContext, WorkerContext
from ray_jobs.training.state import RecipeInputs, TrainState
from ray_jobs.training.step_metrics import progress_extra, reduce_step_metrics

logger = logging.getLogger(__name__)

CHECKPOINT_TAG = "checkpoint"
COMPLETE_MARKER = "prefopt_checkpoint_complete.json"
REFERENCE_FILE = "reference.pt"


class WorkerRecipe:
    """One training worker: ``setup() -> train() -> export() -> cleanup()``."""

    def __init__(self, inputs: RecipeInputs, ctx: WorkerContext) -> None:
        self.inputs = inputs
        self.cfg = inputs.config
        self.ctx = ctx
        self.rank = ctx.rank
        self.world = ctx.world_size
        self.state = TrainState()
        self.columns = {k: list(v) for k, v in inputs.manifest["columns"].items()}
        self.last_checkpoint_step: int | None = None

    # -------------------------------------------------------------- setup
    def setup(self) -> None:
        import deepspeed

        from prefopt_core.models.registry import adapter_for
        from prefopt_core.objective import PreferenceObjective
        from ray_jobs.training.deepspeed_config import (
            ds_config,
            patch_deepspeed_for_cpu,
            policy_stage,
            share_fp32_master,
            size_of,
        )
        from ray_jobs.training.lora import add_lora
        from ray_jobs.training.optim import build_optimizer

        cfg = self.cfg
        torch.manual_seed(cfg.run.seed)
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        if not cuda:
            patch_deepspeed_for_cpu()
        self.adapter = adapter_for(cfg.model, self.inputs.base_model_dir)
        policy = self.adapter.load_denoiser(cfg.model.init_denoiser, dtype=torch.float32)
        if cfg.train.gradient_checkpointing:
            policy.enable_gradient_checkpointing()
        if cfg.model.lora_rank > 0:
            policy = add_lora(policy, cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_targets)
        policy.train()
        optimizer, scheduler = build_optimizer(policy, cfg.train)
        self.model_size = size_of(policy, self.inputs.base_model_dir)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=policy,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=ds_config(cfg, self.world, size=self.model_size),
        )
        share_fp32_master(self.engine)  # fp32 weights: no second fp32 copy of this rank's partition
        if self.world == 1 and policy_stage(cfg, self.world) == 0:
            # one rank has nothing to average: skip DeepSpeed's flatten / all-reduce / copy-back of every
            # gradient after each backward (about 4 % of a CPU step of the benchmark model)
            self.engine.enable_backward_allreduce = False
        if policy_stage(cfg, self.world) != cfg.train.zero_stage and self.rank == 0:
            logger.info(
                "train.zero_stage=%d on one worker partitions nothing: DeepSpeed runs stage 0",
                cfg.train.zero_stage,
            )
        self._zero3_engines = [self.engine] if cfg.train.zero_stage == 3 else []
        self.objective = PreferenceObjective.from_config(self.adapter, cfg)
        self.refs = self._reference_manager()
        self.reference = self.refs.reference
        self.bins = BinAccumulator(self.adapter.schedule.num_train_timesteps)
        self.metrics = None
        if self.rank == 0:
            from ray_jobs.tracking import MetricBuffer

            self.metrics = MetricBuffer(
                self.inputs.tracking_uri,
                self.inputs.run_id,
                cfg.scratch_dir / "mlflow_pending.jsonl",
                identity=self.inputs.run_identity,
                flush_every=5,
            )
            # a resumed MLflow run may hold steps of an attempt that died after them (before or after its
            # last complete checkpoint): log each step once, whatever step training restarts at
            self.metrics.skip_through(self.metrics.last_logged_step("loss"))
        self._resume()

    def _load_reference(self) -> torch.nn.Module | None:
        """The frozen/periodic reference: the LoRA policy with adapters off, or a copy of the initial
        denoiser (partitioned by an inference-only ZeRO-3 engine when the policy is)."""
        import deepspeed

        from prefopt_core.models.base import TORCH_DTYPES
        from ray_jobs.training.deepspeed_config import ds_config
        from ray_jobs.training.lora import AdaptersDisabled

        cfg = self.cfg
        if cfg.reference.strategy not in LIVE_STRATEGIES:
            return None
        if cfg.model.lora_rank > 0:
            return AdaptersDisabled(self.engine.module)  # the base model, no second copy
        reference = self.adapter.load_denoiser(cfg.model.init_denoiser, dtype=TORCH_DTYPES[cfg.model.dtype])
        reference.requires_grad_(False).eval()
        if cfg.train.zero_stage == 3:
            ref_engine, *_ = deepspeed.initialize(
                model=reference, config=ds_config(cfg, self.world, size=self.model_size, reference=True)
            )
            ref_engine.eval()
            self._zero3_engines.append(ref_engine)
            return ref_engine.module
        return reference.to(self.device)

    def _reference_manager(self):
        """The reference strategy around :meth:`_load_reference`, with the divergence probe set."""
        from prefopt_core.models.base import per_sample_mse
        from prefopt_core.probe import build_probe
        from prefopt_core.reference import ReferenceManager

        cfg, adapter = self.cfg, self.adapter
        probe_table = self.inputs.probe
        probe = None
        if probe_table is not None and probe_table.num_rows:
            pb = batch_from_table(probe_table, self.columns)
            probe = build_probe(
                pb.latents_w,
                {**pb.cond, **pb.cond_w},
                size=min(cfg.reference.probe_size, probe_table.num_rows),
                num_train_timesteps=adapter.schedule.num_train_timesteps,
                seed=cfg.run.seed,
            )

        def errors_fn(module, p):
            x_t = adapter.noisy_latents(p.latents, p.noise, p.t)
            pred = adapter.predict(module, x_t, p.t, p.cond)
            return per_sample_mse(pred, adapter.target(p.latents, p.noise, p.t))

        return ReferenceManager.from_config(
            cfg.reference,
            loss_name=cfg.loss.name,
            reference=self._load_reference(),
            probe=probe,
            errors_fn=errors_fn if probe is not None else None,
            pretrained_fn=lambda: adapter.load_denoiser(cfg.model.init_denoiser, dtype=torch.float32),
            copy_fn=self._copy_weights,
            chunk_size=2 * cfg.train.batch_size,
            device=self.device,
        )

    def _release_zero3(self) -> None:
        """Wait for and release every ZeRO-3 parameter a forward pass left gathered or in flight (its
        prefetches), so weights can be gathered outside forward/backward; every rank (collective-free)."""
        for engine in self._zero3_engines:
            engine.empty_partition_cache()

    def _copy_weights(self, src: torch.nn.Module, dst: torch.nn.Module) -> None:
        """The reference update's copy (either side may be ZeRO-3 partitioned)."""
        from prefopt_core.weights import zero3_copy

        self._release_zero3()
        zero3_copy(src, dst)

    def _resume(self) -> None:
        """Restore engine, reference and :class:`TrainState` from the latest checkpoint, if there is one."""
        self.initial_metrics: dict[str, float] = {}
        with self.ctx.latest_checkpoint() as d:
            if d is None:
                if self.cfg.train.resume == "require":
                    raise RuntimeError(
                        f"train.resume=require but no checkpoint of run {self.cfg.run.name!r} exists under "
                        f"{self.cfg.workdir / 'ray_results'}"
                    )
                if self.rank == 0:
                    logger.info("no checkpoint found for run %r: starting at step 0", self.cfg.run.name)
                self.initial_metrics = self.refs.initialize(self.engine)
                return
            if not (d / COMPLETE_MARKER).exists():
                raise RuntimeError(f"checkpoint {d} has no completion marker: it was not fully written")
            path, client_state = self.engine.load_checkpoint(
                str(d), tag=CHECKPOINT_TAG, load_module_strict=True
            )
            if path is None:  # DeepSpeed returns (None, None) instead of raising
                raise RuntimeError(f"DeepSpeed found no loadable checkpoint in {d}")
            self.refs.load_state_dict(client_state["reference"])
            if not self.refs.reference_is_pretrained:
                self.refs.load_reference_state_dict(torch.load(d / REFERENCE_FILE, weights_only=True))
        self.state = TrainState.from_dict(client_state["train_state"])
        self.last_checkpoint_step = self.state.step
        if self.rank == 0:
            logger.info(
                "resumed from %s at step %d (epoch %d, batch %d)",
                path,
                self.state.step,
                self.state.epoch,
                self.state.batch_in_epoch,
            )

    # -------------------------------------------------------------- train
    def _batches(self) -> Iterator[PreferenceBatch]:
        """Endless micro-batches; epochs re-iterate the shard; skips what a resumed state already consumed."""
        cfg = self.cfg
        while True:
            seed = cfg.run.seed * 1000 + self.state.epoch * 10 + self.rank
            produced = 0
            skip = self.state.batch_in_epoch
            for i, table in enumerate(self.ctx.epoch_batches(cfg.train.batch_size, seed, skip), start=skip):
                produced += 1
                self.state.batch_in_epoch = i + 1
                yield batch_from_table(table, self.columns)
            if produced == 0 and self.state.batch_in_epoch == 0:
                raise RuntimeError(
                    f"worker {self.rank} got no full batch of {cfg.train.batch_size} pairs from the cache; "
                    "use a smaller train.batch_size or fewer train.num_workers"
                )
            self.state.epoch += 1
            self.state.batch_in_epoch = 0

    def _optimizer_step(self, batches: Iterator[PreferenceBatch]) -> tuple[dict[str, torch.Tensor], float]:
        """``grad_accum`` micro-batches and one optimizer step; returns the metric sums (averaged over the
        micro-batches, this worker only) and the seconds spent waiting for data."""
        cfg = self.cfg
        sums: dict[str, torch.Tensor] = {}
        data_s = 0.0
        for _ in range(cfg.train.grad_accum):
            td = time.perf_counter()
            batch = next(batches).to(self.device)
            data_s += time.perf_counter() - td
            epoch = self.state.epoch  # read after next(): the batch may have opened a new epoch
            out = self.objective(self.engine, batch, epoch=epoch, reference=self.reference)
            self.engine.backward(out.loss)
            self.engine.step()
            for k, v in {"loss": out.loss.detach(), **out.metrics}.items():
                sums[k] = sums.get(k, 0) + v.float() / cfg.train.grad_accum
            if "reward_margin" in out.loss_output.per_sample:
                self.bins.update(out.t, out.loss_output.per_sample["reward_margin"], out.loss_output.losses)
        return sums, data_s

    def train(self) -> dict[str, float]:
        """Optimizer steps until ``train.max_steps``, checkpointed every ``train.checkpoint_every`` steps
        and at the end. Per-step metrics stay on the device; every ``train.log_every`` steps (and before
        a checkpoint or an eval) they are reduced over workers in one collective, copied to the host in
        one sync and logged by rank 0, one MLflow entry per step. The context may publish the policy to
        rollout actors after a step (streaming online training)."""
        from ray_jobs.training.policy_sync import state_fn

        cfg = self.cfg
        policy_state = state_fn(self.engine.module, cfg, self.rank)  # what rollouts sample from, if any

        def publish():
            self._release_zero3()  # the state is gathered outside forward/backward
            return policy_state()

        self.ctx.policy_step(self.state.step, publish, start=True)  # every rank
        batches = self._batches()
        progress = self._progress()
        pending: list[tuple[int, dict[str, Any]]] = []
        last: dict[str, float] = {}
        pairs = cfg.train.batch_size * cfg.train.grad_accum * self.world
        last_step_end = time.perf_counter()
        while self.state.step < cfg.train.max_steps:
            sums, data_s = self._optimizer_step(batches)
            self.state.step += 1
            self._maybe_inject_fault()
            ref_metrics = self.refs.on_optimizer_step(self.state.step, self.engine)  # every rank (collective)
            host = {
                **ref_metrics,  # identical on every rank: no reduction
                **self.ctx.policy_step(self.state.step, publish),  # every rank (may gather weights)
                "lr": self.scheduler.get_last_lr()[0],
            }
            # wall time since the previous step ended: this step plus the previous one's logging, eval and
            # checkpoint, so pairs/s is what the run delivers (host time: on a GPU the step's kernels may
            # still run; a window's mean is exact at the flush)
            now = time.perf_counter()
            step_time, last_step_end = now - last_step_end, now
            host.update({"pairs_per_s": pairs / step_time, "time/step_s": step_time, "time/data_s": data_s})
            grad_norm = self.engine.get_global_grad_norm()  # a device tensor or a float: no sync here
            if grad_norm is not None:
                sums = {**sums, "grad_norm": torch.as_tensor(grad_norm)}
            pending.append((self.state.step, {"device": sums, "host": host}))
            eval_now = self.state.step % cfg.train.eval_every == 0 or self.state.step == cfg.train.max_steps
            checkpoint_now = (
                bool(cfg.train.checkpoint_every) and self.state.step % cfg.train.checkpoint_every == 0
            )
            if eval_now or checkpoint_now or self.state.step % cfg.train.log_every == 0:
                last = self._flush(pending, self._eval_metrics() if eval_now else {}, progress) or last
                pending = []
            if checkpoint_now:
                self._checkpoint(last)
        last = self._flush(pending, {}, progress) or last
        if not cfg.train.checkpoint_every or self.state.step % cfg.train.checkpoint_every:
            self._checkpoint(last)
        if progress is not None:
            progress.finish(checkpoint=f"step {self.last_checkpoint_step}")
        return last

    def _flush(
        self, pending: list[tuple[int, dict[str, Any]]], eval_metrics: dict[str, float], progress
    ) -> dict[str, float]:
        """Reduce and log the pending steps (``eval_metrics`` join the last one); returns the last step's
        metrics, or ``{}`` when nothing was pending."""
        if not pending:
            return {}
        reduced = reduce_step_metrics([entry["device"] for _, entry in pending], self.device, self.world)
        metrics: dict[str, float] = {}
        for (step, entry), values in zip(pending, reduced, strict=True):
            metrics = {**values, **entry["host"]}
            if step == pending[-1][0]:
                metrics.update(eval_metrics)
            if self.metrics is not None:
                if step == 1 and self.initial_metrics:
                    self.metrics.log(self.initial_metrics, 0)
                self.metrics.log(metrics, step)
            if progress is not None:
                progress.update(1, **progress_extra(metrics, self.last_checkpoint_step))
        return metrics

    def _progress(self) -> Progress | None:
        """Rank 0's training progress counter (steps), its records handed to the context."""
        if self.rank != 0:
            return None
        return Progress(
            "train",
            self.cfg.train.max_steps,
            unit="steps",
            every_s=self.inputs.progress_every_s,
            start_done=self.state.step,
            sink=self.ctx.progress,
        )

    def _eval_metrics(self) -> dict[str, float]:
        """KL estimates on the probe and per-timestep-bin accuracy/margin since the last eval."""
        import torch.distributed as dist

        out = self.refs.measure(self.engine) if self.refs.probe is not None else {}
        vec = self.bins.to_tensor().to(self.device)
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(vec)
        out.update(BinAccumulator.from_tensor(vec.cpu(), self.adapter.schedule.num_train_timesteps).compute())
        self.bins.reset()
        return out

    def _maybe_inject_fault(self) -> None:
        """``train.fail_at_step``: the last rank raises once at that step (a marker file keeps it to once)."""
        cfg = self.cfg
        if cfg.train.fail_at_step is None or self.state.step != cfg.train.fail_at_step:
            return
        marker = (
            cfg.workdir / f".fault_injected_{cfg.run.name}_{cfg.train.fail_at_step}"
        )  # seen by every node
        if self.rank == self.world - 1 and not marker.exists():
            marker.write_text("fired\n")
            raise RuntimeError(f"injected fault at step {self.state.step} (train.fail_at_step)")

    def _checkpoint(self, metrics: dict[str, float]) -> None:
        """Every rank saves its DeepSpeed shards (and rank 0 a moved reference) into a temporary directory,
        rank 0 writes the completion marker after a barrier, and each hands its directory to the context."""
        import torch.distributed as dist

        self._release_zero3()  # the reference's state dict is gathered below
        tmp = Path(tempfile.mkdtemp(prefix=f"prefopt-ckpt-r{self.rank}-"))
        self.engine.save_checkpoint(
            str(tmp),
            tag=CHECKPOINT_TAG,
            client_state={"train_state": vars(self.state).copy(), "reference": self.refs.state_dict()},
            save_latest=False,
        )
        if not self.refs.reference_is_pretrained:  # a moved reference: its weights go with the checkpoint
            ref_state = self.refs.reference_state_dict(rank0_only=True)  # collective under ZeRO-3
            if self.rank == 0:
                torch.save(ref_state, tmp / REFERENCE_FILE)
        if dist.is_initialized():
            dist.barrier()
        if self.rank == 0:
            (tmp / COMPLETE_MARKER).write_text(
                json.dumps({"step": self.state.step, "world_size": self.world})
            )
            if self.metrics is not None:
                self.metrics.flush()
        self.ctx.report({"step": self.state.step, **metrics}, tmp, f"step_{self.state.step:08d}")
        self.last_checkpoint_step = self.state.step
        shutil.rmtree(tmp, ignore_errors=True)

    # -------------------------------------------------------------- export + cleanup
    def export(self) -> None:
        """Full weights (LoRA fused) under ``export_dir/<denoiser>``; LoRA adapters under ``export_dir/lora``."""
        import torch.distributed as dist

        from ray_jobs.export import export_full, export_lora, gather_full_state_dict

        self._release_zero3()

        module = self.engine.module
        state = gather_full_state_dict(module, zero_stage=self.cfg.train.zero_stage, rank=self.rank)
        if self.rank == 0:
            target = Location(
                self.inputs.export_dir
            )  # an object-store export is staged locally, then uploaded
            export_dir = target.local if target.is_local else self.cfg.scratch_dir / "export"
            export_full(module, state, export_dir / self.adapter.denoiser_subfolder)
            if self.cfg.model.lora_rank > 0:
                export_lora(self.cfg.model.family, module, state, export_dir / "lora")
            if not target.is_local:
                target.upload_dir(export_dir)
            self._sample_grid(export_dir / self.adapter.denoiser_subfolder)
        if dist.is_initialized():
            dist.barrier()

    def _sample_grid(self, exported: Path) -> None:
        from ray_jobs.tracking import log_artifact
        from ray_jobs.training.sample_grid import write_sample_grid

        prompts = list(self.inputs.sample_prompts)[: self.cfg.train.sample_prompts]
        if not prompts:
            return
        path = self.cfg.scratch_dir / "samples" / f"step_{self.state.step:08d}.png"
        write_sample_grid(self.cfg, self.adapter, prompts, exported, path, device=self.device)
        run_id = self.metrics.run_id if self.metrics is not None else None
        if run_id:
            log_artifact(self.inputs.tracking_uri, run_id, path, "samples")

    def cleanup(self) -> None:
        if self.metrics is not None:
            self.metrics.close()


def run_recipe(recipe: WorkerRecipe) -> dict[str, float]:
    """``setup -> train -> export -> cleanup`` with the time of each phase logged by rank 0."""
    t0 = time.perf_counter()
    recipe.setup()
    phases = {"setup": time.perf_counter() - t0}
    try:
        t = time.perf_counter()
        last = recipe.train()
        phases["train"] = time.perf_counter() - t
        if recipe.cfg.train.export:
            t = time.perf_counter()
            recipe.export()
            phases["export"] = time.perf_counter() - t
    finally:
        recipe.cleanup()
    if recipe.rank == 0:
        logger.info("worker phases: %s", ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()))
    return last


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train worker function: ``loop_config = {"inputs": RecipeInputs, "progress_sink": actor}``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ctx = RayTrainContext(progress_sink=loop_config.get("progress_sink"))
    run_recipe(WorkerRecipe(loop_config["inputs"], ctx))
