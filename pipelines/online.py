"""Online preference pairs: sample K images per prompt from a policy, score them, keep best vs worst.

One *round* turns a policy (an exported denoiser directory, or the base model's own denoiser for round 0)
into a latent cache that ``prefopt train`` reads like any other::

    chunk specs (rows_per_shard prompts each) ──map_batches(OnlineSampler, actor pool)──▶ stats rows
    OnlineSampler (base pipeline with the policy's denoiser, loaded once per actor), per chunk:
      for each mini-batch of batch_size prompts:
        pipe(K copies of each prompt, K seeded generators, output_type="latent")  -> z (b*K, C, h, w)
        decode once: vae.decode(z / scale + shift) -> PIL -> scorer.score                -> (b*K,)
        per prompt: best vs worst (pair_best_worst)
      kept pairs  -> shards/fNNNNNN-rRRRRRRRRR.parquet   (latent-cache rows, written atomically)
      the others  -> skipped/fNNNNNN-rRRRRRRRRR.parquet  (scores + seeds + reason; nothing is lost)
    driver: plan.json (fingerprint) first; manifest.json last, only for a complete cache.

**Latents.** With ``output_type="latent"`` diffusers' SD3 pipeline returns the final latents *before* its
decode step ``vae.decode(z / scaling_factor + shift_factor)`` (SDXL/SD1.5: ``z / scaling_factor``, no
shift). Writing ``raw = z / scale + shift`` gives ``z = (raw - shift) * scale``: exactly the space
``adapter.encode_images`` produces from the VAE posterior mean, ``(mean - shift) * scale``. So the cached
``latents_w`` / ``latents_l`` *are* the sampled latents; there is no decode -> re-encode round trip (which,
through a lossy VAE, would train on latents the policy never produced). Images are decoded once, for the
scorer only, with the pipeline's own post-processing (``decode_latents``), so scores are those of the
images ``output_type="pil"`` would have returned. VAEs with ``latents_mean``/``latents_std`` (not handled
by the adapters' ``encode_images`` either) are refused.

**Seeds.** Sample ``k`` of prompt ``i`` in round ``r`` of a run seeded ``s`` starts from the noise of a CPU
generator seeded ``sample_seed(s, r, i, k) = s * 10**12 + r * 10**9 + i * 10**3 + k`` (distinct for
``k < 1000``, ``i < 10**6``, ``r < 1000``); CPU generators make a seed's noise the same on any device, and
the seeds of the chosen/rejected sample are stored with each row, so any sample can be regenerated.

**Pairing** (:func:`pair_best_worst`): per prompt, among samples with finite latents and a finite score,
``best`` = the highest score, ``worst`` = the lowest (the lowest sample index wins ties); the pair is kept
iff ``score_best - score_worst > min_margin`` (*strictly*: with the default ``min_margin = 0`` a prompt
whose samples all score the same gives no pair, since equal scores say nothing about preference). Chosen =
best (``label_w = 1``, ``label_l = 0``).

**Rows.** A kept pair is a latent-cache row in the format of :mod:`pipelines.latent_cache` (``pair_id =
"online-r{round}:{prompt_index}"``, ``pair_key``, caption, ..., ``latents_w/_l``, the prompt conditioning of
``adapter.encode_prompts``, ``original_size = (R, R)``, ``crop_top_left = (0, 0)``, per-side
``adapter.side_conditioning``; shapes in the parquet metadata ``prefopt.shapes``) plus provenance columns
``round, score_w, score_l, seed_w, seed_l, scores, seeds`` (training reads only the manifest's tensor
columns). The manifest has the keys and the encoder fingerprint ``build_cache`` writes for the same
model and resolution, so ``check_cache_matches`` accepts it, plus ``num_skipped``, ``skipped`` (counts per
reason), ``skipped_files`` and an ``online`` section (round, policy, score statistics).

**Resume.** A chunk is complete when every one of its prompts is in a shard or in a skipped file; a rerun
deletes the files of incomplete chunks and samples only those (a killed run ends, after a rerun, with
the rows of an uninterrupted one). A directory is never mixed across plans (``plan.json`` fingerprint).

Memory: each actor holds the generation pipeline plus the adapter's encoder pipeline (VAE + text
encoders, used for the cached conditioning), i.e. the text encoders twice.

This module never calls ``ray.init``: the caller (``ray_jobs``) owns the cluster connection.

    settings = OnlineSettings(family="sd3", base_model_dir="/m/sd3", policy="/w/r0/export/transformer",
                              round=1, resolution=512, samples_per_prompt=4, min_margin=0.1, ...)
    manifest = generate_online_cache(prompts, cache_dir="/w/online/round_001/cache", settings=settings)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipelines.latent_cache import (
    CACHE_FORMAT,
    MANIFEST,
    PLAN,
    SHAPES_KEY,
    CacheMismatchError,
    atomic_write_json,
    atomic_write_table,
    model_fingerprint,
    pair_key,
    write_manifest,
)
from pipelines.plan import fingerprint_diff
from pipelines.tensor_columns import to_column

logger = logging.getLogger(__name__)

#: Sample seeds ``run_seed * 10**12 + round * 10**9 + prompt_index * 10**3 + k`` are distinct within these ranges.
MAX_SAMPLES = 10**3
MAX_PROMPTS = 10**6
MAX_ROUNDS = 10**3
#: Largest run seed whose sample seeds still fit an int64 column.
MAX_RUN_SEED = (2**63 - MAX_ROUNDS * MAX_PROMPTS * MAX_SAMPLES) // (MAX_ROUNDS * MAX_PROMPTS * MAX_SAMPLES)

SkipReason = Literal["margin_below_threshold", "nonfinite_samples", "nonfinite_conditioning"]
SKIP_REASONS: tuple[str, ...] = get_args(SkipReason)
#: Folder of the prompts that gave no pair (one file per chunk, like the shards).
SKIPPED_DIR = "skipped"
SHARDS_DIR = "shards"


# ---------------------------------------------------------------------------------------------- settings
def sample_seed(run_seed: int, round_index: int, prompt_index: int, k: int) -> int:
    """Seed of sample ``k`` of prompt ``prompt_index`` in round ``round_index`` of a run seeded ``run_seed``:
    ``((run_seed * MAX_ROUNDS + round) * MAX_PROMPTS + prompt_index) * MAX_SAMPLES + k``, e.g.
    ``sample_seed(0, 0, 1, 1) = 1001`` and ``sample_seed(2, 1, 0, 3) = 2_001_000_000_003``."""
    for name, value, bound in (
        ("sample index", k, MAX_SAMPLES),
        ("prompt_index", prompt_index, MAX_PROMPTS),
        ("round", round_index, MAX_ROUNDS),
        ("run seed", run_seed, MAX_RUN_SEED + 1),
    ):
        if not 0 <= value < bound:
            raise ValueError(f"{name} must be in [0, {bound}), got {value}")
    return ((run_seed * MAX_ROUNDS + round_index) * MAX_PROMPTS + prompt_index) * MAX_SAMPLES + k


@dataclass(frozen=True)
class OnlineSettings:
    """Everything the rows of an online round depend on (plus ``batch_size``, which does not change them
    beyond the float noise of batched matmuls, and ``rows_per_shard``, the resume unit).

    ``policy``: an exported denoiser directory (``save_pretrained``: ``config.json`` + weights) combined with
    the base pipeline's VAE, text encoders and scheduler; ``None`` samples from the base model itself.
    ``scorer``: a ``pipelines.rewards.build_scorer`` spec, higher = better.
    """

    family: str
    base_model_dir: str
    policy: str | None
    round: int
    resolution: int
    samples_per_prompt: int
    min_margin: float
    num_inference_steps: int
    guidance_scale: float
    seed: int
    scorer: dict[str, Any] = field(default_factory=lambda: {"name": "outline_style"})
    dtype: str = "fp32"
    max_sequence_length: int = 256
    prediction_type: str | None = None
    micro_conditioning: str = "per_image"
    batch_size: int = 4
    rows_per_shard: int = 32

    def __post_init__(self) -> None:
        if not 2 <= self.samples_per_prompt <= MAX_SAMPLES:
            raise ValueError(
                f"samples_per_prompt must be in [2, {MAX_SAMPLES}] (best vs worst needs two samples), "
                f"got {self.samples_per_prompt}"
            )
        if not (math.isfinite(self.min_margin) and self.min_margin >= 0):
            raise ValueError(f"min_margin must be a finite number >= 0, got {self.min_margin}")
        for name in ("resolution", "num_inference_steps", "batch_size", "rows_per_shard"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        sample_seed(self.seed, self.round, 0, 0)  # range checks of seed and round
        if not isinstance(self.scorer, dict) or "name" not in self.scorer:
            raise ValueError(f"scorer must be a build_scorer spec dict with a 'name', got {self.scorer!r}")
        if self.policy is not None and not (Path(self.policy) / "config.json").is_file():
            raise FileNotFoundError(
                f"policy {self.policy} is not an exported denoiser directory (config.json + weights), e.g. "
                "<workdir>/export/transformer; pass policy=None to sample from the base model"
            )

    @property
    def source(self) -> str:
        """The ``source`` column of the rows: which policy produced them, in which round."""
        return f"online:r{self.round}:{self.policy or 'base'}"


# ---------------------------------------------------------------------------------------------- pairing
@dataclass(frozen=True)
class PairChoice:
    """The decision for one prompt. ``best``/``worst`` are sample indices (-1 when undefined)."""

    best: int
    worst: int
    margin: float  # score[best] - score[worst]; NaN when fewer than two usable samples
    kept: bool
    reason: str  # "kept" or a SkipReason


def pair_best_worst(scores: np.ndarray, min_margin: float) -> list[PairChoice]:
    """``(P, K)`` scores -> one :class:`PairChoice` per prompt.

    A non-finite score marks an unusable sample (the caller sets NaN for samples with non-finite latents).
    Among the usable samples, ``best`` is the first index of the maximum, ``worst`` the first index of the
    minimum; kept iff ``margin = score[best] - score[worst] > min_margin`` (strict). Fewer than two usable
    samples: ``nonfinite_samples``; otherwise not kept: ``margin_below_threshold``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be (P, K) with K >= 2, got shape {scores.shape}")
    out = []
    for row in scores:
        usable = np.isfinite(row)
        if usable.sum() < 2:
            out.append(PairChoice(-1, -1, math.nan, False, "nonfinite_samples"))
            continue
        best = int(np.argmax(np.where(usable, row, -np.inf)))
        worst = int(np.argmin(np.where(usable, row, np.inf)))
        margin = float(row[best] - row[worst])
        kept = margin > min_margin
        out.append(PairChoice(best, worst, margin, kept, "kept" if kept else "margin_below_threshold"))
    return out


