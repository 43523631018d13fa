"""Preference training on Ray Train + DeepSpeed: ``prefopt train CONFIG`` / ``python -m ray_jobs.train CONFIG``.

Driver (:func:`run_training`): checks the latent cache against the model, opens (or resumes) the MLflow
run, builds a ``TorchTrainer`` whose workers read the cache through ``get_dataset_shard``, and writes
``<workdir>/train_summary.json``.

Worker recipe (:class:`WorkerRecipe`, read top to bottom: ``setup -> train -> cleanup``):
DeepSpeed engine (ZeRO 0-3) over the trainable denoiser, a frozen reference (or none), the
family-agnostic :class:`prefopt_core.objective.PreferenceObjective`, metrics reduced over workers and
logged by rank 0, sharded checkpoints reported to Ray, resume from the latest one, and a
``save_pretrained`` export of the trained denoiser.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prefopt_core.config import TOY_BASE, RunConfig, config_from_dict, flatten, load_config
from prefopt_core.metrics import BinAccumulator

logger = logging.getLogger(__name__)

CHECKPOINT_TAG = "checkpoint"
COMPLETE_MARKER = "prefopt_checkpoint_complete.json"
REFERENCE_FILE = "reference.pt"
#: Cache columns that describe image geometry (already folded into conditioning): not read for training.
GEOMETRY_COLUMNS = ("original_size_w", "original_size_l", "crop_top_left", "crop_top_left_l")


# ------------------------------------------------------------------------------------------- helpers
def ds_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config of a run (ZeRO stage, offload, precision, accumulation, clipping)."""
    t = cfg.train
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if t.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    if t.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        # a torch optimizer under ZeRO-Offload instead of DeepSpeedCPUAdam (which JIT-compiles a C++ op)
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def lr_lambda(cfg: RunConfig):
    """Multiplier of the base lr at optimizer step ``s``: linear warm-up, then constant/linear/cosine."""
    t = cfg.train

    def f(step: int) -> float:
        if t.warmup_steps and step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.lr_schedule == "constant":
            return 1.0
        span = max(1, t.max_steps - t.warmup_steps)
        progress = min(1.0, (step - t.warmup_steps) / span)
        if t.lr_schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def patch_deepspeed_for_cpu() -> None:
    """Skip DeepSpeed's CPU shared-memory comm op: it is JIT-compiled (g++, ~60 s) at init and unused
    under Ray, where torch.distributed (gloo) carries every collective."""
    import importlib

    # not `import deepspeed.comm.torch as ds_torch`: deepspeed.comm star-imports the torch package, so
    # that name would bind the *torch package* and the patch would miss DeepSpeed's module
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    ds_torch.build_shm_op = lambda: None
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def timestep_config(cfg: RunConfig):
    """The objective's ``TimestepConfig`` of a run config (sampling, logit-normal, gamma bins, lambda(t))."""
    from prefopt_core.objective import TimestepConfig

    t = cfg.timesteps
    return TimestepConfig(
        sampling=cfg.timestep_sampling,
        logit_mean=t.logit_mean,
        logit_std=t.logit_std,
        gamma=t.gamma,
        bins=t.bins,
        reward_scale=t.reward_scale,
    )


def batch_from_table(table, columns: dict[str, list[int]]):
    """A cache batch (pyarrow) -> :class:`PreferenceBatch` with tensors of the manifest's shapes."""
    from pipelines.latent_cache import split_columns
    from pipelines.tensor_columns import to_tensor
    from prefopt_core.objective import PreferenceBatch

    shared, side, ref = split_columns(columns)
    return PreferenceBatch(
        pair_key=torch.from_numpy(table["pair_key"].to_numpy().copy()),
        latents_w=to_tensor(table["latents_w"], columns["latents_w"]),
        latents_l=to_tensor(table["latents_l"], columns["latents_l"]),
        cond={k: to_tensor(table[k], columns[k]) for k in shared},
        cond_w={k: to_tensor(table[f"{k}_w"], columns[f"{k}_w"]) for k in side},
        cond_l={k: to_tensor(table[f"{k}_l"], columns[f"{k}_l"]) for k in side},
        ref_err_w=to_tensor(table["ref_err_w"], columns["ref_err_w"]) if ref else None,
        ref_err_l=to_tensor(table["ref_err_l"], columns["ref_err_l"]) if ref else None,
    )


