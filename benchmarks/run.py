"""Ratio benchmarks of prefopt: ``python -m benchmarks.run [--quick] [--only NAME ...] [--out FILE]``.

Prints a markdown table and writes it to ``benchmarks/results.md`` (``--out``). Every ratio compares two
arms measured side by side in this one run, interleaved (A B, B A, A B, ...), as the median over
repeats of the per-repeat ratio; warm-up steps are excluded. Benchmarks (``--only`` names):

* ``single_process`` -- one process per arm and repeat (a fresh process, so peak memory is its own):
  training from the latent cache vs encoding JPEG -> VAE + text on the fly each step (what the
  reference scripts do); precomputed vs live frozen reference (pairs/s, memory); MaPO vs DPO (step time,
  memory).
* ``train_overhead`` -- ``prefopt train`` (Ray Train + DeepSpeed, 1 worker; ``time/step_s`` from MLflow)
  vs a bare PyTorch loop of the same model, loss and optimizer; and the model FLOP utilisation of the
  train step (exact FLOPs from ``torch.utils.flop_counter`` / measured matmul peak of this machine).
* ``step_profile`` -- where the time of a ``prefopt train`` step goes (cProfile of the worker, ``log_every=1``
  vs the default), written to ``benchmarks/step_profile.md`` (:mod:`benchmarks.step_profile`).
* ``zero_memory`` -- per-worker peak memory of ZeRO-2 and ZeRO-3 vs plain data parallel, 2 workers (on a
  wider transformer trained from the same cache, so that ZeRO-3 has weights to partition).
* ``cache_build`` -- latent-cache build with a 2-actor Ray Data pool vs a single-process loop, rows/s.
* ``online`` -- ``prefopt online`` streaming vs rounds on the toy base: wall time and final held-out reward
  (:mod:`benchmarks.online_stream`).
* ``gpu`` -- with CUDA only: pairs/s and MFU of DPO steps of an SD3-medium-sized transformer (random
  weights, bf16); "skipped (no GPU)" otherwise.

The CPU benchmarks run on CPU on every machine (Ray workers get ``CUDA_VISIBLE_DEVICES=""``), on a
"bench" tiny SD3 built offline into ``benchmarks/_work`` (sizes in :data:`SIZES` and in the table's
header). ``--quick`` is a smaller model with fewer steps and one repeat, for a preview.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import json
import logging
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import (
    Row,
    count_flops,
    cuda_sync,
    fixed_mmap_threshold,
    fmt,
    interleaved,
    machine_info,
    markdown_table,
    matmul_peak_flops,
    median,
    memory_baseline,
    memory_report,
    paired_ratio,
    reset_peak_rss,
    run_isolated,
    time_steps,
    torch_threads,
    wait_until_quiet,
    workers_run,
)
from benchmarks.online_stream import bench_online
from benchmarks.step_profile import bench_step_profile
from prefopt_core.models.tiny import TinySD3Spec

logger = logging.getLogger("benchmarks.run")

HERE = Path(__file__).resolve().parent
DEFAULT_WORKDIR = HERE / "_work"
DEFAULT_OUT = HERE / "results.md"
BENCHMARKS = (
    "single_process",
    "train_overhead",
    "step_profile",
    "zero_memory",
    "cache_build",
    "online",
    "gpu",
)
#: Imported once by the fork server of the isolated cases (each case then starts in well under a second).
PRELOAD = (
    "torch",
    "diffusers.models.transformers.transformer_sd3",
    "diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3",
    "pyarrow.parquet",
    "prefopt_core.objective",
    "prefopt_core.models.sd3",
    "pipelines.latent_cache",
    "ray_jobs.training.recipe",
)
#: Everything a case process imports (before its memory baseline).
CASE_IMPORTS = (
    *PRELOAD,
    "pipelines.pickapic",
    "pipelines.transforms",
    "prefopt_core.config",
    "ray_jobs.cache",
)
#: Memory columns are "Δ": peak resident memory of the training steps minus resident memory after imports.
DELTA = "Δ MiB"


# ------------------------------------------------------------------------------------------ sizes
@dataclasses.dataclass(frozen=True)
class Size:
    """Model and workload of a benchmark run."""

    name: str
    spec: TinySD3Spec
    max_sequence_length: int  # T5 tokens after the 77 CLIP tokens
    num_pairs: int  # pairs of the synthetic source (cache, training data, cache-build benchmark)
    image_size: int  # side of the source JPEGs (resized/cropped to spec.sample_size)
    batch_size: int  # pairs per training step
    repeats: int
    warmup: int  # steps excluded from timing
    steps: int  # timed steps per arm and repeat
    zero_steps: int  # optimizer steps of the ZeRO memory runs
    zero_width: tuple[int, int, int]  # (blocks, heads, head dim) of the ZeRO runs' wider transformer
    cache_batch: int  # pairs per encoder batch
    rows_per_shard: int  # source rows per cache fragment
    quiet_timeout: float = 30.0  # longest wait for the machine to settle between arms (0: do not wait)


#: Compute-bound on CPU: ~45 GFLOP per DPO step of 2 pairs, 9 M transformer parameters.
BENCH_SPEC = TinySD3Spec(
    num_layers=4,
    num_attention_heads=8,
    attention_head_dim=32,
    vae_channels=(32, 64, 64, 64),
    latent_channels=16,
    clip_hidden=64,
    clip_layers=2,
    sample_size=128,
    with_t5=True,
)
QUICK_SPEC = dataclasses.replace(BENCH_SPEC, num_layers=2, sample_size=64)
SMOKE_SPEC = TinySD3Spec(num_layers=1, vae_channels=(8, 16), sample_size=32)

SIZES: dict[str, Size] = {
    "full": Size(
        "full",
        BENCH_SPEC,
        max_sequence_length=32,
        num_pairs=128,
        image_size=256,
        batch_size=2,
        repeats=3,
        warmup=2,
        steps=6,
        zero_steps=2,
        zero_width=(2, 16, 64),
        cache_batch=8,
        rows_per_shard=16,
    ),
    "quick": Size(
        "quick",
        QUICK_SPEC,
        max_sequence_length=16,
        num_pairs=64,
        image_size=128,
        batch_size=2,
        repeats=1,
        warmup=1,
        steps=4,
        zero_steps=2,
        zero_width=(2, 16, 64),
        cache_batch=8,
        rows_per_shard=16,
    ),
    # the unit tests' size: seconds per case, numbers meaningless
    "smoke": Size(
        "smoke",
        SMOKE_SPEC,
        max_sequence_length=8,
        num_pairs=16,
        image_size=48,
        batch_size=2,
        repeats=1,
        warmup=1,
        steps=2,
        zero_steps=1,
        zero_width=(1, 2, 16),
        cache_batch=4,
        rows_per_shard=8,
        quiet_timeout=0.0,  # tests run beside a live Ray: its idle workers would make every wait time out
    ),
}

#: SD3-medium's transformer (``stabilityai/stable-diffusion-3-medium-diffusers/transformer/config.json``).
SD3_MEDIUM = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
}
#: Text tokens SD3 feeds the transformer: 77 CLIP + 256 T5 (the pipeline default).
SD3_TEXT_TOKENS = 77 + 256


# ------------------------------------------------------------------------------------------ context
@dataclasses.dataclass
class Context:
    """Paths and settings shared by the benchmarks; expensive inputs are built on first use."""

    size: Size
    workdir: Path
    threads: int
    verbose: bool = False
    _memo: dict[str, Any] = dataclasses.field(default_factory=dict)

    def settle(self) -> None:
        """Between arms: wait (at most ``size.quiet_timeout`` s) until this process's children are idle."""
        if self.size.quiet_timeout > 0:
            wait_until_quiet(timeout=self.size.quiet_timeout)

    def memo(self, key: str, build: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    @property
    def base(self) -> Path:
        return self.memo("base", lambda: build_bench_model(self.size.spec, self.workdir / "models"))

    @property
    def source(self) -> Path:
        return self.memo("source", self._write_source)

    def _write_source(self) -> Path:
        from pipelines.synthetic import write_synthetic_pickapic

        s = self.size
        path = self.workdir / "data" / f"pairs-n{s.num_pairs}-s{s.image_size}.parquet"
        if not path.exists():
            write_synthetic_pickapic(
                path, num_pairs=s.num_pairs, seed=0, image_size=s.image_size, tie_fraction=0.0
            )
        return path

    def config(self, name: str, *overrides: str):
        """The run config of the benchmarks (one place): DPO, frozen reference, fp32, no export."""
        from prefopt_core.config import load_config

        s = self.size
        (self.workdir / "tracking").mkdir(parents=True, exist_ok=True)
        return load_config(
            None,
            [
                f"run.name={name}",
                f"run.workdir={self.workdir / 'runs' / name}",
                "run.seed=0",
                f"model.pretrained={self.base}",
                f"model.resolution={s.spec.sample_size}",
                f"model.max_sequence_length={s.max_sequence_length}",
                f"data.source={self.source}",
                f"cache.dir={self.workdir / 'cache' / s.name}",
                f"cache.batch_size={s.cache_batch}",
                f"cache.rows_per_shard={s.rows_per_shard}",
                "loss.name=dpo",
                "reference.strategy=frozen",
                f"train.batch_size={s.batch_size}",
                "train.lr=1e-5",
                "train.precision=fp32",
                "train.export=false",
                "train.eval_every=1000000",
                "train.use_gpu=false",
                "train.resume=never",
                "tracking.experiment=benchmarks",
                # one store for every run of the session: MLflow creates a SQLite schema in seconds
                f"tracking.uri=sqlite:///{self.workdir / 'tracking' / 'mlflow.db'}",
                *overrides,
            ],
        )

    @property
    def precompute_epochs(self) -> int:
        s = self.size
        return math.ceil((s.warmup + s.steps) * s.batch_size / s.num_pairs)

    @property
    def cache(self) -> Path:
        """The latent cache of the training benchmarks (built once with the Ray Data pool)."""
        return self.memo("cache", lambda: self._build_cache(self.config("cache")))

    @property
    def precomputed_cache(self) -> Path:
        """The same cache with the frozen reference's errors for every (pair, epoch) of the runs."""
        cfg = self.config(
            "cache-precomputed",
            "reference.strategy=precomputed",
            f"reference.precompute_epochs={self.precompute_epochs}",
            f"cache.dir={self.workdir / 'cache' / (self.size.name + '-precomputed')}",
        )
        return self.memo("precomputed_cache", lambda: self._build_cache(cfg))

    def _build_cache(self, cfg) -> Path:
        """Build (or finish, or reuse) a cache with the Ray Data pool; one of other settings is rebuilt."""
        from pipelines.latent_cache import build_cache
        from pipelines.sharded_build import PlanMismatchError
        from ray_jobs.cache import cache_settings

        t0 = time.perf_counter()

        def build() -> None:
            build_cache(
                source=str(self.source),
                cache_dir=cfg.cache_dir,
                base_model_dir=self.base,
                settings=cache_settings(cfg, self.base),
                num_actors=2,
                rows_per_shard=cfg.cache.rows_per_shard,
            )

        try:
            build()
        except PlanMismatchError:
            logger.info("%s was built with other settings: rebuilding it", cfg.cache_dir)
            shutil.rmtree(cfg.cache_dir)
            build()
        logger.info("cache %s ready (%.1f s)", cfg.cache_dir, time.perf_counter() - t0)
        return cfg.cache_dir

    def job(self, **extra: Any) -> dict[str, Any]:
        """The picklable description of a training case for :func:`step_case`."""
        s = self.size
        return {
            "cfg": self.config("single").to_dict(),
            "base": str(self.base),
            "cache": str(self.cache),
            "source": str(self.source),
            "batch_size": s.batch_size,
            "warmup": s.warmup,
            "steps": s.steps,
            "threads": self.threads,
            **extra,
        }

    @property
    def flops(self) -> dict[str, float]:
        return self.memo("flops", lambda: run_isolated(flops_case, self.job(), preload=PRELOAD))


def spec_digest(spec: TinySD3Spec) -> str:
    return hashlib.sha1(json.dumps(dataclasses.asdict(spec), sort_keys=True).encode()).hexdigest()[:10]


def build_bench_model(spec: TinySD3Spec, root: Path, seed: int = 0) -> Path:
    """The benchmark pipeline (seeded random weights, ``save_pretrained``) under ``root``; reused if built."""
    from prefopt_core.models.tiny import build_tiny_sd3
    from prefopt_core.models.tokenizer import write_clip_tokenizer

    directory = root / f"sd3-{spec_digest(spec)}-seed{seed}"
    if (directory / "model_index.json").exists():
        return directory
    tmp = directory.with_name(directory.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    write_clip_tokenizer(tmp / "_tokenizer_src")
    pipe = build_tiny_sd3(spec, tmp / "_tokenizer_src", seed=seed)
    pipe.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(tmp / "_tokenizer_src")
    tmp.rename(directory)
    logger.info("built the benchmark model in %s", directory)
    return directory


def zero_denoiser_config(size: Size) -> dict[str, Any]:
    """The ZeRO runs' transformer: the benchmark model's input/conditioning shapes (so it trains from the
    same latent cache) with ``size.zero_width`` blocks/heads/head dim. Wider than the benchmark model on
    purpose: DeepSpeed ZeRO-3 keeps every tensor of at most ``stage3_param_persistence_threshold`` (1e5)
    elements whole on every worker -- all weights of a 256-wide model -- so only a model with larger
    weights shows what ZeRO partitions."""
    spec = size.spec
    blocks, heads, head_dim = size.zero_width
    side = spec.sample_size // 2 ** (len(spec.vae_channels) - 1)
    return {
        "sample_size": side,
        "patch_size": 1,
        "in_channels": spec.latent_channels,
        "num_layers": blocks,
        "attention_head_dim": head_dim,
        "num_attention_heads": heads,
        "joint_attention_dim": 2 * spec.clip_hidden,
        "caption_projection_dim": heads * head_dim,
        "pooled_projection_dim": 2 * spec.clip_hidden,
        "out_channels": spec.latent_channels,
        "pos_embed_max_size": max(16, side * 2),
    }


def build_denoiser(config: dict[str, Any], root: Path, seed: int = 0) -> tuple[Path, int]:
    """``SD3Transformer2DModel(**config)`` with seeded random weights, saved under ``root`` (reused if
    there); returns its directory (a ``model.init_denoiser``) and its parameter count."""
    import torch
    from diffusers import SD3Transformer2DModel

    digest = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
    directory = root / f"denoiser-{digest}-seed{seed}"
    if not (directory / "config.json").exists():
        torch.manual_seed(seed)
        tmp = directory.with_name(directory.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        SD3Transformer2DModel(**config).save_pretrained(tmp, safe_serialization=True)
        tmp.rename(directory)
    params = SD3Transformer2DModel.from_pretrained(directory).num_parameters()
    return directory, params


def describe_model(size: Size, flops: dict[str, float]) -> str:
    spec = size.spec
    factor = 2 ** (len(spec.vae_channels) - 1)
    side = spec.sample_size // factor
    hidden = spec.num_attention_heads * spec.attention_head_dim
    return (
        f"SD3 MMDiT (diffusers `SD3Transformer2DModel`, seeded random weights): {spec.num_layers} joint blocks, "
        f"{spec.num_attention_heads} heads × {spec.attention_head_dim} (hidden {hidden}), patch 1, "
        f"{spec.latent_channels} latent channels, {side}×{side} latents from {spec.sample_size}-px images "
        f"(VAE ×{factor}, channels {'-'.join(map(str, spec.vae_channels))}), text 77 CLIP + "
        f"{size.max_sequence_length} T5 tokens (joint dim {2 * spec.clip_hidden}); "
        f"**{fmt(flops['params'] / 1e6)} M transformer parameters**. "
        f"One DPO step of {size.batch_size} pairs ({2 * size.batch_size} rows): "
        f"**{flops['dpo_step'] / 1e9:.1f} GFLOP** (policy forward+backward {flops['policy_step'] / 1e9:.1f} + "
        f"reference forward {flops['reference_forward'] / 1e9:.1f}); encoding one pair on the fly "
        f"(VAE × 2 images + text): {flops['encode_pair'] / 1e9:.2f} GFLOP. "
        f"FLOPs counted with `torch.utils.flop_counter` (matmul/conv/attention; a multiply-add = 2)."
    )


# ------------------------------------------------------------------------------------------ training cases
def _cpu_only() -> None:
    """CPU benchmarks stay on CPU on a GPU machine too (before anything initialises CUDA)."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def _settle_process(threads: int) -> None:
    """Pay a case process's fixed costs before its memory baseline: every import the case makes and the
    first use of the thread pool and the matmul/conv/attention kernels."""
    import torch
    import torch.nn.functional as F

    for module in CASE_IMPORTS:
        importlib.import_module(module)
    for name in ("diffusers", "transformers"):  # e.g. "input truncated to max_sequence_length" per step
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(threads)
    x = torch.ones(1, 2, 16, 8, requires_grad=True)
    F.scaled_dot_product_attention(x, x, x).sum().backward()
    F.conv2d(torch.ones(1, 3, 8, 8), torch.ones(4, 3, 3, 3)).sum()
    (torch.ones(64, 64) @ torch.ones(64, 64)).sum()


def cached_batches(cache_dir: str | Path, batch_size: int) -> Iterator[tuple[int, Any]]:
    """``(epoch, PreferenceBatch)`` from a latent cache, endlessly (the arrow -> tensor decode is per step)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.cache_reader import GEOMETRY_COLUMNS, batch_from_table
    from pipelines.latent_cache import read_manifest, tensor_columns

    manifest = read_manifest(cache_dir)
    columns = {k: v for k, v in tensor_columns(manifest).items() if k not in GEOMETRY_COLUMNS}
    table = pa.concat_tables(
        pq.read_table(Path(cache_dir) / f, columns=["pair_key", *columns]) for f in manifest["files"]
    )
    n = table.num_rows // batch_size
    if n == 0:
        raise ValueError(f"{cache_dir} holds {table.num_rows} pairs, fewer than a batch of {batch_size}")
    epoch = 0
    while True:
        for i in range(n):
            yield epoch, batch_from_table(table.slice(i * batch_size, batch_size), columns)
        epoch += 1


def on_the_fly_batches(cfg, source: str, adapter, batch_size: int) -> Iterator[tuple[int, Any]]:
    """What the reference training scripts do every step: decode both JPEGs of each pair, resize + crop,
    VAE-encode the 2B images and text-encode the B captions, then train on the result."""
    import numpy as np
    import pyarrow as pa
    import torch

    from pipelines.latent_cache import pair_key
    from pipelines.pair_validation import validate_and_canonicalize
    from pipelines.pickapic import resolve_source
    from pipelines.schema import pair_rng
    from pipelines.transforms import TransformConfig, transform_pair
    from prefopt_core.objective import PreferenceBatch

    fragments = resolve_source(source, rows_per_fragment=1 << 30)
    pairs = pa.concat_tables(
        validate_and_canonicalize(f.read(), f, tie_policy=cfg.data.tie_policy, seed=cfg.run.seed)[0]
        for f in fragments
    ).to_pylist()  # the dataset in memory, as the scripts' datasets.Dataset: bytes + captions
    tcfg = TransformConfig(
        resolution=cfg.model.resolution, crop=cfg.data.crop, random_flip=cfg.data.random_flip
    )
    n = len(pairs) // batch_size
    epoch = 0
    while True:
        for i in range(n):
            rows = pairs[i * batch_size : (i + 1) * batch_size]
            px = [
                transform_pair(
                    r["jpg_w"], r["jpg_l"], tcfg, pair_rng(cfg.run.seed, r["pair_id"], "transform")
                )
                for r in rows
            ]
            pixels = torch.from_numpy(np.stack([p.w for p in px] + [p.l for p in px]))  # (2B, 3, R, R)
            latents_w, latents_l = adapter.encode_images(pixels).chunk(2)  # (B, C, h, w) each
            cond = adapter.encode_prompts([r["caption"] for r in rows])  # {name: (B, ...)}
            keys = torch.tensor([pair_key(r["pair_id"]) for r in rows], dtype=torch.int64)
            yield epoch, PreferenceBatch(pair_key=keys, latents_w=latents_w, latents_l=latents_l, cond=cond)
        epoch += 1


#: Arms of :func:`step_case`: (loss, batches from, live reference model).
STEP_ARMS = {
    "cache": ("dpo", "cache", True),
    "on_the_fly": ("dpo", "on_the_fly", True),
    "precomputed": ("dpo", "precomputed_cache", False),
    "mapo": ("mapo", "cache", False),
}


def _policy_reference_objective(cfg, base: str, loss: str, with_reference: bool):
    import torch

    from prefopt_core.models.base import TORCH_DTYPES
    from prefopt_core.models.registry import adapter_for
    from prefopt_core.objective import PreferenceObjective

    adapter = adapter_for(cfg.model, base)
    policy = adapter.load_denoiser(cfg.model.init_denoiser, dtype=torch.float32).train()
    reference = None
    if with_reference:
        reference = adapter.load_denoiser(cfg.model.init_denoiser, dtype=TORCH_DTYPES[cfg.model.dtype])
        reference.requires_grad_(False).eval()
    if loss != cfg.loss.name:  # another loss on the same run: its own default beta
        cfg = cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"name": loss, "beta": None})})
    objective = PreferenceObjective.from_config(adapter, cfg)
    return adapter, policy, reference, objective


