"""The DeepSpeed config of a run: one function for the trained policy and for a ZeRO-3 reference engine."""

from __future__ import annotations

import importlib
import logging
from typing import Any

from prefopt_core.config import RunConfig


def ds_config(cfg: RunConfig, world_size: int, *, reference: bool = False) -> dict[str, Any]:
    """The DeepSpeed config of the policy engine (ZeRO stage, offload, precision, accumulation, clipping),
    or with ``reference=True`` of an inference-only ZeRO-3 engine that partitions the frozen reference like
    the policy (no optimizer state; its dtype is ``model.dtype``)."""
    t = cfg.train
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.offload_optimizer and not reference:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if t.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    if t.zero_stage == 3 and not reference:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    if reference:
        zero["stage"] = 3
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


def patch_deepspeed_for_cpu() -> None:
    """Skip DeepSpeed's CPU shared-memory comm op: it is JIT-compiled (g++, ~60 s) at init and unused
    under Ray, where torch.distributed (gloo) carries every collective."""
    # not `import deepspeed.comm.torch as ds_torch`: deepspeed.comm star-imports the torch package, so
    # that name would bind the *torch package* and the patch would miss DeepSpeed's module
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    ds_torch.build_shm_op = lambda: None
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
