"""The GPU check: ``benchmarks/gpu_check.sh [--dry-run] [--workdir DIR] [--out FILE]``.

SD3-medium on one GPU through prefopt's own commands, with random weights built from the shipped configs
(``configs/models/sd3-medium``, no download):

1. **Pipeline**: every component of ``model_index.json`` built with ``from_config`` from its shipped
   config (seeded random weights, in ``model.dtype``, on the GPU) and written with ``save_pretrained``.
   The tokenizers are the offline CLIP BPE tokenizer of :mod:`prefopt_core.models.tokenizer`, for T5 too
   (as :mod:`prefopt_core.models.tiny` does: a SentencePiece model cannot be built offline; every id it
   produces is inside both vocabularies).
2. ``prefopt plan`` (``--json``): parameters, FLOPs per pair and the per-worker memory estimate.
3. ``prefopt cache``: the latent cache of a synthetic Pick-a-Pic-schema source at 1024 px (SD3 VAE,
   CLIP-L/G, T5-XXL): rows/s in the steady state, from the shard write times.
4. ``prefopt train``, 1 worker, bf16, gradient checkpointing, ZeRO-2: pairs/s over the steps between two
   metric flushes after a warm-up window (the flush copies the metrics to the host, so the GPU has
   finished every step before it: the MLflow timestamps of two flushes bound exactly those steps), MFU
   against the bf16 ``torch.mm`` peak measured afterwards on the same GPU, and the worker's CUDA peak
   memory through the training steps against ``prefopt plan``'s estimate. The run's end checkpoint is
   not written (28 GB of AdamW state for SD3-medium: disk I/O, not the training step).

``--dry-run`` takes the same path end to end with tiny sizes (:data:`DRY_RUN_SIZES`) on the CPU in fp32.
The result is a markdown block (printed, and appended to ``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    Row,
    fmt,
    machine_info,
    markdown_table,
    matmul_peak_flops,
    memory_report,
    workers_run,
)

logger = logging.getLogger("benchmarks.gpu_check")

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "configs" / "models" / "sd3-medium"
DEFAULT_WORKDIR = ROOT / "benchmarks" / "_work" / "gpu_check"
DEFAULT_OUT = ROOT / "benchmarks" / "results.md"
GIB = 1024**3
_WORKER_REPORTS = "worker_memory"

#: Tiny sizes of the dry run, merged over each shipped component config. Kept consistent the way the real
#: configs are: the transformer's ``joint_attention_dim`` is T5's ``d_model`` (64; the 32 + 32 CLIP hidden
#: states are zero-padded to it) and its ``pooled_projection_dim`` the two CLIP projections (32 + 32).
DRY_RUN_SIZES: dict[str, dict[str, Any]] = {
    "transformer": {
        "num_layers": 1,
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "caption_projection_dim": 32,
        "joint_attention_dim": 64,
        "pooled_projection_dim": 64,
    },
    "vae": {"block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 4},
    "text_encoder": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_hidden_layers": 1,
        "projection_dim": 32,
    },
    "text_encoder_3": {"d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 1, "num_heads": 4},
}
DRY_RUN_SIZES["text_encoder_2"] = DRY_RUN_SIZES["text_encoder"]


@dataclasses.dataclass(frozen=True)
class CheckSize:
    """Workload of a check: image side, text length, data, training steps and dtypes."""

    name: str
    resolution: int
    max_sequence_length: int  # T5 tokens after the 77 CLIP tokens
    num_pairs: int
    rows_per_shard: int
    cache_batch: int
    batch_size: int  # pairs per training step
    log_every: int  # steps between metric flushes; the first window is the warm-up
    measured_steps: int  # a multiple of log_every
    precision: str  # train.precision and model.dtype ("bf16" | "fp32")
    cpus_per_worker: int
    dry_run: bool

    @property
    def max_steps(self) -> int:
        """Warm-up window + measured windows + one last step, whose flush also runs the end-of-run eval."""
        return self.log_every + self.measured_steps + 1


GPU_SIZE = CheckSize("gpu", 1024, 256, 64, 16, 8, 2, 5, 10, "bf16", 4, False)
DRY_RUN_SIZE = CheckSize("dry-run", 64, 16, 8, 4, 4, 1, 2, 2, "fp32", 1, True)


# ---------------------------------------------------------------------------- the random-weight pipeline
def component_configs(model_dir: Path, dry_run: bool) -> dict[str, dict[str, Any]]:
    """``{component: config}`` of every model component of ``model_index.json`` (tiny sizes merged over
    them in a dry run)."""
    index = json.loads((model_dir / "model_index.json").read_text())
    out = {}
    for name, entry in index.items():
        config_file = model_dir / name / "config.json"
        if name.startswith("_") or entry[0] is None or not config_file.exists():
            continue
        config = json.loads(config_file.read_text())
        out[name] = {**config, **DRY_RUN_SIZES.get(name, {})} if dry_run else config
    return out


def _build_component(library: str, cls_name: str, config: dict[str, Any], dtype):
    """One model from its config with random weights (on the current default device)."""
    import diffusers
    import transformers

    if library == "diffusers":
        cls = getattr(diffusers, cls_name)
        return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")}).to(dtype)
    cls = getattr(transformers, cls_name)
    config_cls = cls.config_class
    return cls._from_config(config_cls.from_dict(config), dtype=dtype)


def build_random_pipeline(
    model_dir: Path, out: Path, *, dry_run: bool, dtype_name: str, seed: int = 0
) -> Path:
    """The pipeline of ``model_dir`` with seeded random weights, ``save_pretrained`` to ``out`` (reused when
    ``out/model_index.json`` exists). Built on the GPU when there is one. Returns ``out``."""
    import diffusers
    import torch
    from transformers import CLIPTokenizer

    from prefopt_core.models.base import TORCH_DTYPES
    from prefopt_core.models.tokenizer import write_clip_tokenizer

    if (out / "model_index.json").exists():
        return out
    index = json.loads((model_dir / "model_index.json").read_text())
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    clip_dir = write_clip_tokenizer(tmp / "_tokenizers" / "clip")
    t5_dir = write_clip_tokenizer(tmp / "_tokenizers" / "t5", model_max_length=512)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    parts: dict[str, Any] = {}
    for i, (name, config) in enumerate(component_configs(model_dir, dry_run).items()):
        library, cls_name = index[name]
        torch.manual_seed(seed + i)
        with torch.device(device):
            parts[name] = _build_component(library, cls_name, config, TORCH_DTYPES[dtype_name]).eval()
    for name, entry in index.items():
        if name.startswith("tokenizer"):
            parts[name] = CLIPTokenizer.from_pretrained(t5_dir if name == "tokenizer_3" else clip_dir)
        elif name == "scheduler":
            parts[name] = getattr(diffusers, entry[1]).from_pretrained(model_dir, subfolder="scheduler")
    pipe = getattr(diffusers, index["_class_name"])(**parts)
    pipe.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(tmp / "_tokenizers")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    del pipe, parts
    gc.collect()
    if torch.cuda.is_available():  # hand the GPU back to the cache actor and the training worker
        torch.cuda.empty_cache()
    logger.info("random-weight %s pipeline written to %s", model_dir.name, out)
    return out


# ---------------------------------------------------------------------------- the run config
def check_config(size: CheckSize, workdir: Path, pipeline: Path) -> dict[str, Any]:
    """The one config of ``prefopt plan``, ``cache`` and ``train`` in the check (DPO, frozen reference)."""
    return {
        "run": {"name": "gpu-check", "workdir": str(workdir / "run"), "seed": 0},
        "model": {
            "family": "sd3",
            "pretrained": str(pipeline),
            "resolution": size.resolution,
            "dtype": size.precision,
            "max_sequence_length": size.max_sequence_length,
        },
        "data": {
            "synthetic": {"num_pairs": size.num_pairs, "image_size": size.resolution, "tie_fraction": 0.0}
        },
        "cache": {"batch_size": size.cache_batch, "rows_per_shard": size.rows_per_shard, "num_actors": 1},
        "loss": {"name": "dpo"},
        "reference": {"strategy": "frozen", "probe_size": min(8, size.num_pairs)},
        "train": {
            "max_steps": size.max_steps,
            "batch_size": size.batch_size,
            "gradient_checkpointing": True,
            "num_workers": 1,
            "cpus_per_worker": size.cpus_per_worker,
            "use_gpu": not size.dry_run,
            "zero_stage": 2,
            "precision": size.precision,
            "log_every": size.log_every,
            "eval_every": 1_000_000,
            "export": False,
            "sample_prompts": 0,
            "resume": "never",
        },
        "tracking": {"uri": f"sqlite:///{workdir / 'mlflow.db'}", "experiment": "gpu-check"},
    }


def prefopt(*argv: str) -> None:
    """``prefopt ARGV`` in this process (the CLI's own entry point); raises if it does not exit 0."""
    from ray_jobs.cli import main

    code = main(["--quiet", *argv])
    if code != 0:
        raise RuntimeError(f"`prefopt {' '.join(argv)}` exited {code}")


# ---------------------------------------------------------------------------- the training worker
def checked_train_loop(loop_config: dict[str, Any]) -> None:
    """``ray_jobs.training.recipe.train_loop_per_worker`` with two changes: the worker's peak memory
    (CUDA allocated, or RSS on CPU) through setup and through the training steps goes to
    ``<run.workdir>/worker_memory/rank<R>.json``, and the end checkpoint is not written (metrics are
    still flushed)."""
    from unittest import mock

    import ray.train
    import torch

    from benchmarks.common import memory_baseline, reset_peak_rss
    from ray_jobs.training import recipe

    device = "cuda" if torch.cuda.is_available() else "cpu"
    baseline = memory_baseline(device)
    report: dict[str, Any] = {}

    class CheckedRecipe(recipe.WorkerRecipe):
        def setup(self) -> None:
            super().setup()
            report["setup"] = memory_report(baseline, device)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            else:
                reset_peak_rss()

        def _checkpoint(self, metrics: dict[str, float]) -> None:
            if self.metrics is not None:
                self.metrics.flush()

    with mock.patch.object(recipe, "WorkerRecipe", CheckedRecipe):
        recipe.train_loop_per_worker(loop_config)
    report["steps"] = memory_report(baseline, device)
    report["device"] = device
    rank = ray.train.get_context().get_world_rank()
    out = Path(loop_config["inputs"].config.workdir) / _WORKER_REPORTS / f"rank{rank}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report))


def window_pairs_per_s(timestamps_ms: dict[int, int], start: int, end: int, pairs_per_step: int) -> float:
    """Pairs/s of steps ``start+1 .. end`` from the log timestamps (ms) of the flushes at ``start`` and
    ``end``: ``(end - start) · pairs_per_step / (t_end - t_start)``."""
    seconds = (timestamps_ms[end] - timestamps_ms[start]) / 1000.0
    if seconds <= 0:
        raise RuntimeError(f"steps {start + 1}..{end} took {seconds} s by their log timestamps")
    return (end - start) * pairs_per_step / seconds


def flush_timestamps(summary: dict[str, Any]) -> dict[int, int]:
    """``{step: ms}`` of the run's ``loss`` entries (logged at each flush, one entry per step)."""
    from mlflow.tracking import MlflowClient

    if summary.get("mlflow_run_id") is None:
        raise RuntimeError(f"the run logged no MLflow metrics ({summary.get('mlflow_tracking_uri')})")
    history = MlflowClient(summary["mlflow_tracking_uri"]).get_metric_history(
        summary["mlflow_run_id"], "loss"
    )
    return {m.step: m.timestamp for m in history}


# ---------------------------------------------------------------------------- the check
def plan_estimate(plan: dict[str, Any], zero_stage: int) -> float:
    """Bytes per worker ``prefopt plan`` expects for full fine-tuning, no offload, with gradient
    checkpointing: weights + grads + optimizer + reference + buffers + activations."""
    (row,) = [
        r for r in plan["rows"] if r["stage"] == zero_stage and not r["lora"] and r["offload"] == "none"
    ]
    return sum(row[k] for k in ("weights", "grads", "optimizer", "reference", "buffers", "activations_gc"))


def _plan_gpu_args() -> list[str]:
    """``--gpu-mem`` of this machine's GPU for ``prefopt plan`` (its max-batch column); none on CPU."""
    import torch

    if not torch.cuda.is_available():
        return []
    return ["--gpu-mem", f"{torch.cuda.get_device_properties(0).total_memory / GIB:.1f}"]


def run_check(size: CheckSize, workdir: Path) -> dict[str, Any]:
    """Build, plan, cache, train and measure; returns the numbers :func:`render` turns into rows."""
    import torch
    import yaml

    from benchmarks.run import steady_rows_per_s
    from prefopt_core.config import load_config

    phases: dict[str, float] = {}
    t = time.perf_counter()
    pipeline = build_random_pipeline(
        MODEL_DIR, workdir / f"sd3-medium-random-{size.name}", dry_run=size.dry_run, dtype_name=size.precision
    )
    phases["pipeline"] = time.perf_counter() - t
    shutil.rmtree(workdir / "run", ignore_errors=True)
    config_path = workdir / f"gpu_check_{size.name}.yaml"
    config_path.write_text(yaml.safe_dump(check_config(size, workdir, pipeline), sort_keys=False))
    cfg = load_config(config_path)
    t = time.perf_counter()
    with (workdir / "plan.txt").open("w") as fh, contextlib.redirect_stdout(fh):
        prefopt(
            "plan", str(config_path), "--gpus", "1", "--json", str(workdir / "plan.json"), *_plan_gpu_args()
        )
    plan = json.loads((workdir / "plan.json").read_text())
    phases["plan"] = time.perf_counter() - t
    t = time.perf_counter()
    prefopt("cache", str(config_path))
    phases["cache"] = time.perf_counter() - t
    cache_summary = json.loads((cfg.workdir / "cache_summary.json").read_text())
    steady, rows = steady_rows_per_s(Path(cache_summary["cache_dir"]), parallel=1)
    t = time.perf_counter()
    with workers_run(checked_train_loop):
        prefopt("train", str(config_path))
    phases["train"] = time.perf_counter() - t
    summary = json.loads((cfg.workdir / "train_summary.json").read_text())
    stamps = flush_timestamps(summary)
    last = size.log_every + size.measured_steps
    pairs_per_s = window_pairs_per_s(stamps, size.log_every, last, size.batch_size)
    memory = json.loads((cfg.workdir / _WORKER_REPORTS / "rank0.json").read_text())
    t = time.perf_counter()
    dtype = torch.bfloat16 if size.precision == "bf16" else torch.float32
    if size.dry_run:
        peak = matmul_peak_flops(dtype, "cpu", n=256, repeats=2, min_seconds=0.05)
    else:
        peak = matmul_peak_flops(dtype, "cuda")
    phases["matmul peak"] = time.perf_counter() - t
    return {
        "plan": plan,
        "cfg": cfg,
        "pairs_per_s": pairs_per_s,
        "peak_flops": peak,
        "memory": memory,
        "cache_rows_per_s": steady,
        "cache_rows": rows,
        "cache_end_to_end": cache_summary["rows_per_s"],
        "phases": phases,
        "config_path": config_path,
    }


# ---------------------------------------------------------------------------- the markdown block
def check_rows(size: CheckSize, result: dict[str, Any]) -> list[Row]:
    """Throughput, MFU, peak memory vs the plan, cache build rate."""
    from ray_jobs.memory_plan import DenoiserProfile, step_flops_per_pair

    cfg, plan = result["cfg"], result["plan"]
    prof = DenoiserProfile(**plan["profile"])
    model_flops = step_flops_per_pair(cfg, prof, checkpointing=False, lora=False)  # per pair
    hw_flops = step_flops_per_pair(cfg, prof, checkpointing=True, lora=False)
    achieved = model_flops * result["pairs_per_s"]
    peak = result["peak_flops"]
    mem = result["memory"]
    measured = mem["steps"]["delta_mib"] * 2**20 / GIB
    estimate = plan_estimate(plan, cfg.train.zero_stage) / GIB
    kind = "CUDA max allocated" if mem["device"] == "cuda" else "RSS (libraries included)"
    where = f"{size.resolution} px, {size.precision}"
    s = size
    return [
        Row(
            f"GPU check ({s.name}): `prefopt train` SD3-medium transformer, {where}, gradient checkpointing, "
            "1 worker, ZeRO-2",
            "pairs/s",
            "—",
            result["pairs_per_s"],
            None,
            "pairs/s",
            bold=False,
            notes=f"{prof.params / 1e6:,.1f} M params, random weights; {s.batch_size} pair(s) per step, DPO with "
            f"a frozen reference; steps {s.log_every + 1}-{s.log_every + s.measured_steps} between two metric "
            f"flushes (train.log_every={s.log_every}, the first window is the warm-up)",
        ),
        Row(
            f"GPU check ({s.name}): MFU of the `prefopt train` step",
            "achieved",
            f"{s.precision} matmul peak",
            achieved / 1e12,
            peak / 1e12,
            "TFLOP/s",
            ratio=achieved / peak,
            bold=False,
            notes=f"ratio = MFU; {model_flops / 1e12:.3g} TFLOP per pair (policy fwd+bwd + reference fwd, "
            f"`prefopt plan`'s FlopCounterMode trace); with the recomputed forward {hw_flops / 1e12:.3g} "
            f"TFLOP per pair: HFU {hw_flops * result['pairs_per_s'] / peak:.3f}; peak = best `torch.mm`",
        ),
        Row(
            f"GPU check ({s.name}): peak memory of the training steps vs `prefopt plan`",
            "measured",
            "plan",
            measured,
            estimate,
            "GiB",
            bold=False,
            notes=f"{kind} of the worker, after setup through the steps, minus its start; through setup "
            f"{fmt(mem['setup']['delta_mib'] * 2**20 / GIB)} GiB; plan = weights + grads + optimizer + "
            "reference + ZeRO buffers + activations with gradient checkpointing",
        ),
        Row(
            f"GPU check ({s.name}): latent-cache build, SD3 VAE at {s.resolution} px + CLIP-L/G + T5 "
            f"({s.max_sequence_length} tokens)",
            "rows/s",
            "—",
            result["cache_rows_per_s"],
            None,
            "rows/s",
            bold=False,
            notes=f"`prefopt cache`, 1 encoder actor, batch {s.cache_batch}: steady state from the shard "
            f"write times ({result['cache_rows']} pairs, {s.rows_per_shard} per shard); end to end with "
            f"start-up {fmt(result['cache_end_to_end'])} rows/s",
        ),
    ]


def render(size: CheckSize, result: dict[str, Any], argv: list[str]) -> str:
    """The markdown block: heading, machine, the commands it ran, the table and the phase times."""
    info = machine_info()
    cfg = result["config_path"]
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in result["phases"].items())
    lines = [
        f"## GPU check ({size.name}): {info['gpu']}, {info['date']}",
        "",
        f"`benchmarks/gpu_check.sh {' '.join(argv)}`: random-weight SD3-medium built from "
        "`configs/models/sd3-medium` (tiny sizes in a dry run), then `prefopt plan`, `prefopt cache` and "
        f"`prefopt train` with `{cfg.name}` (in the work dir). torch {info['torch']}, deepspeed "
        f"{info['deepspeed']}, diffusers {info['diffusers']}; {info['cpu']}, {info['cores']}.",
        "",
        markdown_table(check_rows(size, result)),
        "",
        f"Phases (wall): {phases}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_check.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, same path end to end")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help=f"default {DEFAULT_WORKDIR}")
    parser.add_argument(
        "--out", type=Path, help=f"append the block here (default {DEFAULT_OUT}; a dry run: only print it)"
    )
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    size = DRY_RUN_SIZE if ns.dry_run else GPU_SIZE
    if not size.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device here; run it on a GPU machine, or use --dry-run", flush=True)
            return 2
    ns.workdir.mkdir(parents=True, exist_ok=True)
    from ray_jobs.cluster import shutdown_ray

    try:
        result = run_check(size, ns.workdir.resolve())
    finally:
        shutdown_ray()
    block = render(size, result, argv if argv is not None else [])
    print(block, flush=True)
    out = ns.out or (None if size.dry_run else DEFAULT_OUT)
    if out is not None:
        with out.open("a") as fh:
            fh.write("\n" + block)
    return 0


if __name__ == "__main__":  # run as `benchmarks.gpu_check`, so Ray workers import the loop by that name
    from benchmarks.gpu_check import main as _main

    raise SystemExit(_main())