def step_case(arm: str, job: dict[str, Any]) -> dict[str, Any]:
    """One arm of the single-process benchmarks in this (fresh) process: a plain PyTorch training loop --
    :class:`PreferenceObjective`, ``backward``, gradient clipping, ``AdamW`` -- timed per step after
    ``warmup`` steps; returns step times and memory (peak RSS of the steps minus RSS after the imports)."""
    _cpu_only()
    _settle_process(job["threads"])
    import torch

    from prefopt_core.config import config_from_dict
    from ray_jobs.training.optim import build_optimizer

    loss, data, with_reference = STEP_ARMS[arm]
    baseline = memory_baseline()
    cfg = config_from_dict(job["cfg"])
    adapter, policy, reference, objective = _policy_reference_objective(
        cfg, job["base"], loss, with_reference
    )
    optimizer, _ = build_optimizer(policy, cfg.train)  # the optimizer `prefopt train` uses (fused AdamW)
    if data == "on_the_fly":
        batches = on_the_fly_batches(cfg, job["source"], adapter, job["batch_size"])
    else:
        batches = cached_batches(job[data], job["batch_size"])

    def step() -> None:
        epoch, batch = next(batches)
        out = objective(policy, batch, epoch=epoch, reference=reference)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.train.grad_clip)
        optimizer.step()

    setup = memory_report(baseline)
    reset_peak_rss()  # the peak of the training steps, not of loading the models
    times = time_steps(step, warmup=job["warmup"], steps=job["steps"])
    return {
        "arm": arm,
        "step_s": times,
        "torch_threads": torch.get_num_threads(),
        "setup_delta_mib": setup["delta_mib"],
        **memory_report(baseline),
    }


