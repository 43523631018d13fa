"""``prefopt plan CONFIG``: will a run fit, and how fast can it go — from the model's configs, no weights.

The denoiser is built from its ``config.json`` on the meta device (shapes only), its parameters counted,
and one forward + backward of ``2 x train.batch_size`` rows (both halves of each pair) traced with
:class:`torch.utils.flop_counter.FlopCounterMode` for FLOPs and with saved-tensor hooks for the
activations autograd keeps (with and without gradient checkpointing). Attention is traced as the
flash-attention kernel (saves q, k, v, out and the log-sum-exp, not the score matrix), as it runs on GPUs
and on CPU. From that, per worker and for every ZeRO stage, LoRA and offload choice:

* weights ``P·w``, gradients ``T·w``, optimizer state ``T·k`` (``w`` = 2 bytes in bf16, 4 in fp32;
  ``k`` = 8 for fp32 AdamW moments, 12 in bf16: fp32 master + moments, as in the ZeRO paper), divided by
  the workers where the stage partitions them (1: optimizer, 2: + gradients, 3: + weights);
  ``T`` = trainable parameters (all, or the LoRA adapters);
* a frozen reference copy (``model.dtype``; partitioned under ZeRO-3; none with LoRA, precomputed or no
  reference), DeepSpeed's buffers sized as :func:`ray_jobs.training.deepspeed_config.sized_zero` sizes
  them, and activations, linear in the batch;
* the largest batch that fits the GPU and the pairs/s per GPU at a stated MFU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from prefopt_core.config import ConfigError, RunConfig, load_config
from ray_jobs.training.deepspeed_config import ModelSize, denoiser_config, hidden_size, sized_zero

GIB = 1024**3
#: CUDA context, allocator fragmentation and library workspaces a GPU never gives to the run.
RESERVED_GIB = 2.0
#: CLIP token length of every family's prompt embedding; SD3 appends ``model.max_sequence_length`` T5 tokens.
CLIP_TOKENS = 77


@dataclass(frozen=True)
class GpuSpec:
    """A GPU's published dense (no sparsity) bf16 tensor-core peak and its memory."""

    name: str
    bf16_tflops: float
    memory_gib: float


#: Vendors' data sheets (SXM parts where there are several): dense bf16, without 2:4 sparsity.
GPUS = {
    "H200": GpuSpec("NVIDIA H200 SXM", 989.0, 141.0),
    "H100": GpuSpec("NVIDIA H100 SXM", 989.0, 80.0),
    "A100-80GB": GpuSpec("NVIDIA A100 SXM 80GB", 312.0, 80.0),
    "A100-40GB": GpuSpec("NVIDIA A100 SXM 40GB", 312.0, 40.0),
    "L40S": GpuSpec("NVIDIA L40S", 362.0, 48.0),
    "A10G": GpuSpec("NVIDIA A10G", 70.0, 24.0),
}


@dataclass(frozen=True)
class DenoiserProfile:
    """What the plan is computed from: per-row FLOPs and activation bytes at the training resolution."""

    params: int
    lora_params: int  # trainable parameters with LoRA (rank ``model.lora_rank``, or 16 when it is 0)
    hidden: int
    fwd_flops_per_row: float
    bwd_flops_per_row: float
    act_bytes_per_row: float  # autograd's saved tensors, no checkpointing
    act_gc_bytes_per_row: float  # with gradient checkpointing: block inputs + one block recomputed


@dataclass(frozen=True)
class PlanRow:
    """Per-worker memory (bytes) of one ZeRO stage / LoRA / offload choice at ``batch`` pairs."""

    stage: int
    lora: bool
    offload: str  # "none", "optimizer" or "optimizer+param"
    weights: float
    grads: float
    optimizer: float
    reference: float
    buffers: float
    activations: float
    activations_gc: float
    max_batch: int
    max_batch_gc: int

    @property
    def static(self) -> float:
        return self.weights + self.grads + self.optimizer + self.reference + self.buffers


# ---------------------------------------------------------------------------- tracing the denoiser
def build_meta_denoiser(config: dict[str, Any], dtype: torch.dtype) -> torch.nn.Module:
    """The diffusers class named by ``config["_class_name"]``, built on the meta device (no memory)."""
    import diffusers

    cls = getattr(diffusers, config.get("_class_name", ""), None)
    if cls is None:
        raise ConfigError(f"the denoiser config names no diffusers class ({config.get('_class_name')!r})")
    with torch.device("meta"):
        model = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    return model if dtype == torch.float32 else model.to(dtype)


def vae_factor(pipeline_dir: Path) -> int:
    """Pixels per latent: ``2^(len(block_out_channels) - 1)`` of the pipeline's VAE."""
    vae = json.loads((pipeline_dir / "vae" / "config.json").read_text())
    return 2 ** (len(vae["block_out_channels"]) - 1)


