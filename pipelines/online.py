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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipelines.cache_format import (
    CACHE_FORMAT,
    SHARDS_DIR,
    cache_build,
    cache_file,
    model_fingerprint,
    write_manifest,
)
from pipelines.online_pairs import (
    SKIP_REASONS,
    SKIPPED_DIR,
    SKIPPED_SCHEMA,
    ChunkResult,
    PairChoice,
    encoded_kept_table,
    online_statistics,
    pair_best_worst,
    skipped_table,
)
from pipelines.sharded_build import atomic_write_table, run_actor_pool

logger = logging.getLogger(__name__)

#: Sample seeds ``run_seed * 10**12 + round * 10**9 + prompt_index * 10**3 + k`` are distinct within these ranges.
MAX_SAMPLES = 10**3
MAX_PROMPTS = 10**6
MAX_ROUNDS = 10**3
#: Largest run seed whose sample seeds still fit an int64 column.
MAX_RUN_SEED = (2**63 - MAX_ROUNDS * MAX_PROMPTS * MAX_SAMPLES) // (MAX_ROUNDS * MAX_PROMPTS * MAX_SAMPLES)


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
        table = encoded_kept_table(self.adapter, result, self.settings)
        if table is not None:
            atomic_write_table(table, cache_file(self.cache_dir, SHARDS_DIR, chunk, start))
        skipped = skipped_table(result, self.settings)
        if skipped.num_rows:
            atomic_write_table(skipped, cache_file(self.cache_dir, SKIPPED_DIR, chunk, start))
        return len(prompts) - skipped.num_rows, skipped.num_rows


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


def _round_manifest(
    settings: OnlineSettings, stats: dict[str, Any], num_prompts: int, num_chunks: int, generated: int
) -> dict[str, Any]:
    """The online round's own manifest keys (``stats``: :func:`online_statistics` of the round)."""
    stats = dict(stats)
    return {
        "num_skipped": stats["pairs_skipped"],
        "skipped": stats["skipped"],
        "skipped_files": stats.pop("skipped_files"),
        "chunks_generated": generated,
        "chunks_skipped": num_chunks - generated,
        "online": {
            "round": settings.round,
            "policy": settings.policy,
            "samples_per_prompt": settings.samples_per_prompt,
            "min_margin": settings.min_margin,
            "scorer": settings.scorer,
            "num_prompts": num_prompts,
            **stats,
        },
    }


def generate_online_cache(
    prompts: list[str],
    *,
    settings: OnlineSettings,
    cache_dir: str | Path,
    cpus_per_actor: float = 1.0,
    num_actors: int = 1,
) -> dict[str, Any]:
    """Sample (or finish) one online round into ``cache_dir``; returns the manifest. Ray must be initialised.
    Progress (prompts done/total, kept, skipped, ETA) is logged on the ``prefopt.progress`` logger.

    The manifest is ``latent_cache.write_manifest``'s plus ``num_skipped``, ``skipped`` (per reason),
    ``skipped_files``, ``chunks_generated``/``chunks_skipped`` (this call) and ``online`` (settings and score
    statistics of :func:`online_statistics`).
    """
    from prefopt_core.models.registry import adapter_for

    if not prompts:
        raise ValueError("no prompts to sample from")
    build = cache_build(
        Path(cache_dir).expanduser().resolve(),
        build="online",
        dir_key="round directory",
        other_kind=SKIPPED_DIR,
        unit_name="prompts",
    )
    cache_dir = build.root
    fp = plan_fingerprint(settings, adapter_for(settings, settings.base_model_dir), prompts)
    build.open(fp, source=settings.source)
    chunks = [
        (i, prompts[i : i + settings.rows_per_shard]) for i in range(0, len(prompts), settings.rows_per_shard)
    ]
    units = [range(start, start + len(part)) for start, part in chunks]
    pending, progress = build.start(units)
    logger.info("online round %d: %d samples per prompt", settings.round, settings.samples_per_prompt)
    t0 = time.perf_counter()
    rows_done = 0
    if pending:
        ds = run_actor_pool(
            [{"chunk": c, "start": chunks[c][0], "prompts": json.dumps(chunks[c][1])} for c in pending],
            OnlineSampler,
            {"settings": asdict(settings), "cache_dir": str(cache_dir)},
            num_actors=num_actors,
            cpus_per_actor=cpus_per_actor,
        )
        kept = skipped = 0
        for stat in ds.iter_rows():
            kept, skipped = kept + int(stat["kept"]), skipped + int(stat["skipped"])
            progress.update(int(stat["kept"]) + int(stat["skipped"]), kept=kept, skipped=skipped)
        rows_done = kept + skipped
    elapsed = time.perf_counter() - t0
    build.finish(units)
    progress.finish()
    stats = online_statistics(
        cache_dir, [f.relative_to(cache_dir).as_posix() for f in build.files(SHARDS_DIR)]
    )
    manifest = write_manifest(
        cache_dir,
        fp,
        settings.source,
        num_fragments=len(chunks),
        num_input_rows=len(prompts),
        elapsed=elapsed,
        rows_done=rows_done,
        extra=_round_manifest(settings, stats, len(prompts), len(chunks), len(pending)),
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