def flops_case(job: dict[str, Any]) -> dict[str, float]:
    """Exact FLOPs of the pieces of a training step of the benchmark model (one batch from the cache)."""
    _cpu_only()
    _settle_process(job["threads"])
    import torch

    from prefopt_core.config import config_from_dict

    cfg = config_from_dict(job["cfg"])
    adapter, policy, reference, objective = _policy_reference_objective(cfg, job["base"], "dpo", True)
    _, mapo, _, mapo_objective = _policy_reference_objective(cfg, job["base"], "mapo", False)
    epoch, batch = next(cached_batches(job["cache"], job["batch_size"]))
    noise, t = objective.draw(batch, epoch)

    def dpo_step() -> None:
        objective(policy, batch, epoch=epoch, reference=reference).loss.backward()

    def mapo_step() -> None:
        mapo_objective(mapo, batch, epoch=epoch).loss.backward()

    def reference_forward() -> None:
        objective.reference_errors(reference, batch, noise, t)

    r = cfg.model.resolution
    pixels = torch.rand(2, 3, r, r) * 2 - 1
    adapter.encode_prompts(["warm-up"])  # loads the encoders outside the count
    out = {
        "params": float(sum(p.numel() for p in policy.parameters())),
        "dpo_step": count_flops(dpo_step),
        "mapo_step": count_flops(mapo_step),
        "reference_forward": count_flops(reference_forward),
        "encode_pair": count_flops(
            lambda: (adapter.encode_images(pixels), adapter.encode_prompts(["a red circle"]))
        ),
    }
    out["policy_step"] = out["dpo_step"] - out["reference_forward"]
    return out