def denoiser_inputs(
    config: dict[str, Any], rows: int, latent: int, text_tokens: int, dtype: torch.dtype
) -> dict[str, Any]:
    """Meta-tensor keyword arguments of one denoiser call: latents ``(rows, C, latent, latent)``, a
    timestep ``(rows,)`` and the text conditioning of the denoiser's family."""
    with torch.device("meta"):
        x = torch.randn(rows, config["in_channels"], latent, latent, dtype=dtype)
        t = torch.rand(rows, dtype=dtype)
        if "joint_attention_dim" in config:  # SD3 MMDiT
            return {
                "hidden_states": x,
                "timestep": t,
                "encoder_hidden_states": torch.randn(
                    rows, text_tokens, config["joint_attention_dim"], dtype=dtype
                ),
                "pooled_projections": torch.randn(rows, config["pooled_projection_dim"], dtype=dtype),
                "return_dict": False,
            }
        kw: dict[str, Any] = {
            "sample": x,
            "timestep": t,
            "encoder_hidden_states": torch.randn(
                rows, CLIP_TOKENS, config["cross_attention_dim"], dtype=dtype
            ),
            "return_dict": False,
        }
        if config.get("addition_embed_type") == "text_time":  # SDXL micro-conditioning
            time_ids = 6
            text = (
                config["projection_class_embeddings_input_dim"] - time_ids * config["addition_time_embed_dim"]
            )
            kw["added_cond_kwargs"] = {
                "text_embeds": torch.randn(rows, text, dtype=dtype),
                "time_ids": torch.randn(rows, time_ids, dtype=dtype),
            }
        return kw


@contextlib.contextmanager
def flash_attention():
    """``F.scaled_dot_product_attention`` as the flash kernel for the trace (meta tensors would otherwise
    take the math path, which saves every score matrix); restored on exit."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if attn_mask is not None or kw:
            return original(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw
            )
        return flash(q, k, v, dropout_p, is_causal, scale=scale)[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def flop_formulas() -> dict:
    """FLOP formulas torch's counter lacks: the CPU flash-attention kernels (same as CUDA flash attention:
    ``4·b·h·s_q·s_k·d`` forward, 2.5x that backward)."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    out = {}
    for name, formula in (
        (
            "_scaled_dot_product_flash_attention_for_cpu",
            lambda q, k, v, *a, **kw: fc.sdpa_flop_count(q, k, v),
        ),
        (
            "_scaled_dot_product_flash_attention_for_cpu_backward",
            lambda g, q, k, v, *a, **kw: fc.sdpa_backward_flop_count(g, q, k, v),
        ),
    ):
        op = getattr(aten, name, None)
        if op is not None and op not in fc.flop_registry:
            out[op] = formula
    return out


def trace(model: torch.nn.Module, inputs: dict[str, Any], checkpointing: bool) -> tuple[int, int, int]:
    """``(forward FLOPs, backward FLOPs, bytes autograd saves)`` of one call; saved views of parameters
    are not activations and are left out."""
    from torch.utils.flop_counter import FlopCounterMode

    if checkpointing:
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()
    model.train()
    params = {id(p) for p in model.parameters()}
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        base = t
        while base._base is not None:
            base = base._base
        if id(base) not in params:
            saved += t.numel() * t.element_size()
        return t

    with flash_attention(), FlopCounterMode(display=False, custom_mapping=flop_formulas()) as counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(**inputs)[0]
        fwd = counter.get_total_flops()
        out.float().sum().backward()
        total = counter.get_total_flops()
    return int(fwd), int(total - fwd), saved


def lora_param_count(model: torch.nn.Module, rank: int, targets: list[str]) -> int:
    """``rank·(in + out)`` for every ``nn.Linear`` whose name ends with a target (peft's suffix match)."""
    return sum(
        rank * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)
    )


