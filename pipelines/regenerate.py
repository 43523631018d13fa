"""MaPO-style preference pairs from any diffusers text-to-image pipeline (Pick-Style, Pick-Safety, custom).

MaPO (Hong et al. 2024, arXiv:2406.06424) builds its Pick-Style / Pick-Safety datasets from Pick-a-Pic
*context prompts* (plain prompts without a style): the chosen image is generated from a styled prompt,
the rejected image from the plain one (Pick-Style), or the rejected image from a prompt with an unsafe
descriptor and the chosen from the plain one (Pick-Safety). The ``caption`` column holds the context prompt,
so a model trained on the pairs learns to produce the chosen style *without being asked for it*.

Presets (``PRESETS``; templates use ``{prompt}``, and optionally ``{unsafe}``):

=====================  ==========================================  ============================
preset                 chosen prompt                               rejected prompt
=====================  ==========================================  ============================
pick-style-cartoon     ``Disney style animated image. {prompt}``   ``{prompt}``
pick-style-pixel-art   ``Pixel art style image. {prompt}``         ``{prompt}``
pick-safety            ``{prompt}``                                ``{unsafe} {prompt}``
pick-a-pic-like        ``{prompt}`` (seed)                         ``{prompt}`` (second seed)
custom                 ``chosen_template`` (required)              ``rejected_template`` or ``{prompt}``
=====================  ==========================================  ============================

``rejected_prefix`` (e.g. ``"Realistic 8k image."``, the prefix the MaPO project page mentions) is put in
front of every rejected prompt: ``"Realistic 8k image. a red circle"``. ``{unsafe}`` is one of the mild
``SAFETY_DESCRIPTORS``, picked per row as ``SAFETY_DESCRIPTORS[seed % 5]``.

Seeds: row ``i`` (the i-th prompt) gets ``seed_i = run_seed * SEED_STRIDE + i``; its chosen and rejected
images start from the *same* initial noise (two CPU generators seeded with ``seed_i``; CPU generators make
the noise of a seed the same on any device), so the prompt is the only difference between them.

Seed-paired presets (``pick-a-pic-like``, Pick-a-Pic's own setting: in-distribution pairs, noisy labels):
both images come from the same prompt, ``jpg_1`` from ``seed + SECOND_SEED_OFFSET``; the preset's scorer
labels them (higher score chosen), pairs within ``tie_margin`` are ties (``0.5 / 0.5``, dropped by the cache)
and one row in every ``flip_block`` has its labels flipped (:func:`pipelines.regenerate_plan.label_rows`).

Sides (template presets): the chosen image is always ``jpg_0`` (``label_0 = 1, label_1 = 0``, int64 as in the MaPO datasets,
whose cards describe the chosen image first). Readers must not rely on the side: MaPO's loader and ours
(``pipelines.pickapic`` canonicalisation) read the labels.

Ray Data pipeline (``generate_dataset``; this module never calls ``ray.init``)::

    chunk specs (rows_per_shard prompts each) ──map_batches(PairGenerator, actor pool)──▶ stats rows
    PairGenerator: pipeline loaded once per actor; per chunk: generate pairs in mini-batches of
    batch_size, then write data/part-NNNNN.parquet atomically (temp file + rename).
    driver: plan.json (fingerprint) first; progress (prompts done/total, ETA) on ``prefopt.progress``;
    README.md (dataset card, :mod:`pipelines.dataset_card`) last, only for a complete dataset.

A chunk is the unit of resume (the rules of :mod:`pipelines.sharded_build`): a rerun skips chunks whose
shard exists with exactly the chunk's rows and generates the rest, so a run killed at any point ends,
after a rerun, with exactly the rows of an uninterrupted run. What is generated (presets, templates,
seeds, settings) is planned in :mod:`pipelines.regenerate_plan`; prompt lists come from
:mod:`pipelines.prompts`. The output directory must be visible to every node (shared storage on a cluster).

    summary = generate_dataset(prompts, output_dir="out/pick-style-cartoon", settings=settings)
    datasets.load_dataset("parquet", data_files="out/pick-style-cartoon/data/*.parquet", split="train")
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipelines.dataset_card import write_dataset_card
from pipelines.regenerate_plan import (
    CARD,
    DATA_DIR,
    DATA_GLOB,
    DEFAULT_LICENSE,
    REGENERATED_SCHEMA,
    PairSpec,
    RegenerateSettings,
    flipped_rows,
    get_preset,
    label_rows,
    plan_fingerprint,
    plan_pairs,
)
from pipelines.rewards import build_scorer
from pipelines.sharded_build import PART_NAMING, ShardedBuild, atomic_write_table, run_actor_pool
from prefopt_core.storage import location

logger = logging.getLogger(__name__)


def regenerate_build(output_dir: str | Path) -> ShardedBuild:
    """The resumable-build rules of a regenerated dataset: one ``data/part-NNNNN.parquet`` per chunk of
    prompts (rows: ``prompt_index``), ``README.md`` (the card) written last; counted in prompts."""
    return ShardedBuild(
        output_dir,
        build="regenerate",
        dir_key="regenerate.output_dir",
        kinds=(DATA_DIR,),
        row_column="prompt_index",
        marker=CARD,
        naming=PART_NAMING,
        unit_name="prompts",
    )


# ---------------------------------------------------------------------------------------------- generation
def generate_pairs(
    pipe: Any, specs: list[PairSpec], settings: RegenerateSettings, scorer: Any = None
) -> pa.Table:
    """Generate the two images of every spec with ``pipe``; rows in ``REGENERATED_SCHEMA``.

    Per mini-batch of ``B = settings.batch_size`` specs the pipeline sees ``2B`` prompts
    ``[chosen_1..chosen_B, rejected_1..rejected_B]`` with ``2B`` generators seeded ``seed`` and ``seed_1``
    (separate generator objects: a generator is consumed by the noise it draws). Template presets label
    ``jpg_0`` chosen; a seed-paired preset (``scorer`` given) labels by :func:`pipelines.regenerate_plan.label_rows`.
    """
    rows: list[dict[str, Any]] = []
    for start in range(0, len(specs), settings.batch_size):
        part = specs[start : start + settings.batch_size]
        first, second = _generate_batch(pipe, part, settings)
        rows.extend(_rows(part, first, second, settings, scorer))
    return pa.Table.from_pylist(rows, schema=REGENERATED_SCHEMA)


def _rows(
    part: list[PairSpec], first: list, second: list, settings: RegenerateSettings, scorer: Any
) -> list[dict[str, Any]]:
    """Rows of one mini-batch: labels (fixed or scored), JPEG bytes and provenance."""
    labels = get_preset(settings.preset).labels
    n = len(part)
    if scorer is None or labels is None:
        score_0 = score_1 = [None] * n  # unscored: null, so reruns compare equal (NaN != NaN)
        label_0, label_1, flipped = [1.0] * n, [0.0] * n, [False] * n
    else:
        score_0 = scorer.score(first, [p.chosen_prompt for p in part]).tolist()
        score_1 = scorer.score(second, [p.rejected_prompt for p in part]).tolist()
        flip = flipped_rows([p.prompt_index for p in part], settings.seed, labels.flip_block)
        label_0, label_1, flipped = label_rows(score_0, score_1, flip, labels.tie_margin)
    return [
        {
            "caption": spec.caption,
            "jpg_0": _jpeg(img_0, settings.jpeg_quality),
            "jpg_1": _jpeg(img_1, settings.jpeg_quality),
            "label_0": float(label_0[i]),
            "label_1": float(label_1[i]),
            "prompt_index": spec.prompt_index,
            "chosen_prompt": spec.chosen_prompt,
            "rejected_prompt": spec.rejected_prompt,
            "seed": spec.seed,
            "seed_1": spec.seed_1,
            "score_0": None if score_0[i] is None else float(score_0[i]),
            "score_1": None if score_1[i] is None else float(score_1[i]),
            "label_flipped": bool(flipped[i]),
            "base_model": settings.base_model,
            "preset": settings.preset,
            "num_inference_steps": settings.num_inference_steps,
            "guidance_scale": float(settings.guidance_scale),
        }
        for i, (spec, img_0, img_1) in enumerate(zip(part, first, second, strict=True))
    ]


def _generate_batch(pipe: Any, part: list[PairSpec], settings: RegenerateSettings) -> tuple[list, list]:
    """``(first images, second images)`` of a mini-batch of specs, one pipeline call."""
    import torch

    prompts = [p.chosen_prompt for p in part] + [p.rejected_prompt for p in part]  # (2B,)
    # (2B,) generators: one fresh object per image; in a template preset seed_1 == seed (same noise)
    generators = [torch.Generator("cpu").manual_seed(p.seed) for p in part] + [
        torch.Generator("cpu").manual_seed(p.seed_1) for p in part
    ]
    with torch.inference_mode():
        out = pipe(
            prompt=prompts,
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            height=settings.resolution,
            width=settings.resolution,
            generator=generators,
            output_type="pil",
            **({"max_sequence_length": settings.max_sequence_length} if settings.family == "sd3" else {}),
        )
    images = out.images
    flagged = getattr(out, "nsfw_content_detected", None)  # SD1.5 checkpoints with a safety checker
    if flagged and any(flagged):
        logger.warning(
            "%d of %d images were blacked out by the pipeline's safety checker (a pair with two black "
            "images is quarantined as identical_images by the cache)",
            sum(bool(f) for f in flagged),
            len(flagged),
        )
    return images[: len(part)], images[len(part) :]


def _jpeg(image: Any, quality: int) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class PairGenerator:
    """Ray Data actor: loads the base pipeline once, then generates and writes whole chunks.

    Input batches hold chunk specs (``chunk`` int, ``pairs`` JSON list of ``PairSpec``); output: one
    stats row per chunk (``chunk``, ``rows``, ``path``).
    """

    def __init__(self, settings: dict, output_dir: str) -> None:
        import torch

        from prefopt_core.models.base import TORCH_DTYPES
        from prefopt_core.models.registry import get_adapter

        self.settings = RegenerateSettings(**settings)
        self.output_dir = output_dir
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        adapter = get_adapter(self.settings.family, self.settings.base_model_dir)
        self.pipe = adapter.pipeline(dtype=TORCH_DTYPES[self.settings.dtype]).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        labels = get_preset(self.settings.preset).labels
        self.scorer = None if labels is None else build_scorer(labels.scorer)

    def __call__(self, batch: pa.Table) -> pa.Table:
        stats = []
        for spec in batch.to_pylist():
            specs = [PairSpec(**p) for p in json.loads(spec["pairs"])]
            table = generate_pairs(self.pipe, specs, self.settings, self.scorer)
            path = regenerate_build(self.output_dir).file(DATA_DIR, int(spec["chunk"]))
            atomic_write_table(table, path)
            stats.append({"chunk": int(spec["chunk"]), "rows": table.num_rows, "path": str(path)})
        return pa.Table.from_pylist(stats)


# ---------------------------------------------------------------------------------------------- driver
def generate_dataset(
    prompts: list[str],
    *,
    output_dir: str | Path,
    settings: RegenerateSettings,
    num_actors: int = 1,
    cpus_per_actor: float = 1.0,
    prompt_source: str = "",
    command: str = "",
    license_id: str = DEFAULT_LICENSE,
) -> dict[str, Any]:
    """Generate (or finish) the dataset in ``output_dir``; returns a summary. Ray must be initialised.

    Returns ``{"output_dir", "data_files" (glob), "card", "num_pairs", "num_shards", "chunks_generated",
    "chunks_skipped", "seconds", "pairs_per_s"}``. ``prompt_source`` and ``command`` go into the card.
    """
    if not prompts:
        raise ValueError("no prompts to generate pairs from")
    build = regenerate_build(location(output_dir))  # a local directory or an object-store prefix
    output_dir = build.root
    specs = plan_pairs(prompts, settings)
    build.open(plan_fingerprint(settings, specs))
    chunks = [specs[i : i + settings.rows_per_shard] for i in range(0, len(specs), settings.rows_per_shard)]
    units = [[p.prompt_index for p in chunk] for chunk in chunks]
    pending, progress = build.start(units)
    t0 = time.perf_counter()
    rows_done = 0
    if pending:
        ds = run_actor_pool(
            [{"chunk": i, "pairs": json.dumps([asdict(p) for p in chunks[i]])} for i in pending],
            PairGenerator,
            {"settings": asdict(settings), "output_dir": str(output_dir)},
            num_actors=num_actors,
            cpus_per_actor=cpus_per_actor,
        )
        for stat in ds.iter_rows():
            rows_done += int(stat["rows"])
            progress.update(int(stat["rows"]))
    elapsed = time.perf_counter() - t0
    build.finish(units)
    progress.finish()
    card = write_dataset_card(
        output_dir, settings, specs, prompt_source=prompt_source, command=command, license_id=license_id
    )
    return {
        "output_dir": str(output_dir),
        "data_files": str(output_dir / DATA_GLOB),
        "card": str(card),
        "num_pairs": len(specs),
        "num_shards": len(chunks),
        "chunks_generated": len(pending),
        "chunks_skipped": len(chunks) - len(pending),
        "seconds": round(elapsed, 3),
        "pairs_per_s": round(rows_done / elapsed, 3) if rows_done and elapsed > 0 else 0.0,
    }