# ------------------------------------------------------------------------------------------ Ray cases
_WORKER_REPORTS = "worker_memory"
#: What a training worker imports (rank 0 also MLflow), imported before its memory baseline.
WORKER_IMPORTS = (
    "deepspeed",
    "deepspeed.comm.torch",
    "mlflow",
    "diffusers.models.transformers.transformer_sd3",
    "pipelines.latent_cache",
    "prefopt_core.objective",
    "prefopt_core.reference",
    "ray_jobs.tracking",
)


def reporting_train_loop(loop_config: dict[str, Any]) -> None:
    """``ray_jobs.training.recipe.train_loop_per_worker`` unchanged, plus each worker's memory written to
    ``<run.workdir>/worker_memory/rank<R>.json`` at the end: the peak through ``WorkerRecipe.setup`` and
    the peak of what follows (training steps, checkpoint), both minus the RSS after the imports."""
    from unittest import mock

    import ray.train
    import torch

    from ray_jobs.training import recipe as train

    for module in WORKER_IMPORTS:  # before the baseline, so that it holds the libraries on every rank
        importlib.import_module(module)
    baseline = memory_baseline()
    after_setup: dict[str, float] = {}

    class MeasuredRecipe(train.WorkerRecipe):
        def setup(self) -> None:
            super().setup()
            after_setup.update(memory_report(baseline))
            reset_peak_rss()

    with mock.patch.object(train, "WorkerRecipe", MeasuredRecipe):
        train.train_loop_per_worker(loop_config)
    rank = ray.train.get_context().get_world_rank()
    report = {
        "rank": rank,
        "torch_threads": torch.get_num_threads(),
        "setup_delta_mib": after_setup.get("delta_mib"),
        **memory_report(baseline),
    }
    out = Path(loop_config["inputs"].config.workdir) / _WORKER_REPORTS / f"rank{rank}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report))


def zero_memory_train_loop(loop_config: dict[str, Any]) -> None:
    """:func:`reporting_train_loop` with a fixed glibc mmap threshold (:func:`fixed_mmap_threshold`), set
    before its baseline: the peak is then what the arm keeps and allocates, not how fragmented its heap got
    (measured on the 16.8 M model: ZeRO-3 / DP 1.07 with glibc's sliding threshold, 0.76 with it fixed)."""
    fixed_mmap_threshold()
    reporting_train_loop(loop_config)


