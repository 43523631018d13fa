"""The DeepSpeed config of a run: one function for the trained policy and for a ZeRO-3 reference engine.

Three layers, later ones win: prefopt's own settings (stage, offload, precision, batch, clipping), ZeRO
buffer sizes derived from the denoiser (:func:`sized_zero`), and the user's ``train.deepspeed`` mapping,
deep-merged on top and validated by DeepSpeed's own config model (:func:`validate_deepspeed`).
"""

from __future__ import annotations

import copy
import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefopt_core.config import ConfigError, RunConfig
from prefopt_core.storage import Location

#: DeepSpeed's own default for ``stage3_max_live_parameters`` / ``stage3_max_reuse_distance`` (elements).
DEEPSPEED_LIVE_DEFAULT = 1_000_000_000

#: Top-level DeepSpeed keys a ``train.deepspeed`` mapping may set. Batch sizes, accumulation, clipping and
#: the optimizer belong to ``train.*`` (see :data:`OWNED_KEYS`); other DeepSpeed features are not wired.
PASS_THROUGH_KEYS = (
    "zero_optimization",
    "bf16",
    "communication_data_type",
    "prescale_gradients",
    "gradient_predivide_factor",
    "comms_logger",
    "flops_profiler",
    "wall_clock_breakdown",
    "memory_breakdown",
    "steps_per_print",
    "aio",
    "checkpoint",
)
#: DeepSpeed keys prefopt sets from its own config: the prefopt key to use instead.
OWNED_KEYS = {
    "train_batch_size": "train.batch_size",
    "train_micro_batch_size_per_gpu": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "train.grad_clip",
    "optimizer": "train.lr / train.adam_betas / train.weight_decay",
    "scheduler": "train.lr_schedule / train.warmup_steps",
    "fp16": "train.precision",
    "zero_optimization.stage": "train.zero_stage",
    "bf16.enabled": "train.precision",
}


@dataclass(frozen=True)
class ModelSize:
    """What the ZeRO buffer sizes are derived from: the denoiser's hidden size and its trainable parameters."""

    hidden: int
    params: int


def denoiser_config(pipeline_dir: str | Path) -> dict[str, Any]:
    """The denoiser's ``config.json`` (``transformer/`` or ``unet/``, as ``model_index.json`` names it),
    read as JSON: no weights are loaded (a pipeline in a bucket is read there)."""
    root = Location(pipeline_dir)
    index = (root / "model_index.json").read_json()
    for sub in ("transformer", "unet"):
        if sub in index:
            return (root / sub / "config.json").read_json()
    raise ConfigError(f"{root / 'model_index.json'} names no transformer or unet component")


def hidden_size(config: dict[str, Any]) -> int:
    """The width the bucket sizes scale with: ``heads x head_dim`` of an MMDiT (``SD3Transformer2DModel``),
    the widest ``block_out_channels`` of a UNet (accelerate's rule for models with several hidden sizes:
    the largest)."""
    if (
        "num_attention_heads" in config
        and "attention_head_dim" in config
        and "block_out_channels" not in config
    ):
        return int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    if "block_out_channels" in config:
        return int(max(config["block_out_channels"]))
    raise ConfigError(
        "the denoiser config has neither num_attention_heads x attention_head_dim nor block_out_channels"
    )


def size_of(module: Any, pipeline_dir: str | Path) -> ModelSize:
    """The :class:`ModelSize` of a built denoiser: hidden size from the pipeline's denoiser config,
    trainable parameters counted on ``module``."""
    params = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return ModelSize(hidden=hidden_size(denoiser_config(pipeline_dir)), params=params)