def add_lora(model: torch.nn.Module, rank: int, alpha: float | None, targets: list[str]) -> torch.nn.Module:
    """Freeze ``model`` and inject trainable LoRA adapters (peft) into its attention projections."""
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=targets)
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("LoRA rank %d on %s: %d trainable parameters", rank, targets, trainable)
    return model


class AdaptersDisabled(torch.nn.Module):
    """The LoRA policy's base model as the reference: same module, adapters switched off for the call."""

    def __init__(self, policy: torch.nn.Module) -> None:
        super().__init__()
        self._policy = [policy]  # a list keeps it out of this module's parameters/state_dict

    @property
    def policy(self) -> torch.nn.Module:
        return self._policy[0]

    def forward(self, *args, **kwargs):
        self.policy.disable_adapters()
        try:
            with torch.no_grad():
                return self.policy(*args, **kwargs)
        finally:
            self.policy.enable_adapters()

    def parameters(self, recurse: bool = True):
        return self.policy.parameters(recurse)


# ------------------------------------------------------------------------------------------- worker
@dataclass
class TrainState:
    """What a checkpoint carries besides weights and optimizer state."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current pass over this worker's shard
    batch_in_epoch: int = 0  # micro-batches consumed in the current epoch
    fault_fired: bool = False


class WorkerRecipe:
    """One Ray Train worker: ``setup() -> train() -> cleanup()``."""

    def __init__(self, loop_config: dict[str, Any]) -> None:
        import ray.train

        self.cfg = config_from_dict(loop_config["config"])
        self.manifest = loop_config["manifest"]
        self.run_id: str | None = loop_config.get("run_id")
        self.run_identity = loop_config.get("run_identity")
        self.tracking_uri: str = loop_config["tracking_uri"]
        self.base_model_dir = loop_config["base_model_dir"]
        self.export_dir = loop_config["export_dir"]
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world = ctx.get_world_size()
        self.state = TrainState()
        self.loop_config = loop_config

    # -------------------------------------------------------------- setup
    def setup(self) -> None:
        import deepspeed

        from prefopt_core.models.base import adapter_for
        from prefopt_core.objective import PreferenceObjective

        cfg = self.cfg
        torch.manual_seed(cfg.run.seed)
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
        if self.device.type == "cpu":
            patch_deepspeed_for_cpu()
        self.adapter = adapter_for(cfg.model, self.base_model_dir)
        policy = self.adapter.load_denoiser(cfg.model.init_denoiser, dtype=torch.float32)
        if cfg.train.gradient_checkpointing:
            policy.enable_gradient_checkpointing()
        if cfg.model.lora_rank > 0:
            policy = add_lora(policy, cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_targets)
        policy.train()
        optimizer = torch.optim.AdamW(
            [p for p in policy.parameters() if p.requires_grad],
            lr=cfg.train.lr,
            betas=tuple(cfg.train.adam_betas),
            weight_decay=cfg.train.weight_decay,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=policy,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=ds_config(cfg, self.world),
        )
        self.objective = PreferenceObjective(
            self.adapter,
            loss_name=cfg.loss.name,
            loss_params=_loss_params(cfg),
            timesteps=timestep_config(cfg),
            seed=cfg.run.seed,
        )
        self.columns = {k: list(v) for k, v in self.manifest["columns"].items()}
        self.refs = self._reference_manager(self.loop_config.get("probe"))
        self.reference = self.refs.reference
        self.bins = BinAccumulator(self.adapter.schedule.num_train_timesteps)
        self.metrics = None
        if self.rank == 0:
            from ray_jobs.tracking import MetricBuffer

            self.metrics = MetricBuffer(
                self.tracking_uri,
                self.run_id,
                Path(cfg.workdir) / "mlflow_pending.jsonl",
                identity=self.run_identity,
                flush_every=5,
            )
            # a resumed MLflow run may hold steps of an attempt that died before its first complete
            # checkpoint (this one then starts at step 0 again): log each step once, here as after a restore
            self.metrics.skip_through(self.metrics.last_logged_step("loss"))
        self._resume()

    def _reference_manager(self, probe_table):
        """The reference strategy: frozen/periodic reference model (sharded under ZeRO-3) or none."""
        import deepspeed

        from prefopt_core.models.base import per_sample_mse
        from prefopt_core.reference import ReferenceManager, build_probe, zero3_copy

        cfg, adapter = self.cfg, self.adapter
        reference = None
        init = cfg.model.init_denoiser
        if cfg.reference.strategy in ("frozen", "periodic") and cfg.model.lora_rank > 0:
            reference = AdaptersDisabled(self.engine.module)  # the base model, no second copy
        elif cfg.reference.strategy in ("frozen", "periodic"):
            reference = adapter.load_denoiser(init, dtype=_torch_dtype(cfg.model.dtype))
            reference.requires_grad_(False).eval()
            if cfg.train.zero_stage == 3:
                # an inference-only engine: the reference is partitioned like the policy, no optimizer
                ref_cfg = ds_config(cfg, self.world)
                ref_cfg["zero_optimization"] = {"stage": 3}
                if cfg.train.offload_param:
                    ref_cfg["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": False}
                ref_cfg["bf16"] = {"enabled": cfg.model.dtype == "bf16"}
                ref_engine, *_ = deepspeed.initialize(model=reference, config=ref_cfg)
                ref_engine.eval()
                reference = ref_engine.module
            else:
                reference.to(self.device)
        probe = None
        if probe_table is not None and probe_table.num_rows:
            pb = batch_from_table(probe_table, self.columns)
            probe = build_probe(
                pb.latents_w,
                {**pb.cond, **{k: v for k, v in pb.cond_w.items()}},
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
            reference=reference,
            probe=probe,
            errors_fn=errors_fn if probe is not None else None,
            pretrained_fn=lambda: adapter.load_denoiser(init, dtype=torch.float32),
            copy_fn=zero3_copy,
            chunk_size=2 * cfg.train.batch_size,
            device=self.device,
        )

    def _resume(self) -> None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            if self.cfg.train.resume == "require":
                raise RuntimeError(
                    f"train.resume=require but no checkpoint of run {self.cfg.run.name!r} exists under "
                    f"{self.cfg.workdir / 'ray_results'}"
                )
            if self.rank == 0:
                logger.info("no checkpoint found for run %r: starting at step 0", self.cfg.run.name)
            self.initial_metrics = self.refs.initialize(self.engine)
            return
        with checkpoint.as_directory() as d:
            if not (Path(d) / COMPLETE_MARKER).exists():
                raise RuntimeError(f"checkpoint {d} has no completion marker: it was not fully written")
            path, client_state = self.engine.load_checkpoint(d, tag=CHECKPOINT_TAG, load_module_strict=True)
            if path is None:  # DeepSpeed returns (None, None) instead of raising
                raise RuntimeError(f"DeepSpeed found no loadable checkpoint in {d}")
            self.refs.load_state_dict(client_state["reference"])
            if not self.refs.reference_is_pretrained:
                self.refs.load_reference_state_dict(torch.load(Path(d) / REFERENCE_FILE, weights_only=True))
        self.state = TrainState(**client_state["train_state"])
        self.initial_metrics = {}
        if self.metrics is not None:
            # steps after the checkpoint were logged before the failure: log each step once
            self.metrics.skip_through(self.metrics.last_logged_step("loss"))
        if self.rank == 0:
            logger.info(
                "resumed from %s at step %d (epoch %d, batch %d)",
                path,
                self.state.step,
                self.state.epoch,
                self.state.batch_in_epoch,
            )

    # -------------------------------------------------------------- train
    def _batches(self):
        """Endless micro-batches; epochs re-iterate the shard; skips what a resumed state already consumed."""
        import ray.train

        shard = ray.train.get_dataset_shard("train")
        cfg = self.cfg
        while True:
            it = shard.iter_batches(
                batch_size=cfg.train.batch_size,
                batch_format="pyarrow",
                drop_last=True,
                local_shuffle_buffer_size=max(cfg.train.batch_size * 8, 16),
                local_shuffle_seed=cfg.run.seed * 1000 + self.state.epoch * 10 + self.rank,
            )
            produced = 0
            for i, table in enumerate(it):
                if i < self.state.batch_in_epoch:
                    continue
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

    def train(self) -> dict[str, float]:
        cfg = self.cfg
        batches = self._batches()
        last: dict[str, float] = {}
        while self.state.step < cfg.train.max_steps:
            t0 = time.perf_counter()
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
                if "reward_margin" in out.out.per_sample:
                    self.bins.update(out.t, out.out.per_sample["reward_margin"])
            self.state.step += 1
            self._maybe_inject_fault()
            ref_metrics = self.refs.on_optimizer_step(self.state.step, self.engine)  # every rank (collective)
            step_time = time.perf_counter() - t0
            metrics = self._reduce(sums)
            metrics.update(ref_metrics)  # identical on every rank: no reduction
            if self.state.step % cfg.train.eval_every == 0 or self.state.step == cfg.train.max_steps:
                metrics.update(self._eval_metrics())
            pairs = cfg.train.batch_size * cfg.train.grad_accum * self.world
            metrics.update(
                lr=self.scheduler.get_last_lr()[0],
                pairs_per_s=pairs / step_time,
                **{"time/step_s": step_time, "time/data_s": data_s},
            )
            grad_norm = self.engine.get_global_grad_norm()
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)
            if self.metrics is not None:
                if self.state.step == 1 and self.initial_metrics:
                    self.metrics.log(self.initial_metrics, 0)
                self.metrics.log(metrics, self.state.step)
            last = metrics
            if cfg.train.checkpoint_every and self.state.step % cfg.train.checkpoint_every == 0:
                self._checkpoint(metrics)
        if not cfg.train.checkpoint_every or self.state.step % cfg.train.checkpoint_every:
            self._checkpoint(last)
        return last

    def _reduce(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        """Mean over workers of the per-step metrics (on the device: NCCL only reduces GPU tensors)."""
        import torch.distributed as dist

        keys = sorted(sums)
        vec = torch.stack([sums[k].detach().float().to(self.device) for k in keys])
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(vec)
            vec /= self.world
        return {k: float(v) for k, v in zip(keys, vec.cpu().tolist(), strict=True)}

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
        cfg = self.cfg
        if cfg.train.fail_at_step is None or self.state.step != cfg.train.fail_at_step:
            return
        marker = Path(cfg.workdir) / f".fault_injected_{cfg.run.name}_{cfg.train.fail_at_step}"
        if self.rank == self.world - 1 and not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("fired\n")
            raise RuntimeError(f"injected fault at step {self.state.step} (train.fail_at_step)")

    def _checkpoint(self, metrics: dict[str, float]) -> None:
        import ray.train
        import torch.distributed as dist
        from ray.train import Checkpoint

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
        ray.train.report(
            {"step": self.state.step, **metrics},
            checkpoint=Checkpoint.from_directory(str(tmp)),
            checkpoint_dir_name=f"step_{self.state.step:08d}",
        )
        shutil.rmtree(tmp, ignore_errors=True)

    # -------------------------------------------------------------- export + cleanup
    def export(self) -> None:
        """Full weights (LoRA fused) under ``export_dir/<denoiser>``; LoRA adapters under ``export_dir/lora``."""
        import torch.distributed as dist

        from ray_jobs.export import export_full, export_lora, gather_full_state_dict

        module = self.engine.module
        state = gather_full_state_dict(module, zero_stage=self.cfg.train.zero_stage, rank=self.rank)
        if self.rank == 0:
            export_dir = Path(self.export_dir)
            export_full(module, state, export_dir / self.adapter.denoiser_subfolder)
            if self.cfg.model.lora_rank > 0:
                export_lora(self.cfg.model.family, module, state, export_dir / "lora")
            self._sample_grid(export_dir / self.adapter.denoiser_subfolder)
        if dist.is_initialized():
            dist.barrier()

    def _sample_grid(self, exported: Path) -> None:
        """Base vs trained samples for a few training captions (same seed), logged as an MLflow artifact."""
        from pipelines.evaluation import generate_images, image_grid
        from ray_jobs.tracking import log_artifact

        prompts = list(self.loop_config.get("sample_prompts") or [])[: self.cfg.train.sample_prompts]
        if not prompts:
            return
        cfg = self.cfg
        kwargs = {"max_sequence_length": cfg.model.max_sequence_length} if cfg.model.family == "sd3" else {}
        rows = {}
        for name, denoiser_dir in (("base", cfg.model.init_denoiser), ("trained", exported)):
            denoiser = self.adapter.load_denoiser(denoiser_dir, dtype=torch.float32).to(self.device)
            pipe = self.adapter.pipeline(denoiser).to(self.device)
            rows[name] = generate_images(
                pipe,
                prompts,
                [cfg.run.seed],
                resolution=cfg.model.resolution,
                num_inference_steps=cfg.train.sample_steps,
                call_kwargs=kwargs,
            )[0]
            del pipe, denoiser
        path = Path(cfg.workdir) / "samples" / f"step_{self.state.step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image_grid(rows, prompts).save(path)
        run_id = self.metrics.run_id if self.metrics is not None else None
        if run_id:
            log_artifact(self.tracking_uri, run_id, path, "samples")
        logger.info("sample grid written to %s", path)

    def cleanup(self) -> None:
        if self.metrics is not None:
            self.metrics.close()


def _torch_dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def _loss_params(cfg: RunConfig) -> dict[str, Any]:
    from prefopt_core.losses import get_loss

    spec = get_loss(cfg.loss.name)
    candidates = {
        "beta": cfg.loss.resolved_beta(),
        "convention": cfg.loss.convention,
        "snr_value": cfg.loss.snr_value,
        "desirable_weight": cfg.loss.desirable_weight,
        "undesirable_weight": cfg.loss.undesirable_weight,
    }
    return {k: v for k, v in candidates.items() if k in spec.params}


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    t0 = time.perf_counter()
    recipe = WorkerRecipe(loop_config)
    recipe.setup()
    phases = {"setup": time.perf_counter() - t0}
    try:
        t = time.perf_counter()
        recipe.train()
        phases["train"] = time.perf_counter() - t
        if recipe.cfg.train.export:
            t = time.perf_counter()
            recipe.export()
            phases["export"] = time.perf_counter() - t
    finally:
        recipe.cleanup()
    if recipe.rank == 0:
        logger.info("worker phases: %s", ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()))


# ------------------------------------------------------------------------------------------- driver
@dataclass
class TrainSummary:
    mlflow_tracking_uri: str
    mlflow_run_id: str | None
    export_dir: str | None
    checkpoint: str | None
    final_metrics: dict[str, float]
    resumed_run: bool
    num_pairs: int
    num_quarantined: int


def prepare_base_model(cfg: RunConfig) -> Path:
    """The pretrained pipeline directory, building the offline tiny model when ``model.pretrained=tiny*`` and
    training the toy testbed's base (once; reused afterwards) when ``model.pretrained=toy-base``."""
    if cfg.model.pretrained == TOY_BASE:
        from pipelines.toy_base import build_toy_base

        return build_toy_base(cfg.base_model_dir, seed=cfg.run.seed)
    if cfg.tiny_preset is not None:
        from prefopt_core.models.tiny import make_tiny_pipeline

        return make_tiny_pipeline(
            cfg.base_model_dir,
            family=cfg.model.family,
            preset=cfg.tiny_preset,
            seed=cfg.run.seed,
            resolution=cfg.model.resolution,
        )
    path = cfg.base_model_dir
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(
            f"model.pretrained={cfg.model.pretrained!r} is not a local diffusers pipeline directory; download it "
            "first (e.g. `huggingface-cli download <id> --local-dir DIR`) and pass the directory"
        )
    return path