def ray_training_run(cfg, loop: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """``run_training(cfg)`` (``prefopt train``) in this Ray session, its workers running ``loop`` (default
    :func:`reporting_train_loop`); returns its step times from MLflow (``time/step_s`` per optimizer step),
    the workers' memory reports and the wall time."""
    from mlflow.tracking import MlflowClient

    from ray_jobs.training.driver import run_training

    shutil.rmtree(cfg.workdir, ignore_errors=True)
    t0 = time.perf_counter()
    with workers_run(loop or reporting_train_loop):
        summary = run_training(cfg)
    wall = time.perf_counter() - t0
    if summary.mlflow_run_id is None:
        raise RuntimeError(f"the run logged no MLflow metrics ({summary.mlflow_tracking_uri})")
    history = MlflowClient(summary.mlflow_tracking_uri).get_metric_history(
        summary.mlflow_run_id, "time/step_s"
    )
    step_s = [m.value for m in sorted(history, key=lambda m: m.step)]
    reports = [json.loads(p.read_text()) for p in sorted((cfg.workdir / _WORKER_REPORTS).glob("rank*.json"))]
    if len(reports) != cfg.train.num_workers:
        raise RuntimeError(f"{len(reports)} worker memory reports for {cfg.train.num_workers} workers")
    return {"step_s": step_s, "workers": reports, "wall_s": wall}


# ------------------------------------------------------------------------------------------ cache cases
def cache_loop_case(job: dict[str, Any]) -> dict[str, Any]:
    """The single-process cache build: the same work as the Ray Data pipeline -- read, validate,
    transform each fragment, encode batches with one :class:`LatentEncoder`, write shards -- in a loop."""
    _cpu_only()
    _settle_process(job["threads"])
    import dataclasses as dc

    import pyarrow as pa
    import torch

    from pipelines.latent_cache import LatentEncoder, _read_validate_transform
    from pipelines.pickapic import resolve_source

    t0 = time.perf_counter()
    settings, out_dir = job["settings"], job["out_dir"]
    fragments = resolve_source(job["source"], rows_per_fragment=job["rows_per_shard"])
    encoder = LatentEncoder(settings, job["base"], out_dir)
    torch.set_num_threads(job["threads"])  # the encoder sets OMP_NUM_THREADS (1 outside Ray)
    for index, fragment in enumerate(fragments):
        spec = pa.table({"index": [index], "fragment": [json.dumps(dc.asdict(fragment))]})
        rows = _read_validate_transform(spec, settings=settings, out_dir=out_dir)
        for start in range(0, rows.num_rows, settings["batch_size"]):
            encoder(rows.slice(start, settings["batch_size"]))
    return {"wall_s": time.perf_counter() - t0, "torch_threads": torch.get_num_threads()}


def steady_rows_per_s(cache_dir: Path, parallel: int) -> tuple[float, int]:
    """Rows/s of a finished build from its shard write times, start-up excluded: the rows of the shards
    after the first ``parallel`` (one per concurrent encoder) over the time from the ``parallel``-th
    shard to the last. Returns ``(rows_per_s, rows)``."""
    import pyarrow.parquet as pq

    files = sorted((cache_dir / "shards").glob("f*.parquet"), key=lambda p: p.stat().st_mtime)
    rows = [pq.ParquetFile(f).metadata.num_rows for f in files]
    if len(files) <= parallel:
        raise RuntimeError(f"{cache_dir}: {len(files)} shards, too few to measure a steady rate")
    times = [f.stat().st_mtime for f in files]
    return sum(rows[parallel:]) / (times[-1] - times[parallel - 1]), sum(rows)


# ------------------------------------------------------------------------------------------ GPU case
def transformer_dpo_case(job: dict[str, Any]) -> dict[str, Any]:
    """DPO steps (policy forward+backward, frozen-reference forward, AdamW) of a transformer built from
    ``job["config"]`` with random weights; pairs/s, model FLOPs per step and MFU against the measured
    matmul peak of the same device and dtype. Used on GPU with :data:`SD3_MEDIUM` in bf16."""
    import copy

    import torch
    from diffusers import SD3Transformer2DModel

    from prefopt_core.models.sd3 import SD3Adapter
    from prefopt_core.objective import PreferenceBatch, PreferenceObjective
    from prefopt_core.timesteps import TimestepConfig

    device, dtype = torch.device(job["device"]), getattr(torch, job["dtype"])
    if device.type == "cpu":
        torch.set_num_threads(job["threads"])
    config, b = job["config"], job["batch_pairs"]
    baseline = memory_baseline(device.type)
    torch.manual_seed(0)
    with torch.device(device):
        policy = SD3Transformer2DModel(**config).to(dtype).train()
    if job.get("gradient_checkpointing"):
        policy.enable_gradient_checkpointing()
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    adapter = SD3Adapter(job["scheduler_dir"], device=device)  # the flow-matching schedule only
    objective = PreferenceObjective(
        adapter,
        loss_name="dpo",
        loss_params={"beta": 5000.0},
        timesteps=TimestepConfig(sampling="logit_normal"),
        seed=0,
    )
    side, channels = config["sample_size"], config["in_channels"]
    gen = torch.Generator().manual_seed(0)
    batch = PreferenceBatch(
        pair_key=torch.arange(b),
        latents_w=torch.randn(b, channels, side, side, generator=gen),
        latents_l=torch.randn(b, channels, side, side, generator=gen),
        cond={
            "prompt_embeds": torch.randn(b, job["text_tokens"], config["joint_attention_dim"], generator=gen),
            "pooled_prompt_embeds": torch.randn(b, config["pooled_projection_dim"], generator=gen),
        },
    ).to(device)

    def loss_backward() -> None:
        objective(policy, batch, epoch=0, reference=reference).loss.backward()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_backward()
        optimizer.step()

    sync = cuda_sync if device.type == "cuda" else None
    flops = count_flops(loss_backward)
    optimizer.zero_grad(set_to_none=True)
    times = time_steps(step, warmup=job["warmup"], steps=job["steps"], sync=sync)
    memory = memory_report(baseline, device.type)
    params = sum(p.numel() for p in policy.parameters())
    policy = reference = optimizer = None  # free the GPU before measuring the matmul peak
    if device.type == "cuda":
        torch.cuda.empty_cache()
    peak = matmul_peak_flops(dtype, device.type, n=job.get("peak_n"))
    step_s = median(times)
    return {
        "step_s": times,
        "pairs_per_s": b / step_s,
        "flops_per_step": flops,
        "achieved_flops": flops / step_s,
        "peak_flops": peak,
        "mfu": flops / step_s / peak,
        "params": params,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        **memory,
    }


# ------------------------------------------------------------------------------------------ benchmarks
def _pairs_per_s(result: dict[str, Any], batch_size: int) -> float:
    return batch_size / median(result["step_s"])


def bench_single_process(ctx: Context) -> list[Row]:
    """Cache vs on-the-fly, precomputed vs live reference, MaPO vs DPO: one fresh process per arm and repeat."""
    s = ctx.size
    job = ctx.job(precomputed_cache=str(ctx.precomputed_cache))
    flops = ctx.flops
    runs: dict[str, list[dict]] = {arm: [] for arm in STEP_ARMS}
    for r, arm in interleaved(list(STEP_ARMS), s.repeats):
        ctx.settle()
        result = run_isolated(step_case, arm, job, preload=PRELOAD)
        runs[arm].append(result)
        logger.info(
            "single_process repeat %d %-11s %.3f s/step, Δ %.0f MiB",
            r,
            arm,
            median(result["step_s"]),
            result["delta_mib"],
        )

    def pps(arm: str) -> list[float]:
        return [_pairs_per_s(x, s.batch_size) for x in runs[arm]]

    def sec(arm: str) -> list[float]:
        return [median(x["step_s"]) for x in runs[arm]]

    def mem(arm: str) -> list[float]:
        return [x["delta_mib"] for x in runs[arm]]

    def peak(arm: str) -> str:
        return fmt(median(x["peak_mib"] for x in runs[arm]))

    rep = f"{s.repeats} repeat(s) × {s.steps} steps after {s.warmup} warm-up, one fresh process each"
    encode_share = flops["encode_pair"] * s.batch_size / flops["dpo_step"]
    return [
        Row(
            "Training input: latent cache vs encoding on the fly (DPO, live reference)",
            "cache",
            "on the fly",
            median(pps("cache")),
            median(pps("on_the_fly")),
            "pairs/s",
            ratio=paired_ratio(pps("cache"), pps("on_the_fly")),
            notes=f"on the fly = per step JPEG decode + resize/crop, VAE encode of 2B images, text encode of B "
            f"captions (+{100 * encode_share:.0f} % FLOPs over the step); memory Δ {fmt(median(mem('cache')))} vs "
            f"{fmt(median(mem('on_the_fly')))} MiB; {rep}",
        ),
        Row(
            "Reference: precomputed vs live frozen reference (DPO)",
            "precomputed",
            "live",
            median(pps("precomputed")),
            median(pps("cache")),
            "pairs/s",
            ratio=paired_ratio(pps("precomputed"), pps("cache")),
            notes=f"precomputed: reference errors read from the cache, no reference model; {rep}",
        ),
        Row(
            "Reference: precomputed vs live frozen reference, peak memory",
            "precomputed",
            "live",
            median(mem("precomputed")),
            median(mem("cache")),
            DELTA,
            ratio=paired_ratio(mem("precomputed"), mem("cache")),
            higher_is_better=False,
            notes=f"peak RSS {peak('precomputed')} vs {peak('cache')} MiB (incl. libraries)",
        ),
        Row(
            "MaPO vs DPO (live reference): step time",
            "MaPO",
            "DPO",
            median(sec("mapo")),
            median(sec("cache")),
            "s/step",
            ratio=paired_ratio(sec("mapo"), sec("cache")),
            higher_is_better=False,
            notes=f"paper: −14.5 % (ratio 0.855); FLOPs {flops['mapo_step'] / 1e9:.1f} vs "
            f"{flops['dpo_step'] / 1e9:.1f} GFLOP; {rep}",
        ),
        Row(
            "MaPO vs DPO (live reference): peak memory",
            "MaPO",
            "DPO",
            median(mem("mapo")),
            median(mem("cache")),
            DELTA,
            ratio=paired_ratio(mem("mapo"), mem("cache")),
            higher_is_better=False,
            notes=f"paper: −17.5 % (ratio 0.825, GPU memory at SDXL scale); peak RSS {peak('mapo')} vs "
            f"{peak('cache')} MiB",
        ),
    ]


def bench_train_overhead(ctx: Context) -> list[Row]:
    """``prefopt train`` (1 worker) vs a bare loop: time per optimizer step; and MFU of the train step."""
    s = ctx.size
    flops = ctx.flops
    job = ctx.job()
    ray_s: list[float] = []
    bare_s: list[float] = []
    mfu_ray: list[float] = []
    mfu_bare: list[float] = []
    peaks: list[float] = []
    walls: list[float] = []
    threads_seen: set[int] = set()
    for r, arm in interleaved(["prefopt", "bare"], s.repeats):
        ctx.settle()
        if arm == "prefopt":
            cfg = ctx.config(
                f"train-overhead-r{r}",
                "train.num_workers=1",
                f"train.cpus_per_worker={ctx.threads}",
                f"train.max_steps={s.warmup + s.steps}",
            )
            result = ray_training_run(cfg)
            step_s = median(result["step_s"][s.warmup :])
            ray_s.append(step_s)
            walls.append(result["wall_s"])
            threads_seen.update(w["torch_threads"] for w in result["workers"])
        else:
            result = run_isolated(step_case, "cache", job, preload=PRELOAD)
            step_s = median(result["step_s"])
            bare_s.append(step_s)
        ctx.settle()
        with torch_threads(ctx.threads):
            peak = matmul_peak_flops(repeats=3)  # next to the arm it normalises
        peaks.append(peak)
        (mfu_ray if arm == "prefopt" else mfu_bare).append(flops["dpo_step"] / step_s / peak)
        logger.info(
            "train_overhead repeat %d %-7s %.3f s/step, peak %.1f GFLOP/s", r, arm, step_s, peak / 1e9
        )
    achieved = flops["dpo_step"] / median(ray_s)
    return [
        Row(
            "`prefopt train` (Ray Train + DeepSpeed, 1 worker) vs bare PyTorch loop",
            "prefopt train",
            "bare loop",
            median(ray_s),
            median(bare_s),
            "s/step",
            ratio=paired_ratio(ray_s, bare_s),
            higher_is_better=False,
            notes=f"same model, DPO loss, live reference, AdamW, clipping, batch {s.batch_size}; train.zero_stage=2, "
            "which one worker runs as stage 0 (`policy_stage`); "
            f"`time/step_s` from MLflow (steps after {s.warmup} warm-up) vs the same span in a fresh process; "
            f"worker torch threads {sorted(threads_seen)} vs {ctx.threads}; run wall time incl. start-up "
            f"{fmt(median(walls))} s for {s.warmup + s.steps} steps; {s.repeats} repeat(s), per-repeat ratios "
            + ", ".join(f"{a / b:.3f}" for a, b in zip(ray_s, bare_s, strict=True)),
        ),
        Row(
            "Model FLOP utilisation of the train step (`prefopt train`)",
            "achieved",
            "matmul peak",
            achieved / 1e9,
            median(peaks) / 1e9,
            "GFLOP/s",
            ratio=median(mfu_ray),
            bold=False,
            notes=f"ratio = MFU (median per repeat); {flops['dpo_step'] / 1e9:.1f} GFLOP/step "
            f"(policy fwd+bwd + reference fwd); peak = best fp32 `torch.mm` 2048² with {ctx.threads} threads; "
            f"bare loop MFU {100 * median(mfu_bare):.1f} %",
        ),
    ]


def bench_zero_memory(ctx: Context) -> list[Row]:
    """Per-worker peak memory of ZeRO-2 / ZeRO-3 vs plain data parallel (ZeRO-0), 2 workers, on a wider
    transformer (:func:`zero_denoiser_config`) trained from the same cache, 1 pair per worker and step."""
    s = ctx.size
    denoiser, params = build_denoiser(zero_denoiser_config(s), ctx.workdir / "models")
    stages = {"dp": 0, "zero2": 2, "zero3": 3}
    train_delta: dict[str, list[float]] = {k: [] for k in stages}
    setup_delta: dict[str, list[float]] = {k: [] for k in stages}
    for r, arm in interleaved(list(stages), s.repeats):
        ctx.settle()
        cfg = ctx.config(
            f"zero-{arm}-r{r}",
            f"model.init_denoiser={denoiser}",
            "train.num_workers=2",
            "train.cpus_per_worker=1",
            "train.batch_size=1",
            f"train.zero_stage={stages[arm]}",
            f"train.max_steps={s.zero_steps}",
        )
        workers = ray_training_run(cfg, loop=zero_memory_train_loop)["workers"]
        train_delta[arm].append(sum(w["delta_mib"] for w in workers) / len(workers))
        setup_delta[arm].append(sum(w["setup_delta_mib"] for w in workers) / len(workers))
        logger.info(
            "zero_memory repeat %d %-5s Δ %.0f MiB per worker (setup Δ %.0f MiB)",
            r,
            arm,
            train_delta[arm][-1],
            setup_delta[arm][-1],
        )
    blocks, heads, head_dim = s.zero_width
    # bytes/param of the model states alone: fp32 policy weights 4 + gradients 4 + AdamW moments 8 (ZeRO-2
    # partitions gradients and moments over the workers, ZeRO-3 everything) + a fp32 frozen reference 4
    # (replicated, except under ZeRO-3, which partitions it too)
    ideal = {"dp": 20, "zero2": 4 + 12 / 2 + 4, "zero3": 20 / 2}
    rows = []
    for arm, label in (("zero2", "ZeRO-2"), ("zero3", "ZeRO-3")):
        rows.append(
            Row(
                f"{label} vs plain data parallel, 2 workers: per-worker peak memory of training",
                label,
                "DP",
                median(train_delta[arm]),
                median(train_delta["dp"]),
                DELTA,
                ratio=paired_ratio(train_delta[arm], train_delta["dp"]),
                higher_is_better=False,
                notes=f"DeepSpeed stage {stages[arm]} vs 0 in `prefopt train` (fp32, AdamW, frozen reference, "
                f"1 pair per worker and step) on a wider transformer: {blocks} blocks × {heads} heads × "
                f"{head_dim}, {fmt(params / 1e6)} M params; peak of the training steps (after setup); "
                f"model states alone: {fmt(params * ideal[arm] / 2**20)} vs "
                f"{fmt(params * ideal['dp'] / 2**20)} MiB (ratio {ideal[arm] / ideal['dp']:.2f}); peak "
                f"through setup (load, partition): {fmt(median(setup_delta[arm]))} vs "
                f"{fmt(median(setup_delta['dp']))} MiB; DeepSpeed buffers sized to the model "
                "(`ray_jobs.training.deepspeed_config`); glibc mmap threshold fixed at 128 KiB in the "
                "workers (freed tensors leave the RSS); mean of the 2 workers; "
                f"{s.zero_steps} steps, {s.repeats} repeat(s)",
            )
        )
    return rows


def bench_cache_build(ctx: Context) -> list[Row]:
    """Latent-cache build: Ray Data pool of 2 encoder actors vs one process doing the same work in a loop."""
    import dataclasses as dc

    from pipelines.latent_cache import build_cache
    from ray_jobs.cache import cache_settings

    s = ctx.size
    cfg = ctx.config("cache-build")
    settings = cache_settings(cfg, ctx.base)
    rates: dict[str, list[float]] = {"pool": [], "loop": []}
    walls: dict[str, list[float]] = {"pool": [], "loop": []}
    _ = ctx.cache  # the first Ray Data build (warm-up) happens outside the timing
    for r, arm in interleaved(["pool", "loop"], s.repeats):
        out = ctx.workdir / "cache_build" / f"{arm}-r{r}"
        shutil.rmtree(out, ignore_errors=True)
        ctx.settle()
        t0 = time.perf_counter()
        if arm == "pool":
            build_cache(
                source=str(ctx.source),
                cache_dir=out,
                base_model_dir=ctx.base,
                settings=settings,
                num_actors=2,
                cpus_per_actor=1.0,
                rows_per_shard=s.rows_per_shard,
            )
        else:
            job = {
                "settings": dc.asdict(settings),
                "base": str(ctx.base),
                "out_dir": str(out),
                "source": str(ctx.source),
                "rows_per_shard": s.rows_per_shard,
                "threads": 2,
            }
            run_isolated(cache_loop_case, job, preload=PRELOAD)
        walls[arm].append(time.perf_counter() - t0)
        rate, rows = steady_rows_per_s(out, parallel=2 if arm == "pool" else 1)
        rates[arm].append(rate)
        logger.info(
            "cache_build repeat %d %-4s %.2f rows/s steady, %.1f s wall", r, arm, rate, walls[arm][-1]
        )
        shutil.rmtree(out, ignore_errors=True)
    return [
        Row(
            "Latent-cache build: 2-actor Ray Data pool vs single-process loop",
            "Ray Data pool",
            "loop",
            median(rates["pool"]),
            median(rates["loop"]),
            "rows/s",
            ratio=paired_ratio(rates["pool"], rates["loop"]),
            notes=f"steady state from shard write times ({rows} pairs, encoder batch {s.cache_batch}); same "
            f"CPU budget: 2 actors × 1 thread vs 1 process × 2 threads; wall time incl. start-up "
            f"{fmt(median(walls['pool']))} vs {fmt(median(walls['loop']))} s; {s.repeats} repeat(s)",
        )
    ]


def bench_gpu(ctx: Context, *, batch_pairs: int = 1) -> list[Row]:
    """SD3-medium-sized transformer, random weights, bf16, DPO steps on the GPU."""
    import torch

    name = "SD3-medium-sized transformer (24 blocks, hidden 1536, 128×128 latents), DPO, bf16"
    if not torch.cuda.is_available():
        return [
            Row(f"GPU: {name}", "pairs/s", "—", None, None, "pairs/s", status="skipped (no GPU)"),
            Row(
                "GPU: MFU of the DPO step",
                "achieved",
                "bf16 matmul peak",
                None,
                None,
                "TFLOP/s",
                status="skipped (no GPU)",
            ),
        ]
    quick = ctx.size.name != "full"
    job = {
        "config": SD3_MEDIUM,
        "device": "cuda",
        "dtype": "bfloat16",
        "batch_pairs": batch_pairs,
        "text_tokens": SD3_TEXT_TOKENS,
        "warmup": 2 if quick else 3,
        "steps": 4 if quick else 10,
        "threads": ctx.threads,
        "scheduler_dir": str(ctx.base),
    }
    try:
        result = run_isolated(transformer_dpo_case, job, preload=("torch",))
    except torch.OutOfMemoryError:  # smaller GPUs: recompute activations instead of storing them
        logger.warning(
            "out of GPU memory with %d pair(s) per step: retrying with gradient checkpointing", batch_pairs
        )
        job["gradient_checkpointing"] = True
        result = run_isolated(transformer_dpo_case, job, preload=("torch",))
    checkpointing = (
        "; gradient checkpointing (FLOPs include the recomputed forward)"
        if job.get("gradient_checkpointing")
        else ""
    )
    notes = (
        f"{result['device_name']}; {fmt(result['params'] / 1e9)} B params; {batch_pairs} pair(s) per step = "
        f"{2 * batch_pairs} rows of 4096 image + {SD3_TEXT_TOKENS} text tokens; policy fwd+bwd + reference "
        f"fwd + AdamW (bf16 weights and states){checkpointing}; median of {job['steps']} steps after "
        f"{job['warmup']} warm-up; peak memory {fmt(result['peak_mib'] / 1024)} GiB "
        "(`torch.cuda.max_memory_allocated`)"
    )
    return [
        Row(f"GPU: {name}", "pairs/s", "—", result["pairs_per_s"], None, "pairs/s", notes=notes),
        Row(
            "GPU: MFU of the DPO step",
            "achieved",
            "bf16 matmul peak",
            result["achieved_flops"] / 1e12,
            result["peak_flops"] / 1e12,
            "TFLOP/s",
            ratio=result["mfu"],
            bold=False,
            notes=f"ratio = MFU; {result['flops_per_step'] / 1e12:.1f} TFLOP/step (torch.utils.flop_counter); "
            f"peak = best bf16 `torch.mm` 8192²",
        ),
    ]


RUNNERS: dict[str, Callable[[Context], list[Row]]] = {
    "single_process": bench_single_process,
    "train_overhead": bench_train_overhead,
    "step_profile": bench_step_profile,
    "zero_memory": bench_zero_memory,
    "cache_build": bench_cache_build,
    "online": bench_online,
    "gpu": bench_gpu,
}


# ------------------------------------------------------------------------------------------ driver
def start_ray(threads: int, verbose: bool) -> bool:
    """One local Ray for the whole run: 127.0.0.1, no dashboard, CPU only (workers never see a GPU).
    Reuses a Ray this process is already connected to (tests); returns whether it started one."""
    import ray
    import ray.data

    from ray_jobs.cluster import WORKER_ENV

    if ray.is_initialized():
        return False

    env = {**{k: v for k, v in WORKER_ENV.items() if v}, "CUDA_VISIBLE_DEVICES": ""}
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
        env[name] = os.environ.get(name, "1")
    ray.init(
        num_cpus=max(4, threads + 2),
        num_gpus=0,
        include_dashboard=False,
        log_to_driver=verbose,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": env},
    )
    data = ray.data.DataContext.get_current()
    data.enable_progress_bars = False
    data.execution_options.preserve_order = True
    data.print_on_execution_start = False
    _quiet_libraries()
    return True


def _quiet_libraries() -> None:
    """Keep the console to this run's own progress lines: Ray Data and MLflow log INFO lines through
    handlers of their own (Ray Data's full log stays in the Ray session directory)."""
    import mlflow  # noqa: F401  -- configures its loggers on import: import first, then quiet them

    for name in ("ray", "ray.data", "ray.train", "mlflow", "alembic"):
        log = logging.getLogger(name)
        log.setLevel(logging.WARNING if name != "ray.data" else log.level)
        for handler in log.handlers:
            if not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.WARNING)