def profile_denoiser(cfg: RunConfig, pipeline_dir: Path | None = None) -> DenoiserProfile:
    """Trace the config's denoiser at its training resolution and dtype (``train.precision``) on the meta
    device; FLOPs and activations at ``2·train.batch_size`` rows, reported per row."""
    root = Path(pipeline_dir or cfg.base_model_dir)
    if not (root / "model_index.json").exists():
        raise ConfigError(
            f"model.pretrained={cfg.model.pretrained!r}: {root} is no diffusers pipeline directory "
            "(model_index.json and the component config.json files); e.g. configs/models/sd3-medium"
        )
    config = denoiser_config(root)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    rows = 2 * cfg.train.batch_size
    tokens = CLIP_TOKENS + cfg.model.max_sequence_length if "joint_attention_dim" in config else CLIP_TOKENS
    inputs = denoiser_inputs(config, rows, cfg.model.resolution // vae_factor(root), tokens, dtype)
    model = build_meta_denoiser(config, dtype)
    fwd, bwd, act = trace(model, inputs, checkpointing=False)
    _, _, act_gc = trace(model, inputs, checkpointing=True)
    per_block = act / max(1, _num_blocks(model))
    return DenoiserProfile(
        params=sum(p.numel() for p in model.parameters()),
        lora_params=lora_param_count(model, cfg.model.lora_rank or 16, cfg.model.lora_targets),
        hidden=hidden_size(config),
        fwd_flops_per_row=fwd / rows,
        bwd_flops_per_row=bwd / rows,
        act_bytes_per_row=act / rows,
        act_gc_bytes_per_row=(act_gc + per_block) / rows,
    )


def _num_blocks(model: torch.nn.Module) -> int:
    """The checkpointed blocks: an MMDiT's ``transformer_blocks``, a UNet's down/mid/up blocks."""
    if hasattr(model, "transformer_blocks"):
        return len(model.transformer_blocks)
    return sum(len(getattr(model, n, [])) for n in ("down_blocks", "up_blocks")) + 1


# ---------------------------------------------------------------------------- the plan
def plan_row(
    cfg: RunConfig, prof: DenoiserProfile, *, stage: int, lora: bool, offload: str, world: int, gpu_gib: float
) -> PlanRow:
    """Per-worker memory of one choice (rules in the module docstring) and the largest batch that fits."""
    bf16 = cfg.train.precision == "bf16"
    w, k = (2, 12) if bf16 else (4, 8)
    p = prof.params
    t = prof.lora_params if lora else p
    weights = p * w / (world if stage == 3 else 1) * (0 if "param" in offload else 1)
    grads = t * w / (world if stage >= 2 else 1)
    optimizer = 0.0 if "optimizer" in offload else t * k / (world if stage >= 1 else 1)
    live_reference = cfg.reference.strategy in ("frozen", "periodic") and not lora
    ref_bytes = 2 if cfg.model.dtype == "bf16" else 4
    reference = p * ref_bytes / (world if stage == 3 else 1) if live_reference else 0.0
    z = sized_zero(ModelSize(hidden=prof.hidden, params=t))
    if stage == 3:
        buffers = min(p, z["stage3_max_live_parameters"] + z["stage3_prefetch_bucket_size"]) * w
    elif stage in (1, 2):
        buffers = (z["reduce_bucket_size"] + z["allgather_bucket_size"]) * w
    else:
        buffers = 0.0
    static = weights + grads + optimizer + reference + buffers
    free = (gpu_gib - RESERVED_GIB) * GIB - static
    return PlanRow(
        stage=stage,
        lora=lora,
        offload=offload,
        weights=weights,
        grads=grads,
        optimizer=optimizer,
        reference=reference,
        buffers=buffers,
        activations=prof.act_bytes_per_row * 2 * cfg.train.batch_size,
        activations_gc=prof.act_gc_bytes_per_row * 2 * cfg.train.batch_size,
        max_batch=max(0, math.floor(free / (2 * prof.act_bytes_per_row))),
        max_batch_gc=max(0, math.floor(free / (2 * prof.act_gc_bytes_per_row))),
    )


def plan_rows(cfg: RunConfig, prof: DenoiserProfile, world: int, gpu_gib: float) -> list[PlanRow]:
    """Every valid choice: ZeRO 0-3, full or LoRA (not under ZeRO-3), offload none / optimizer (ZeRO >= 1)
    / optimizer+param (ZeRO-3)."""
    rows = []
    for stage in range(4):
        for lora in (False, True):
            if lora and stage == 3:
                continue
            offloads = (
                ["none"] + (["optimizer"] if stage >= 1 else []) + (["optimizer+param"] if stage == 3 else [])
            )
            for offload in offloads:
                rows.append(
                    plan_row(cfg, prof, stage=stage, lora=lora, offload=offload, world=world, gpu_gib=gpu_gib)
                )
    return rows


def step_flops_per_pair(cfg: RunConfig, prof: DenoiserProfile, *, checkpointing: bool, lora: bool) -> float:
    """Model FLOPs of one pair (2 rows): policy forward + backward, a second forward when checkpointing
    recomputes it, and the reference forward when the loss has a live one."""
    fwd, bwd = prof.fwd_flops_per_row, prof.bwd_flops_per_row
    live_reference = cfg.reference.strategy in ("frozen", "periodic") or (
        lora and cfg.reference.strategy != "none"
    )
    return 2 * (fwd * (2 if checkpointing else 1) + bwd + (fwd if live_reference else 0))


def format_plan(cfg: RunConfig, prof: DenoiserProfile, gpu: GpuSpec, world: int, mfu: float) -> str:
    """The plan as text: model line, memory table (GiB per worker), throughput at ``mfu``."""
    rows = plan_rows(cfg, prof, world, gpu.memory_gib)
    b = cfg.train.batch_size
    g = lambda x: f"{x / GIB:.1f}"  # noqa: E731
    lines = [
        f"denoiser: {prof.params / 1e9:.3f} B parameters (LoRA r={cfg.model.lora_rank or 16}: "
        f"{prof.lora_params / 1e6:.1f} M), hidden {prof.hidden}, {cfg.model.resolution} px, "
        f"precision {cfg.train.precision}, reference {cfg.reference.strategy}",
        f"FLOPs per pair: forward {2 * prof.fwd_flops_per_row / 1e12:.2f} TFLOP, backward "
        f"{2 * prof.bwd_flops_per_row / 1e12:.2f} TFLOP; activations per pair "
        f"{2 * prof.act_bytes_per_row / GIB:.2f} GiB ({2 * prof.act_gc_bytes_per_row / GIB:.2f} GiB with "
        "gradient checkpointing)",
        f"GPU: {gpu.name}, {gpu.memory_gib:g} GiB ({RESERVED_GIB:g} GiB reserved), {world} worker(s); "
        f"memory in GiB per worker at batch {b} pair(s)",
        "",
        "| ZeRO | LoRA | offload | weights | grads | optimizer | reference | buffers | act | act (GC) "
        "| total | total (GC) | max batch | max batch (GC) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r.stage} | {'yes' if r.lora else 'no'} | {r.offload} | {g(r.weights)} | {g(r.grads)} | "
            f"{g(r.optimizer)} | {g(r.reference)} | {g(r.buffers)} | {g(r.activations)} | "
            f"{g(r.activations_gc)} | {g(r.static + r.activations)} | {g(r.static + r.activations_gc)} | "
            f"{r.max_batch} | {r.max_batch_gc} |"
        )
    lines.append("")
    for lora in (False, True):
        for gc in (False, True):
            fl = step_flops_per_pair(cfg, prof, checkpointing=gc, lora=lora)
            rate = mfu * gpu.bf16_tflops * 1e12 / fl
            lines.append(
                f"{'LoRA' if lora else 'full'}, {'with' if gc else 'without'} gradient checkpointing: "
                f"{fl / 1e12:.2f} TFLOP per pair -> {rate:.2f} pairs/s per GPU at {mfu:.0%} MFU "
                f"of {gpu.bf16_tflops:g} TFLOP/s bf16"
            )
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``prefopt plan`` (the CLI builds the parser)."""
    p.add_argument("config", help="CONFIG.yaml, then dotted.key=value overrides")
    p.add_argument("overrides", nargs="*")
    gpu = p.add_mutually_exclusive_group()
    gpu.add_argument("--gpu", default="H100", help=f"one of {', '.join(GPUS)} (default H100)")
    gpu.add_argument("--gpu-mem", type=float, help="GPU memory in GiB (the bf16 peak is the --gpu one)")
    p.add_argument("--gpus", type=int, default=None, help="workers (default train.num_workers)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilisation assumed (default 0.4)")
    p.add_argument("--json", type=Path, help="also write the profile and every row as JSON here")


def run(ns: argparse.Namespace) -> int:
    """``prefopt plan CONFIG [overrides] [--gpu NAME|--gpu-mem GiB] [--gpus N] [--mfu F] [--json PATH]``:
    print the plan; raise :class:`ConfigError` for what the user must change."""
    if ns.gpu not in GPUS:
        raise ConfigError(f"--gpu {ns.gpu!r} is not known; valid: {', '.join(GPUS)} (or give --gpu-mem)")
    gpu = GPUS[ns.gpu]
    if ns.gpu_mem is not None:
        gpu = GpuSpec(f"{gpu.name} peak, {ns.gpu_mem:g} GiB", gpu.bf16_tflops, ns.gpu_mem)
    if not 0 < ns.mfu <= 1 or (ns.gpus is not None and ns.gpus < 1):
        raise ConfigError("--mfu must be in (0, 1] and --gpus at least 1")
    cfg = load_config(ns.config, ns.overrides)
    world = ns.gpus or cfg.train.num_workers
    prof = profile_denoiser(cfg)
    print(format_plan(cfg, prof, gpu, world, ns.mfu))
    if ns.json:
        rows = [asdict(r) for r in plan_rows(cfg, prof, world, gpu.memory_gib)]
        ns.json.write_text(json.dumps({"profile": asdict(prof), "gpu": asdict(gpu), "rows": rows}, indent=1))
    return 0