def open_tracking_run(cfg: RunConfig, manifest: dict, parent_run_id: str | None):
    """Find (resume) or create the MLflow run of this training run and log its config and inputs.

    Returns ``(identity, run_id, resumed)``. An unreachable tracking server does not stop training:
    ``run_id`` is then ``None`` and rank 0 creates the run as soon as the server answers, or spills the
    metrics to ``<workdir>/mlflow_pending.jsonl`` for ``python -m ray_jobs.tracking replay``.
    """
    from ray_jobs import tracking

    uri, workdir = cfg.tracking_uri, cfg.workdir
    run_key = f"{cfg.run.name}@{workdir}"
    tags = {"prefopt.command": "train", "prefopt.family": cfg.model.family, "prefopt.loss": cfg.loss.name}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    identity = tracking.RunIdentity(cfg.tracking.experiment, run_key, cfg.run.name, tags)
    (workdir / "resolved_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    try:
        run_id, resumed = tracking.find_or_create_run(
            uri, cfg.tracking.experiment, run_key, cfg.run.name, tags
        )
        if cfg.train.resume == "never" and resumed:
            tracking.set_terminated(uri, run_id, "KILLED")
            identity = tracking.RunIdentity(
                cfg.tracking.experiment, f"{run_key}#{int(time.time())}", cfg.run.name, tags
            )
            run_id, resumed = tracking.find_or_create_run(
                uri, identity.experiment, identity.run_key, cfg.run.name, tags
            )
        tracking.log_params_once(uri, run_id, flatten(cfg.to_dict()))
        tracking.log_cache_input(uri, run_id, manifest, cfg.cache_dir)
        tracking.log_artifact(uri, run_id, workdir / "resolved_config.json")
        return identity, run_id, resumed
    except Exception as exc:
        logger.warning(
            "MLflow at %s is unreachable (%s): training goes on; metrics will be sent when it "
            "answers or spilled to %s",
            uri,
            exc,
            workdir / "mlflow_pending.jsonl",
        )
        return identity, None, False


def epochs_needed(cfg: RunConfig, num_pairs: int) -> int:
    """Passes over the data a run makes: each worker gets ``num_pairs // workers`` pairs (equal split) in
    ``// batch_size`` full micro-batches; the run consumes ``max_steps * grad_accum`` micro-batches."""
    t = cfg.train
    per_epoch = (num_pairs // t.num_workers) // t.batch_size
    if per_epoch == 0:
        raise ValueError(f"{num_pairs} pairs give worker batches of fewer than {t.batch_size} pairs")
    return math.ceil(t.max_steps * t.grad_accum / per_epoch)


def check_precomputed(cfg: RunConfig, manifest: dict) -> None:
    """A precomputed-reference run needs a cache whose reference errors were drawn exactly as this run
    draws noise and timesteps, for every epoch it will reach."""
    from ray_jobs.cache import precompute_settings

    cached = manifest["fingerprint"]["settings"].get("precompute")
    wanted = precompute_settings(cfg)
    if cached is None:
        raise ValueError(
            "reference.strategy=precomputed but the cache holds no reference errors; rebuild it with "
            "`prefopt cache CONFIG reference.strategy=precomputed cache.dir=<new dir>`"
        )
    differs = sorted(k for k in wanted if k != "epochs" and cached.get(k) != wanted[k])
    if differs or manifest["fingerprint"]["settings"]["seed"] != cfg.run.seed:
        raise ValueError(
            f"the cache's reference errors were drawn with other settings ({', '.join(differs) or 'run.seed'}); "
            "rebuild the cache with this config"
        )
    need = epochs_needed(cfg, manifest["num_pairs"])
    if cached["epochs"] < need:
        raise ValueError(
            f"this run reaches {need} epoch(s) but the cache holds reference errors for {cached['epochs']}; "
            f"rebuild it with reference.precompute_epochs={need}"
        )


def sample_captions(cache_dir: Path, manifest: dict, n: int) -> list[str]:
    """The first ``n`` distinct captions of the cache (prompts of the end-of-run sample grid)."""
    import pyarrow.parquet as pq

    out: list[str] = []
    if n <= 0:  # no sample grid: read nothing
        return out
    for f in manifest["files"]:
        for caption in pq.read_table(cache_dir / f, columns=["caption"])["caption"].to_pylist():
            if caption not in out:
                out.append(caption)
            if len(out) >= n:
                return out
    return out


def _ordered_ingest():
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def cache_dataset(cfg: RunConfig, manifest: dict):
    """The training columns of the latent cache as a Ray Dataset, in shard order.

    A cache of at most ``train.driver_read_max_mb`` on disk is read here with pyarrow and put into the
    object store once (``from_arrow``): no read tasks to schedule, and every epoch re-reads memory. A
    larger one is read by Ray Data tasks and streamed each epoch, so it never has to fit in the object
    store. Both give the same rows in the same order.
    """
    import pyarrow.parquet as pq
    import ray.data

    needed = ["pair_key", *manifest["columns"].keys()]
    columns = [c for c in needed if c not in GEOMETRY_COLUMNS]
    files = [cfg.cache_dir / f for f in manifest["files"]]
    size_mb = sum(f.stat().st_size for f in files) / 2**20
    if size_mb <= cfg.train.driver_read_max_mb:
        logger.info("cache %s: %.1f MB, read by the driver into the object store", cfg.cache_dir, size_mb)
        return ray.data.from_arrow([pq.read_table(f, columns=columns) for f in files])
    logger.info("cache %s: %.1f MB, streamed by Ray Data read tasks", cfg.cache_dir, size_mb)
    return ray.data.read_parquet([str(f) for f in files], columns=columns)


def run_training(cfg: RunConfig, *, parent_run_id: str | None = None) -> TrainSummary:
    """Train from the latent cache on Ray; returns (and writes) the run summary."""
    import ray
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.latent_cache import check_cache_matches, model_fingerprint, read_manifest
    from prefopt_core.models.base import adapter_for
    from ray_jobs import tracking
    from ray_jobs.cluster import ensure_ray

    ensure_ray(cfg)
    workdir = cfg.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    base = prepare_base_model(cfg)
    manifest = read_manifest(cfg.cache_dir)
    adapter = adapter_for(cfg.model, base)
    check_cache_matches(manifest, model_fingerprint(adapter), cfg.model.resolution, cfg.cache_dir)
    if manifest["num_pairs"] < cfg.train.batch_size * cfg.train.num_workers:
        raise ValueError(
            f"the cache holds {manifest['num_pairs']} pairs, fewer than one batch per worker "
            f"({cfg.train.batch_size} x {cfg.train.num_workers})"
        )

    if cfg.reference.strategy == "precomputed":
        check_precomputed(cfg, manifest)

    storage = workdir / "ray_results"
    if cfg.train.resume == "never" and (storage / cfg.run.name).exists():
        shutil.rmtree(storage / cfg.run.name)
    if cfg.train.resume == "require" and not any((storage / cfg.run.name).glob("step_*")):
        raise FileNotFoundError(
            f"train.resume=require but run {cfg.run.name!r} has no checkpoint under {storage / cfg.run.name}; "
            "check run.name and run.workdir, or use train.resume=auto to start from step 0"
        )
    uri = cfg.tracking_uri
    identity, run_id, resumed = open_tracking_run(cfg, manifest, parent_run_id)

    dataset = cache_dataset(cfg, manifest)
    probe = dataset.take_batch(cfg.reference.probe_size, batch_format="pyarrow")
    sample_prompts = sample_captions(cfg.cache_dir, manifest, cfg.train.sample_prompts)
    use_gpu = (
        cfg.train.use_gpu if cfg.train.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    )
    export_dir = workdir / "export"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "manifest": manifest,
            "run_id": run_id,
            "run_identity": identity,
            "tracking_uri": uri,
            "base_model_dir": str(base),
            "export_dir": str(export_dir),
            "probe": probe,
            "sample_prompts": sample_prompts,
        },
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=RayRunConfig(
            name=cfg.run.name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.num_to_keep),
        ),
        datasets={"train": dataset},
        # ordered splits: every worker sees the same pairs in the same order on every (re)start, which
        # is what makes resumed runs and ZeRO stages reproduce each other
        dataset_config=DataConfig(execution_options=_ordered_ingest()),
    )
    try:
        result = trainer.fit()
    except BaseException:
        if run_id is not None:
            tracking.set_terminated(uri, run_id, "FAILED")
        raise
    final = {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
    if run_id is None:  # the server was down at start; rank 0 may have created the run since
        with contextlib.suppress(Exception):
            run_id, _ = tracking.find_or_create_run(
                uri, identity.experiment, identity.run_key, identity.run_name, identity.tags
            )
    if run_id is not None:
        counts = {"num_pairs": manifest["num_pairs"], "num_quarantined": manifest["num_quarantined"]}
        tracking.log_metrics(uri, run_id, counts, step=0)
        tracking.set_terminated(uri, run_id, "FINISHED")
    summary = TrainSummary(
        mlflow_tracking_uri=uri,
        mlflow_run_id=run_id,
        export_dir=str(export_dir / adapter.denoiser_subfolder) if cfg.train.export else None,
        checkpoint=result.checkpoint.path if result.checkpoint else None,
        final_metrics=final,
        resumed_run=resumed,
        num_pairs=manifest["num_pairs"],
        num_quarantined=manifest["num_quarantined"],
    )
    (workdir / "train_summary.json").write_text(json.dumps(vars(summary), indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    from ray_jobs.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())


__all__ = ["TrainSummary", "load_config", "run_training"]