@contextlib.contextmanager
def _environment(**defaults: str):
    """Environment defaults for this run (inherited by Ray workers and case processes), restored after."""
    added = [k for k in defaults if k not in os.environ]
    os.environ.update({k: defaults[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def render(rows: list[Row], header: dict[str, str], model: str, notes: list[str]) -> str:
    lines = ["# prefopt benchmarks", ""]
    lines += [f"- **{k}**: {v}" for k, v in header.items()]
    lines += ["", f"**Benchmark model.** {model}", "", markdown_table(rows), ""]
    lines += notes
    return "\n".join(lines) + "\n"


def _notes(size: Size) -> list[str]:
    return [
        "How to read it: every ratio is arm A / arm B, measured side by side in this run (arms interleaved "
        "A B, B A, A B, ...; the median over repeats of the per-repeat ratio); the better arm is in bold. "
        f"{DELTA} = peak resident memory of the training steps (the process's high-water mark is reset after "
        "the models are loaded; a Ray worker measures itself) minus its resident memory after the imports: "
        "what weights, optimizer state, activations and data need (on a GPU: "
        "`torch.cuda.max_memory_allocated`). Warm-up steps are excluded from every time.",
        "",
        f"Size `{size.name}`: {size.repeats} repeat(s), {size.warmup} warm-up + {size.steps} timed steps, "
        f"{size.num_pairs} synthetic Pick-a-Pic-schema pairs ({size.image_size}-px JPEGs).",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller model, fewer steps, one repeat")
    parser.add_argument("--size", choices=sorted(SIZES), help="explicit size (overrides --quick)")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these benchmarks")
    parser.add_argument("--repeats", type=int, help="override the size's repeats")
    parser.add_argument("--threads", type=int, help="torch threads per training process (default: all cores)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--gpu-batch-pairs", type=int, default=1, help="pairs per GPU step (SD3-medium)")
    parser.add_argument("--verbose", action="store_true", help="show Ray worker logs")
    parser.add_argument("--fresh", action="store_true", help="rebuild models, data and caches of --workdir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("benchmarks").setLevel(logging.INFO)
    size = SIZES[args.size or ("quick" if args.quick else "full")]
    if args.repeats:
        size = dataclasses.replace(size, repeats=args.repeats)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    ctx = Context(size, args.workdir.resolve(), args.threads or cores, verbose=args.verbose)
    stale = ["runs", "tracking", "cache_build"]  # outputs of earlier sessions; models, data, caches stay
    for name in [*stale, *(["models", "data", "cache"] if args.fresh else [])]:
        shutil.rmtree(ctx.workdir / name, ignore_errors=True)
    selected = args.only or list(BENCHMARKS)
    shown = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python -m benchmarks.run", *map(shlex.quote, shown)])

    env = {
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TQDM_DISABLE": "1",
    }
    t_start = time.perf_counter()
    rows: list[Row] = []
    timings: dict[str, float] = {}
    flops = None
    with _environment(**env), torch_threads(ctx.threads):
        needs_ray = any(b != "gpu" for b in selected)
        owns_ray = start_ray(ctx.threads, args.verbose) if needs_ray else False
        try:
            if needs_ray:
                t0 = time.perf_counter()
                flops = ctx.flops  # builds the model, the data and the cache first
                timings["setup"] = time.perf_counter() - t0
            for name in selected:
                t0 = time.perf_counter()
                logger.info("benchmark %s ...", name)
                try:
                    if name == "gpu":
                        rows += bench_gpu(ctx, batch_pairs=args.gpu_batch_pairs)
                    else:
                        rows += RUNNERS[name](ctx)
                except Exception as exc:  # one broken benchmark must not lose the others' rows
                    logger.exception("benchmark %s failed", name)
                    status = f"failed: {type(exc).__name__}: {exc}"
                    rows.append(Row(name, "—", "—", None, None, "", status=status))
                timings[name] = time.perf_counter() - t0
        finally:
            if owns_ray:
                import ray

                ray.shutdown()
    total = time.perf_counter() - t_start
    header = {
        "command": f"`{command}`",
        **machine_info(),
        "torch threads per training process": str(ctx.threads),
        "elapsed": f"{total / 60:.1f} min (" + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ")",
    }
    model = describe_model(size, flops) if flops else "(not built: GPU benchmark only)"
    text = render(rows, header, model, _notes(size))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    logger.info("wrote %s", args.out)
    return 1 if any(r.status.startswith("failed") for r in rows) else 0


if __name__ == "__main__":
    # run as ``benchmarks.run`` (not ``__main__``) so that Ray and the fork server pickle the case
    # functions by reference to an importable module
    from benchmarks.run import main as _main

    raise SystemExit(_main())
