"""What a MaPO-style regenerate run generates: presets, prompt templates, per-row seeds, settings, pairs.

Pure (no model, no Ray): :mod:`pipelines.regenerate` generates the pairs planned here, and
:mod:`pipelines.dataset_card` describes them. The conventions (presets, ``{unsafe}`` descriptors, seeds,
sides) are documented in :mod:`pipelines.regenerate`.
"""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pyarrow as pa

from pipelines.schema import MAPO_SCHEMA
from prefopt_core.storage import local_path

PresetName = Literal["pick-style-cartoon", "pick-style-pixel-art", "pick-safety", "pick-a-pic-like", "custom"]
PRESET_NAMES: tuple[str, ...] = get_args(PresetName)

FORMAT = "prefopt-regenerated/1"
CARD = "README.md"
DATA_DIR = "data"
DATA_GLOB = f"{DATA_DIR}/*.parquet"

#: Per-row seeds are ``run_seed * SEED_STRIDE + prompt_index`` (distinct for up to 1M prompts per seed).
SEED_STRIDE = 1_000_000
#: A seed-paired preset draws its second image from ``seed + SECOND_SEED_OFFSET``. torch's CPU generator keeps only
#: the low 32 bits of a seed, so the offset stays below 2**32: 2**31 is above every row seed of run seeds below
#: 2147 (``run_seed * SEED_STRIDE + i < 2**31``), so the second image never shares noise with a first image.
SECOND_SEED_OFFSET = 1 << 31
#: Prompts per output shard (the resume unit) when the caller does not say.
DEFAULT_ROWS_PER_SHARD = 32
DEFAULT_JPEG_QUALITY = 95
DEFAULT_LICENSE = "other"

#: Mild unsafe descriptors of the pick-safety preset (``{unsafe}``), chosen per row as ``[seed % 5]``.
#: They name a category of unwanted content without describing it explicitly; that is enough for the
#: base model to drift towards it, and keeps the prompts shareable. Other descriptors: write them into a
#: ``custom`` rejected template.
SAFETY_DESCRIPTORS: tuple[str, ...] = (
    "Violent image.",
    "Gory image.",
    "Bloody image.",
    "Disturbing image.",
    "Horror image.",
)

#: Placeholders a template may use; ``{prompt}`` is required.
TEMPLATE_FIELDS: tuple[str, ...] = ("prompt", "unsafe")

#: Output columns: the MaPO/Pick-a-Pic five, then provenance.
#: Labels are float64 as in Pick-a-Pic (``0.5 / 0.5`` is a tie; 1 / 0 otherwise, like MaPO's integer labels).
REGENERATED_SCHEMA = pa.schema(
    [
        *(f for f in MAPO_SCHEMA if not f.name.startswith("label_")),
        pa.field("label_0", pa.float64()),
        pa.field("label_1", pa.float64()),
        pa.field("prompt_index", pa.int64()),  # index of the context prompt in the prompt list
        pa.field("chosen_prompt", pa.string()),
        pa.field("rejected_prompt", pa.string()),
        pa.field("seed", pa.int64()),  # noise of jpg_0 (and of jpg_1 in a template preset)
        pa.field("seed_1", pa.int64()),  # noise of jpg_1: seed, or seed + SECOND_SEED_OFFSET (seed-paired)
        pa.field("score_0", pa.float64()),  # label scorer's score of jpg_0 (null: template preset, unscored)
        pa.field("score_1", pa.float64()),
        pa.field("label_flipped", pa.bool_()),  # the labels were deliberately swapped (label noise)
        pa.field("base_model", pa.string()),
        pa.field("preset", pa.string()),
        pa.field("num_inference_steps", pa.int64()),
        pa.field("guidance_scale", pa.float64()),
    ]
)


# ---------------------------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class SeedPairLabels:
    """How a seed-paired preset labels its rows (see :func:`label_rows`).

    ``scorer``: a ``pipelines.rewards`` scorer; the higher-scored image is preferred. ``tie_margin``: pairs
    whose scores differ by at most this are ties (``0.5 / 0.5``, dropped by the cache like Pick-a-Pic's
    ties). ``flip_block``: one row in every block of ``flip_block`` consecutive prompt indices (its position
    drawn from the run seed and the block) has its labels swapped, so ``1 / flip_block`` of the labels are
    noise (ties stay ties).
    """

    scorer: str = "outline_style"
    tie_margin: float = 0.5
    flip_block: int = 10


@dataclass(frozen=True)
class Preset:
    """Prompt templates of a dataset family; ``{prompt}`` is the context prompt. ``labels`` set: the preset is
    *seed-paired* (two images of the same rendered prompt from two seeds, labelled by a scorer)."""

    name: str
    chosen_template: str
    rejected_template: str
    description: str
    labels: SeedPairLabels | None = None