def sized_zero(size: ModelSize) -> dict[str, int]:
    """ZeRO buffer sizes (in elements) for a model of hidden size ``h`` with ``P`` trainable parameters.

    The bucket rule is the one Hugging Face applies to DeepSpeed's ``"auto"`` values (transformers
    ``HfTrainerDeepSpeedConfig``, documented at https://huggingface.co/docs/transformers/deepspeed, ZeRO-3
    "auto" values): ``reduce_bucket_size = h²``, ``stage3_prefetch_bucket_size = 0.9·h²``,
    ``stage3_param_persistence_threshold = 10·h``. ``allgather_bucket_size`` (ZeRO-1/2) gets ``h²`` too.

    ``stage3_max_live_parameters`` and ``stage3_max_reuse_distance`` (DeepSpeed default 1e9, larger than
    most denoisers, so ZeRO-3 would keep every gathered weight from forward to backward) are bounded to a
    tenth of the model, ``P // 10``, but never below one reduce bucket nor above DeepSpeed's 1e9.
    """
    h2 = size.hidden * size.hidden
    live = min(DEEPSPEED_LIVE_DEFAULT, max(h2, size.params // 10))
    return {
        "reduce_bucket_size": h2,
        "allgather_bucket_size": h2,
        "stage3_prefetch_bucket_size": int(0.9 * h2),
        "stage3_param_persistence_threshold": 10 * size.hidden,
        "stage3_max_live_parameters": live,
        "stage3_max_reuse_distance": live,
    }


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` merged in (a new dict): mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = (
            deep_merge(out[k], v)
            if isinstance(v, dict) and isinstance(out.get(k), dict)
            else copy.deepcopy(v)
        )
    return out


def policy_stage(cfg: RunConfig, world_size: int) -> int:
    """The ZeRO stage the policy engine runs: ``train.zero_stage``, except that ZeRO-1/2 on one worker without
    optimizer offload run as stage 0. With one rank the "partition" of the gradients and optimizer state is
    all of it, so those stages save nothing, while their bucketed gradient copies and partitioned optimizer
    step cost time (one ad-hoc measurement in one process on the benchmark model, two repeats: 0.86 / 0.77
    s/step at stage 2, 0.75 / 0.70 at stage 0, 0.71 / 0.68 for a bare PyTorch loop; see benchmarks/README.md). ZeRO-3 keeps its stage (its reference engine and gathers are stage-3 paths)."""
    stage = cfg.train.zero_stage
    if world_size == 1 and stage in (1, 2) and not cfg.train.offload_optimizer:
        return 0
    return stage


def generated_config(
    cfg: RunConfig, world_size: int, *, size: ModelSize | None = None, reference: bool = False
) -> dict[str, Any]:
    """prefopt's DeepSpeed config before ``train.deepspeed`` is merged in."""
    t = cfg.train
    zero: dict[str, Any] = {"stage": 3 if reference else policy_stage(cfg, world_size)}
    if size is not None:
        zero.update(sized_zero(size))
    if t.offload_optimizer and not reference:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if t.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    if t.zero_stage == 3 and not reference:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    bf16 = (cfg.model.dtype if reference else t.precision) == "bf16"
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        # a torch optimizer under ZeRO-Offload instead of DeepSpeedCPUAdam (which JIT-compiles a C++ op)
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def ds_config(
    cfg: RunConfig, world_size: int, *, size: ModelSize | None = None, reference: bool = False
) -> dict[str, Any]:
    """The DeepSpeed config of the policy engine (ZeRO stage, offload, precision, accumulation, clipping,
    buffers sized to ``size``, then ``train.deepspeed``), or with ``reference=True`` of an inference-only
    ZeRO-3 engine that partitions the frozen reference like the policy (no optimizer state; its dtype is
    ``model.dtype``). ``size=None`` keeps DeepSpeed's default buffer sizes."""
    return deep_merge(generated_config(cfg, world_size, size=size, reference=reference), cfg.train.deepspeed)


def _check_keys(user: dict[str, Any]) -> None:
    for key, value in user.items():
        if key in OWNED_KEYS:
            raise ConfigError(f"train.deepspeed.{key} is set by prefopt; use {OWNED_KEYS[key]} instead")
        if key not in PASS_THROUGH_KEYS:
            raise ConfigError(
                f"unknown key 'train.deepspeed.{key}'; valid keys here: {', '.join(PASS_THROUGH_KEYS)}"
            )
        for sub in value if isinstance(value, dict) else ():
            if f"{key}.{sub}" in OWNED_KEYS:
                raise ConfigError(
                    f"train.deepspeed.{key}.{sub} is set by prefopt; use {OWNED_KEYS[f'{key}.{sub}']} instead"
                )


def validate_deepspeed(cfg: RunConfig, world_size: int | None = None) -> dict[str, Any]:
    """Check ``train.deepspeed`` before any worker starts: its top-level keys (:data:`PASS_THROUGH_KEYS`),
    then each of its sections merged over the generated config, through DeepSpeed's own config model
    (``DeepSpeedConfig``, whose pydantic sections forbid unknown keys). Raises :class:`ConfigError` naming
    the offending key; returns the merged config (DeepSpeed's default buffer sizes)."""
    user = cfg.train.deepspeed
    _check_keys(user)
    base = generated_config(cfg, world_size or cfg.train.num_workers)
    if not user:
        return base
    from pydantic import ValidationError

    deepspeed_config = importlib.import_module("deepspeed.runtime.config").DeepSpeedConfig
    # DeepSpeed checks train_batch_size against its own world size (1 outside a process group): leave
    # the global batch out and let it infer it from the micro-batch and accumulation
    checked = {k: v for k, v in base.items() if k != "train_batch_size"}
    for key, value in user.items():  # one section at a time: an error belongs to the section that differs
        try:
            deepspeed_config(deep_merge(checked, {key: value}))
        except ValidationError as err:
            first = err.errors()[0]
            loc = ".".join(str(x) for x in (key, *first["loc"]))
            raise ConfigError(f"train.deepspeed.{loc}: {first['msg']} (DeepSpeed's config model)") from None
        except (AssertionError, ValueError, TypeError, KeyError) as err:
            raise ConfigError(f"train.deepspeed.{key} is rejected by DeepSpeed: {err}") from None
    return deep_merge(base, user)


def patch_deepspeed_for_cpu() -> None:
    """Skip DeepSpeed's CPU shared-memory comm op: it is JIT-compiled (g++, ~60 s) at init and unused
    under Ray, where torch.distributed (gloo) carries every collective."""
    # not `import deepspeed.comm.torch as ds_torch`: deepspeed.comm star-imports the torch package, so
    # that name would bind the *torch package* and the patch would miss DeepSpeed's module
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    ds_torch.build_shm_op = lambda: None
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def share_fp32_master(engine: Any) -> int:
    """fp32 training without optimizer offload: make DeepSpeed's fp32 master partition the weights' own
    (already fp32) partition instead of a copy of it, saving 4 bytes per partitioned parameter.

    ZeRO-1/2 always clone the partition (``single_partition_of_fp32_groups``); ZeRO-3 means to share it
    when dtype and device agree (``_create_fp32_partitions``) but compares a ``torch.device`` with the
    accelerator's device *name* (``"cpu"``, ``"cuda:0"``), which is never equal, so it clones too. The
    optimizer then updates the weight partition in place, and DeepSpeed's copy back to it is a self-copy:
    the same arithmetic (losses identical to the last digit in a 4-step check). The fp32 fragments linked
    to each weight (``_hp_mapping``, views of the old copy) are relinked. Returns the elements shared
    (0: nothing to share, e.g. bf16 weights or an offloaded optimizer)."""
    import torch.distributed as dist

    opt = getattr(engine, "optimizer", None)
    if hasattr(opt, "single_partition_of_fp32_groups"):  # ZeRO-1/2: (master, this rank's weight partition)
        if getattr(opt, "cpu_offload", False):
            return 0
        pairs = [
            (
                master,
                opt.parallel_partitioned_bit16_groups[i][dist.get_rank(group=opt.real_dp_process_group[i])],
            )
            for i, master in enumerate(opt.single_partition_of_fp32_groups)
        ]
    elif hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
        if getattr(opt, "offload_optimizer", False):
            return 0
        pairs = list(zip(opt.fp32_partitioned_groups_flat, opt.fp16_partitioned_groups_flat, strict=True))
    else:
        return 0
    shared = 0
    for master, weights in pairs:
        if master is not weights and (master.dtype, master.device, master.shape) == (
            weights.dtype,
            weights.device,
            weights.shape,
        ):
            master.data = weights.data
            shared += weights.numel()
    if shared and hasattr(opt, "_link_all_hp_params"):
        opt._link_all_hp_params()
    return shared