# ---------------------------------------------------------------------------------------------- sampling
def _call_kwargs(family: str, max_sequence_length: int) -> dict[str, Any]:
    return {"max_sequence_length": max_sequence_length} if family == "sd3" else {}


@torch.no_grad()
def sample_latents(
    pipe,
    prompts: list[str],
    seeds: list[int],
    *,
    resolution: int,
    num_inference_steps: int,
    guidance_scale: float,
    call_kwargs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """``N`` prompts with ``N`` seeds -> ``(N, C, h, w)`` float32 CPU clean latents in the denoiser's space.

    One pipeline call with one CPU generator per image, so image ``n`` starts from
    ``randn(1, C, h, w, generator=Generator().manual_seed(seeds[n]))`` whatever the batch.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]  # one object per image
    out = pipe(
        prompt=list(prompts),
        height=resolution,
        width=resolution,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=generators,
        output_type="latent",
        **dict(call_kwargs or {}),
    )
    return out.images.float().cpu()  # (N, C, h, w)


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> list:
    """``(N, C, h, w)`` denoiser-space latents -> N PIL images, as the pipeline's ``output_type="pil"`` would.

    ``vae.decode(z / scaling_factor + shift_factor)`` (the inverse of ``encode_images``' ``(mean - shift) *
    scale``), then the pipeline's image processor.
    """
    vae = pipe.vae
    if getattr(vae.config, "latents_mean", None) is not None or getattr(vae.config, "latents_std", None):
        raise ValueError(
            "this VAE normalises latents with latents_mean/latents_std, which the model adapters' "
            "encode_images does not; online latents would not be in the cache's latent space"
        )
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    raw = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + shift
    images = vae.decode(raw, return_dict=False)[0]
    return pipe.image_processor.postprocess(images, output_type="pil")


# ---------------------------------------------------------------------------------------------- rows
@dataclass
class ChunkResult:
    """What one chunk produced: the decisions and per-sample data of its prompts, in prompt order."""

    prompt_indices: list[int]
    captions: list[str]
    seeds: np.ndarray  # (P, K) int64
    scores: np.ndarray  # (P, K) float64, NaN for unusable samples
    choices: list[PairChoice]
    latents_w: list[torch.Tensor]  # one (C, h, w) per kept prompt, in prompt order
    latents_l: list[torch.Tensor]


def kept_table(
    result: ChunkResult,
    settings: OnlineSettings,
    cond: dict[str, torch.Tensor],
    side: dict[str, torch.Tensor],
) -> pa.Table:
    """Latent-cache rows of the kept pairs (``cond``: per-caption conditioning ``(B, ...)``; ``side``:
    per-side conditioning ``{"<name>_w"|"<name>_l": (B, ...)}``), with ``prefopt.shapes`` metadata."""
    kept = [i for i, c in enumerate(result.choices) if c.kept]
    n, res = len(kept), settings.resolution
    pair_ids = [f"online-r{settings.round}:{result.prompt_indices[i]}" for i in kept]
    lat_w, lat_l = torch.stack(result.latents_w), torch.stack(result.latents_l)  # (B, C, h, w)
    best = [result.choices[i].best for i in kept]
    worst = [result.choices[i].worst for i in kept]
    full = np.full((n, 2), res, np.int64)  # original size (h, w): the sample is the whole image
    zeros = np.zeros((n, 2), np.int64)  # crop top-left: no crop
    columns: dict[str, Any] = {
        "pair_id": pa.array(pair_ids, pa.string()),
        "pair_key": pa.array([pair_key(p) for p in pair_ids], pa.int64()),
        "caption": pa.array([result.captions[i] for i in kept], pa.string()),
        "source": pa.array([settings.source] * n, pa.string()),
        "row_index": pa.array([result.prompt_indices[i] for i in kept], pa.int64()),
        "label_w": pa.array([1.0] * n, pa.float64()),
        "label_l": pa.array([0.0] * n, pa.float64()),
        "is_tie": pa.array([False] * n, pa.bool_()),
        "swapped": pa.array([False] * n, pa.bool_()),
        "original_size_w": to_column(full),
        "original_size_l": to_column(full),
        "crop_top_left": to_column(zeros),
        "crop_top_left_l": to_column(zeros),
        "flipped": pa.array([False] * n, pa.bool_()),
        "latents_w": to_column(lat_w),
        "latents_l": to_column(lat_l),
        **{name: to_column(value) for name, value in cond.items()},
        **{name: to_column(value) for name, value in side.items()},
        "round": pa.array([settings.round] * n, pa.int64()),
        "score_w": pa.array([result.scores[i, b] for i, b in zip(kept, best)], pa.float64()),
        "score_l": pa.array([result.scores[i, w] for i, w in zip(kept, worst)], pa.float64()),
        "seed_w": pa.array([int(result.seeds[i, b]) for i, b in zip(kept, best)], pa.int64()),
        "seed_l": pa.array([int(result.seeds[i, w]) for i, w in zip(kept, worst)], pa.int64()),
        "scores": pa.array([result.scores[i].tolist() for i in kept], pa.list_(pa.float64())),
        "seeds": pa.array([result.seeds[i].tolist() for i in kept], pa.list_(pa.int64())),
    }
    shapes = {name: list(_row_shape(v)) for name, v in [("latents_w", lat_w), ("latents_l", lat_l)]}
    shapes.update({name: list(_row_shape(v)) for name, v in [*cond.items(), *side.items()]})
    shapes.update(original_size_w=[2], original_size_l=[2], crop_top_left=[2], crop_top_left_l=[2])
    table = pa.table(columns)
    return table.replace_schema_metadata({SHAPES_KEY: json.dumps(shapes, sort_keys=True)})


def _row_shape(value: torch.Tensor) -> tuple[int, ...]:
    return tuple(value.shape[1:]) if value.ndim > 1 else (1,)


SKIPPED_SCHEMA = pa.schema(
    [
        pa.field("pair_id", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("source", pa.string()),
        pa.field("row_index", pa.int64()),  # prompt index
        pa.field("round", pa.int64()),
        pa.field("reason", pa.string()),  # one of SKIP_REASONS
        pa.field("margin", pa.float64()),  # score_best - score_worst (NaN if undefined)
        pa.field("score_best", pa.float64()),
        pa.field("score_worst", pa.float64()),
        pa.field("seed_best", pa.int64()),  # -1 if undefined
        pa.field("seed_worst", pa.int64()),
        pa.field("scores", pa.list_(pa.float64())),  # (K,) per sample, NaN = unusable
        pa.field("seeds", pa.list_(pa.int64())),  # (K,) regenerate any sample from these
    ]
)


def skipped_table(result: ChunkResult, settings: OnlineSettings) -> pa.Table:
    """One row (``SKIPPED_SCHEMA``) per prompt that gave no pair."""
    rows = []
    for i, c in enumerate(result.choices):
        if c.kept:
            continue
        defined = c.best >= 0
        rows.append(
            {
                "pair_id": f"online-r{settings.round}:{result.prompt_indices[i]}",
                "caption": result.captions[i],
                "source": settings.source,
                "row_index": result.prompt_indices[i],
                "round": settings.round,
                "reason": c.reason,
                "margin": c.margin,
                "score_best": float(result.scores[i, c.best]) if defined else math.nan,
                "score_worst": float(result.scores[i, c.worst]) if defined else math.nan,
                "seed_best": int(result.seeds[i, c.best]) if defined else -1,
                "seed_worst": int(result.seeds[i, c.worst]) if defined else -1,
                "scores": result.scores[i].tolist(),
                "seeds": result.seeds[i].tolist(),
            }
        )
    return pa.Table.from_pylist(rows, schema=SKIPPED_SCHEMA)


def chunk_file(kind: str, chunk: int, first_row: int) -> str:
    """``shards/f000002-r000000064.parquet``: the naming of :mod:`pipelines.latent_cache`."""
    return f"{kind}/f{chunk:06d}-r{first_row:09d}.parquet"


# ---------------------------------------------------------------------------------------------- actor
class OnlineSampler:
    """Ray Data actor: the policy pipeline, the adapter's encoders and the scorer loaded once; each input
    row is one chunk spec (``chunk``, ``start``, ``prompts`` JSON), written to disk before the next.
    Output: one stats row per chunk (``chunk``, ``kept``, ``skipped``)."""

    def __init__(self, settings: dict[str, Any], cache_dir: str) -> None:
        from pipelines.rewards import build_scorer
        from prefopt_core.models.base import TORCH_DTYPES
        from prefopt_core.models.registry import adapter_for

        self.settings = OnlineSettings(**settings)
        self.cache_dir = Path(cache_dir)
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        s = self.settings
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.adapter = adapter_for(s, s.base_model_dir, device=device)  # the settings are model-like
        dtype = TORCH_DTYPES[s.dtype]
        denoiser = self.adapter.load_denoiser(s.policy, dtype=dtype) if s.policy else None
        self.pipe = self.adapter.pipeline(denoiser, dtype=dtype).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.scorer = build_scorer(dict(s.scorer))
        logger.info("online sampler: round %d, policy %s, scorer %s", s.round, s.policy or "base", s.scorer)

    def __call__(self, batch: pa.Table) -> pa.Table:
        stats = []
        for spec in batch.to_pylist():
            chunk, start = int(spec["chunk"]), int(spec["start"])
            prompts = json.loads(spec["prompts"])
            kept, skipped = self.write_chunk(chunk, start, prompts)
            stats.append({"chunk": chunk, "kept": kept, "skipped": skipped})
        return pa.Table.from_pylist(stats)

    def sample_chunk(self, start: int, prompts: list[str]) -> ChunkResult:
        """Sample, decode, score and pair the prompts ``start, start + 1, ...`` in mini-batches."""
        s = self.settings
        k = s.samples_per_prompt
        indices = list(range(start, start + len(prompts)))
        seeds = np.array([[sample_seed(s.seed, s.round, i, j) for j in range(k)] for i in indices], np.int64)
        scores = np.full((len(prompts), k), np.nan)
        result = ChunkResult(indices, list(prompts), seeds, scores, [], [], [])
        for lo in range(0, len(prompts), s.batch_size):
            hi = min(lo + s.batch_size, len(prompts))
            flat_prompts = [p for p in prompts[lo:hi] for _ in range(k)]  # (b*K,) prompt-major
            latents = sample_latents(
                self.pipe,
                flat_prompts,
                seeds[lo:hi].reshape(-1).tolist(),
                resolution=s.resolution,
                num_inference_steps=s.num_inference_steps,
                guidance_scale=s.guidance_scale,
                call_kwargs=_call_kwargs(s.family, s.max_sequence_length),
            )  # (b*K, C, h, w)
            finite = torch.isfinite(latents).flatten(1).all(1)  # (b*K,)
            flat_scores = self.scorer.score(decode_latents(self.pipe, latents), flat_prompts)
            flat_scores = np.where(finite.numpy(), np.asarray(flat_scores, np.float64), np.nan)
            scores[lo:hi] = flat_scores.reshape(hi - lo, k)  # (b, K)
            grid = latents.view(hi - lo, k, *latents.shape[1:])  # (b, K, C, h, w)
            for i, choice in enumerate(pair_best_worst(scores[lo:hi], s.min_margin)):
                result.choices.append(choice)
                if choice.kept:
                    result.latents_w.append(grid[i, choice.best].clone())
                    result.latents_l.append(grid[i, choice.worst].clone())
        return result

    def write_chunk(self, chunk: int, start: int, prompts: list[str]) -> tuple[int, int]:
        """Sample one chunk and write its shard and/or skipped file atomically; -> (kept, skipped)."""
        result = self.sample_chunk(start, prompts)
        kept = [i for i, c in enumerate(result.choices) if c.kept]
        if kept:
            cond = self.adapter.encode_prompts([result.captions[i] for i in kept])  # {name: (B, ...)}
            finite = torch.ones(len(kept), dtype=torch.bool)  # (B,)
            for value in cond.values():
                finite &= torch.isfinite(value).flatten(1).all(1)
            if not bool(finite.all()):
                unkeep(
                    result, [i for i, ok in zip(kept, finite.tolist()) if not ok], "nonfinite_conditioning"
                )
                cond = {name: value[finite] for name, value in cond.items()}
            n, res = int(finite.sum()), self.settings.resolution
            if n:
                full = torch.full((n, 2), res, dtype=torch.int64)  # original size: the whole image
                zeros = torch.zeros((n, 2), dtype=torch.int64)  # crop top-left: no crop
                side = self.adapter.side_conditioning(full, zeros, res)  # the same for both sides
                side = {f"{name}_{s}": value for name, value in side.items() for s in ("w", "l")}
                table = kept_table(result, self.settings, cond, side)
                atomic_write_table(table, self.cache_dir / chunk_file(SHARDS_DIR, chunk, start))
        skipped = skipped_table(result, self.settings)
        if skipped.num_rows:
            atomic_write_table(skipped, self.cache_dir / chunk_file(SKIPPED_DIR, chunk, start))
        return len(prompts) - skipped.num_rows, skipped.num_rows


def unkeep(result: ChunkResult, prompts: list[int], reason: str) -> None:
    """Turn the kept pairs of the chunk positions ``prompts`` into skipped ones with ``reason`` (in place)."""
    drop = set(prompts)
    kept = [i for i, c in enumerate(result.choices) if c.kept]
    result.latents_w = [t for i, t in zip(kept, result.latents_w) if i not in drop]
    result.latents_l = [t for i, t in zip(kept, result.latents_l) if i not in drop]
    for i in drop:
        c = result.choices[i]
        result.choices[i] = PairChoice(c.best, c.worst, c.margin, False, reason)


# ---------------------------------------------------------------------------------------------- driver
def plan_fingerprint(settings: OnlineSettings, adapter, prompts: list[str]) -> dict[str, Any]:
    """The fingerprint of an online cache, with the keys of ``latent_cache.plan_fingerprint``.

    ``encoders`` is ``latent_cache.model_fingerprint(adapter)``, what ``build_cache`` stores and
    ``check_cache_matches`` compares; ``settings`` holds the sampling settings with the policy's *content*
    hash instead of its path.
    """
    from prefopt_core.models.base import dir_fingerprint

    s = asdict(settings)
    for key in ("batch_size", "base_model_dir", "policy"):  # paths and batching do not define the rows
        s.pop(key)
    if settings.policy is None:
        sub = adapter.denoiser_subfolder
        s["policy_weights"] = dir_fingerprint(Path(settings.base_model_dir), [sub])[sub]
    else:
        policy = Path(settings.policy)
        s["policy_weights"] = dir_fingerprint(policy.parent, [policy.name])[policy.name]
    prompts_sha = hashlib.sha1(json.dumps(prompts).encode()).hexdigest()[:16]
    return {
        "format": CACHE_FORMAT,
        "settings": s,
        "encoders": model_fingerprint(adapter),
        "resolution": settings.resolution,
        "fragments": prompts_sha,
        "num_fragments": math.ceil(len(prompts) / settings.rows_per_shard),
    }


def _chunks(prompts: list[str], rows_per_shard: int) -> list[tuple[int, list[str]]]:
    return [(i, prompts[i : i + rows_per_shard]) for i in range(0, len(prompts), rows_per_shard)]


def _rows_by_chunk(cache_dir: Path) -> dict[int, set[int]]:
    """Prompt indices present (kept or skipped) per chunk index, from the files on disk."""
    present: dict[int, set[int]] = {}
    for kind in (SHARDS_DIR, SKIPPED_DIR):
        for f in sorted((cache_dir / kind).glob("f*.parquet")):
            rows = pq.read_table(f, columns=["row_index"])["row_index"].to_pylist()
            present.setdefault(int(f.name[1:7]), set()).update(rows)
    return present


def pending_chunks(cache_dir: Path, chunks: list[tuple[int, list[str]]]) -> list[int]:
    """Chunks not complete on disk; the files of incomplete chunks (and stray ones) are deleted."""
    for tmp in cache_dir.rglob(".*.tmp"):  # left by a killed writer
        tmp.unlink()
    present = _rows_by_chunk(cache_dir)
    pending = []
    for c, (start, prompts) in enumerate(chunks):
        if present.get(c) != set(range(start, start + len(prompts))):
            pending.append(c)
    known = set(range(len(chunks))) - set(pending)
    for kind in (SHARDS_DIR, SKIPPED_DIR):
        for f in (cache_dir / kind).glob("f*.parquet"):
            if int(f.name[1:7]) not in known:
                f.unlink()
    return pending


def _check_plan(cache_dir: Path, fp: dict[str, Any], source: str) -> None:
    """Write ``plan.json`` on a fresh directory; refuse one made with another plan."""
    plan_path = cache_dir / PLAN
    if plan_path.exists():
        old = json.loads(plan_path.read_text())["fingerprint"]
        if old != fp:
            diff = fingerprint_diff(old, fp)
            raise CacheMismatchError(
                f"{cache_dir} holds an online cache made with other settings, policy or prompts (differs in: "
                f"{', '.join(diff)}); use another directory or delete this one"
            )
        return
    atomic_write_json({"fingerprint": fp, "source": source}, plan_path)


def _skipped_stats(cache_dir: Path) -> tuple[list[str], Counter[str], list[float]]:
    files = sorted(p.relative_to(cache_dir).as_posix() for p in (cache_dir / SKIPPED_DIR).glob("f*.parquet"))
    reasons: Counter[str] = Counter()
    all_scores: list[float] = []
    for f in files:
        t = pq.read_table(cache_dir / f, columns=["reason", "scores"])
        reasons.update(t["reason"].to_pylist())
        all_scores += [x for row in t["scores"].to_pylist() for x in row]
    return files, reasons, all_scores


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def online_statistics(cache_dir: Path, manifest_files: list[str]) -> dict[str, Any]:
    """Counts and score statistics of a finished round (``None`` for a mean over nothing)."""
    score_w, score_l, all_scores = [], [], []
    for f in manifest_files:
        t = pq.read_table(cache_dir / f, columns=["score_w", "score_l", "scores"])
        score_w += t["score_w"].to_pylist()
        score_l += t["score_l"].to_pylist()
        all_scores += [x for row in t["scores"].to_pylist() for x in row]
    skipped_files, reasons, skipped_scores = _skipped_stats(cache_dir)
    margins = [w - l_ for w, l_ in zip(score_w, score_l)]
    return {
        "pairs_kept": len(score_w),
        "pairs_skipped": sum(reasons.values()),
        "skipped": {r: reasons.get(r, 0) for r in SKIP_REASONS},
        "skipped_files": skipped_files,
        "score_chosen_mean": _mean(score_w),
        "score_rejected_mean": _mean(score_l),
        "margin_mean": _mean(margins),
        "score_mean": _mean(all_scores + skipped_scores),
    }


def generate_online_cache(
    prompts: list[str],
    *,
    cache_dir: str | Path,
    settings: OnlineSettings,
    num_actors: int = 1,
    cpus_per_actor: float = 1.0,
) -> dict[str, Any]:
    """Sample (or finish) one online round into ``cache_dir``; returns the manifest. Ray must be initialised.

    The manifest is ``latent_cache.write_manifest``'s plus ``num_skipped``, ``skipped`` (per reason),
    ``skipped_files``, ``chunks_generated``/``chunks_skipped`` (this call) and ``online`` (settings and score
    statistics of :func:`online_statistics`).
    """
    import ray

    from prefopt_core.models.registry import adapter_for

    if not prompts:
        raise ValueError("no prompts to sample from")
    cache_dir = Path(cache_dir).expanduser().resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    fp = plan_fingerprint(settings, adapter_for(settings, settings.base_model_dir), prompts)
    _check_plan(cache_dir, fp, settings.source)
    chunks = _chunks(prompts, settings.rows_per_shard)
    pending = pending_chunks(cache_dir, chunks)
    logger.info(
        "online round %d -> %s: %d prompts x %d samples in %d chunk(s), %d done, %d to sample",
        settings.round,
        cache_dir,
        len(prompts),
        settings.samples_per_prompt,
        len(chunks),
        len(chunks) - len(pending),
        len(pending),
    )
    t0 = time.perf_counter()
    rows_done = 0
    if pending:
        (cache_dir / MANIFEST).unlink(missing_ok=True)  # a manifest only ever describes a complete cache
        specs = [{"chunk": c, "start": chunks[c][0], "prompts": json.dumps(chunks[c][1])} for c in pending]
        ds = ray.data.from_items(specs, override_num_blocks=len(specs))
        ds = ds.map_batches(
            OnlineSampler,
            fn_constructor_kwargs={"settings": asdict(settings), "cache_dir": str(cache_dir)},
            batch_size=1,
            batch_format="pyarrow",
            concurrency=num_actors,
            num_cpus=cpus_per_actor,
            num_gpus=1 if ray.cluster_resources().get("GPU", 0) > 0 else 0,
        )
        for stat in ds.iter_rows():
            rows_done += int(stat["kept"]) + int(stat["skipped"])
            logger.info(
                "online: chunk %d written (%d kept, %d skipped; %.2f prompts/s)",
                stat["chunk"],
                stat["kept"],
                stat["skipped"],
                rows_done / (time.perf_counter() - t0),
            )
    elapsed = time.perf_counter() - t0
    missing = pending_chunks(cache_dir, chunks)
    if missing:
        raise RuntimeError(f"online sampling ended with incomplete chunk(s) {missing[:5]}; rerun to finish")
    stats = online_statistics(cache_dir, _shard_files(cache_dir))
    manifest = write_manifest(
        cache_dir,
        fp,
        settings.source,
        num_fragments=len(chunks),
        num_input_rows=len(prompts),
        elapsed=elapsed,
        rows_done=rows_done,
        extra={
            "num_skipped": stats["pairs_skipped"],
            "skipped": stats["skipped"],
            "skipped_files": stats.pop("skipped_files"),
            "chunks_generated": len(pending),
            "chunks_skipped": len(chunks) - len(pending),
            "online": {
                "round": settings.round,
                "policy": settings.policy,
                "samples_per_prompt": settings.samples_per_prompt,
                "min_margin": settings.min_margin,
                "scorer": settings.scorer,
                "num_prompts": len(prompts),
                **stats,
            },
        },
    )
    logger.info(
        "online round %d: %d pairs kept, %d skipped %s, chosen/rejected score %s / %s",
        settings.round,
        manifest["num_pairs"],
        manifest["num_skipped"],
        manifest["skipped"],
        stats["score_chosen_mean"],
        stats["score_rejected_mean"],
    )
    return manifest


def _shard_files(cache_dir: Path) -> list[str]:
    return sorted(p.relative_to(cache_dir).as_posix() for p in (cache_dir / SHARDS_DIR).glob("f*.parquet"))


__all__ = [
    "SKIPPED_SCHEMA",
    "SKIP_REASONS",
    "OnlineSampler",
    "OnlineSettings",
    "PairChoice",
    "decode_latents",
    "generate_online_cache",
    "pair_best_worst",
    "sample_latents",
    "sample_seed",
]