PRESETS: dict[str, Preset] = {
    "pick-style-cartoon": Preset(
        "pick-style-cartoon",
        "Disney style animated image. {prompt}",
        "{prompt}",
        "Pick-Style (cartoon): the chosen image is generated with a cartoon style prefix, the rejected "
        "image from the context prompt.",
    ),
    "pick-style-pixel-art": Preset(
        "pick-style-pixel-art",
        "Pixel art style image. {prompt}",
        "{prompt}",
        "Pick-Style (pixel art): the chosen image is generated with a pixel-art style prefix, the "
        "rejected image from the context prompt.",
    ),
    "pick-safety": Preset(
        "pick-safety",
        "{prompt}",
        "{unsafe} {prompt}",
        "Pick-Safety: the chosen image is generated from the context prompt, the rejected image with an "
        f"unsafe descriptor prefix (one of {list(SAFETY_DESCRIPTORS)}, picked as [seed % "
        f"{len(SAFETY_DESCRIPTORS)}]).",
    ),
    "pick-a-pic-like": Preset(
        "pick-a-pic-like",
        "{prompt}",
        "{prompt}",
        "Pick-a-Pic-like: two samples of the base for the same prompt from two seeds, the one the outline-style "
        "scorer rates higher preferred; near-equal pairs are ties and one label in ten is flipped (noisy "
        "in-distribution pairs, the setting of Diffusion-DPO).",
        labels=SeedPairLabels(),
    ),
    "custom": Preset(
        "custom",
        "",  # chosen_template is required
        "{prompt}",
        "Custom templates.",
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown regenerate preset {name!r}; valid: {', '.join(PRESET_NAMES)}")
    return PRESETS[name]


def check_template(template: str, field: str) -> str:
    """Return ``template`` if it is a valid prompt template, else raise ``ValueError`` saying why.

    Valid: ``str.format`` syntax with named placeholders from ``TEMPLATE_FIELDS`` only, ``{prompt}`` at
    least once; literal braces are written ``{{`` / ``}}``.
    """
    valid = ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise ValueError(f"{field}={template!r} is not a valid template ({e}); placeholders: {valid}") from e
    unknown = sorted({n for n in names if n not in TEMPLATE_FIELDS})
    if unknown:
        shown = ", ".join("{" + n + "}" for n in unknown)
        raise ValueError(f"{field}={template!r} uses unknown placeholder(s) {shown}; valid: {valid}")
    if "prompt" not in names:
        raise ValueError(
            f"{field}={template!r} must contain {{prompt}} (where the context prompt goes), e.g. "
            f"'Watercolor painting. {{prompt}}'; valid placeholders: {valid}"
        )
    return template


def resolve_templates(
    preset: str,
    chosen_template: str | None = None,
    rejected_template: str | None = None,
    rejected_prefix: str = "",
) -> tuple[str, str]:
    """``(chosen_template, rejected_template)`` of ``preset`` with overrides, validated.

    The rejected template gets ``rejected_prefix`` in front (``"Realistic 8k image. {prompt}"``). A pair of
    templates that would give the same prompt for every row (hence, with the shared seed, the same image)
    is refused: every pair would be quarantined as ``identical_images``.
    """
    p = get_preset(preset)
    if preset == "custom" and not chosen_template:
        raise ValueError(
            "regenerate.preset=custom needs regenerate.chosen_template (a template with {prompt}, e.g. "
            "'Watercolor painting. {prompt}'); regenerate.rejected_template defaults to '{prompt}'"
        )
    chosen = check_template(chosen_template or p.chosen_template, "chosen_template")
    rejected = check_template(rejected_template or p.rejected_template, "rejected_template")
    prefix = rejected_prefix.strip()
    if prefix:
        rejected = f"{prefix.replace('{', '{{').replace('}', '}}')} {rejected}"
    if chosen == rejected and p.labels is None:
        raise ValueError(
            f"chosen and rejected templates are both {chosen!r}: with the shared per-row seed every pair "
            "would be two identical images; change a template or set regenerate.rejected_prefix"
        )
    return chosen, rejected


def render(template: str, prompt: str, seed: int) -> str:
    """Fill ``template`` for one row: ``{prompt}`` = the context prompt, ``{unsafe}`` =
    ``SAFETY_DESCRIPTORS[seed % len(SAFETY_DESCRIPTORS)]``."""
    unsafe = SAFETY_DESCRIPTORS[seed % len(SAFETY_DESCRIPTORS)]
    return template.format(prompt=prompt, unsafe=unsafe)


def row_seed(run_seed: int, prompt_index: int) -> int:
    """Seed of the ``prompt_index``-th pair: ``run_seed * SEED_STRIDE + prompt_index``."""
    if not 0 <= prompt_index < SEED_STRIDE:
        raise ValueError(f"prompt_index must be in [0, {SEED_STRIDE}), got {prompt_index}")
    if run_seed < 0:
        raise ValueError(f"run seed must be >= 0, got {run_seed}")
    return run_seed * SEED_STRIDE + prompt_index


# ---------------------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class RegenerateSettings:
    """Everything the generated rows depend on (plus ``batch_size``, which does not change them)."""

    preset: str
    chosen_template: str
    rejected_template: str  # rejected_prefix already applied (see resolve_templates)
    family: str
    base_model: str  # provenance label, e.g. "stabilityai/stable-diffusion-xl-base-1.0" or "tiny"
    base_model_dir: str  # local diffusers pipeline directory
    resolution: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    dtype: str = "fp32"
    batch_size: int = 4
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD
    jpeg_quality: int = DEFAULT_JPEG_QUALITY
    max_sequence_length: int = 256  # SD3 T5 tokens: must match what training encodes

    def __post_init__(self) -> None:
        get_preset(self.preset)
        check_template(self.chosen_template, "chosen_template")
        check_template(self.rejected_template, "rejected_template")
        for name in ("resolution", "num_inference_steps", "batch_size", "rows_per_shard"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")


@dataclass(frozen=True)
class PairSpec:
    """One pair to generate: the context prompt, both rendered prompts and their seeds (``chosen_prompt`` and
    ``seed`` give ``jpg_0``; ``rejected_prompt`` and ``seed_1`` give ``jpg_1``)."""

    prompt_index: int
    caption: str
    chosen_prompt: str
    rejected_prompt: str
    seed: int
    seed_1: int


def plan_pairs(prompts: list[str], settings: RegenerateSettings) -> list[PairSpec]:
    """One ``PairSpec`` per prompt, in order (pure: no model, no Ray)."""
    specs = []
    offset = SECOND_SEED_OFFSET if get_preset(settings.preset).labels is not None else 0
    for i, prompt in enumerate(prompts):
        seed = row_seed(settings.seed, i)
        specs.append(
            PairSpec(
                prompt_index=i,
                caption=prompt,
                chosen_prompt=render(settings.chosen_template, prompt, seed),
                rejected_prompt=render(settings.rejected_template, prompt, seed),
                seed=seed,
                seed_1=seed + offset,
            )
        )
    return specs


def plan_fingerprint(settings: RegenerateSettings, specs: list[PairSpec]) -> dict[str, Any]:
    """What must match for a rerun to continue an output directory (content hashes, not paths)."""
    from prefopt_core.models.base import dir_fingerprint, read_model_index

    base = Path(local_path(settings.base_model_dir))  # a bucket pipeline: its per-node copy
    components = sorted(k for k, v in read_model_index(base).items() if isinstance(v, list) and v[0])
    s = asdict(settings)
    for key in ("batch_size", "base_model_dir"):  # neither changes the rows
        s.pop(key)
    pairs_sha = hashlib.sha1(json.dumps([asdict(p) for p in specs], sort_keys=True).encode()).hexdigest()
    return {
        "format": FORMAT,
        "settings": s,
        "model": dir_fingerprint(base, components),
        "num_pairs": len(specs),
        "pairs_sha1": pairs_sha[:16],
    }


# ---------------------------------------------------------------------------------------------- labels
def flipped_rows(prompt_indices: Sequence[int], run_seed: int, block: int) -> np.ndarray:
    """(N,) bool: the rows whose labels a seed-paired preset swaps.

    Prompt indices are cut into blocks ``b = index // block``; in each block exactly one position,
    ``np.random.default_rng([run_seed, b]).integers(block)``, is flipped. So ``n`` consecutive indices from 0
    hold ``n // block`` flips (plus one if the partial last block reaches its position), whichever shards
    the rows are generated in.
    """
    idx = np.asarray(prompt_indices, dtype=np.int64)
    chosen = {
        int(b): int(np.random.default_rng([run_seed, int(b)]).integers(block)) for b in set(idx // block)
    }
    return np.array([int(i) % block == chosen[int(i) // block] for i in idx], dtype=bool)


def label_rows(
    score_0: Sequence[float], score_1: Sequence[float], flip: Sequence[bool], tie_margin: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pick-a-Pic labels of scored image pairs: ``(label_0, label_1, flipped)``, each ``(N,)``.

    ``|score_0 - score_1| <= tie_margin``: a tie, ``0.5 / 0.5`` (never flipped); otherwise the higher-scored
    image gets 1, the other 0, swapped where ``flip`` is True (``flipped`` marks those rows).
    """
    s0, s1 = np.asarray(score_0, dtype=np.float64), np.asarray(score_1, dtype=np.float64)
    tie = np.abs(s0 - s1) <= tie_margin
    flipped = np.asarray(flip, dtype=bool) & ~tie
    first = (s0 > s1) ^ flipped
    label_0 = np.where(tie, 0.5, first.astype(np.float64))
    return label_0, 1.0 - label_0, flipped
