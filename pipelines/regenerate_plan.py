"""What a MaPO-style regenerate run generates: presets, prompt templates, per-row seeds, settings, pairs.

Pure (no model, no Ray): :mod:`pipelines.regenerate` generates the pairs planned here, and
:mod:`pipelines.dataset_card` describes them. The conventions (presets, ``{unsafe}`` descriptors, seeds,
sides) are documented in :mod:`pipelines.regenerate`.
"""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import pyarrow as pa

from pipelines.schema import MAPO_SCHEMA
from prefopt_core.storage import local_path

PresetName = Literal["pick-style-cartoon", "pick-style-pixel-art", "pick-safety", "custom"]
PRESET_NAMES: tuple[str, ...] = get_args(PresetName)

FORMAT = "prefopt-regenerated/1"
CARD = "README.md"
DATA_DIR = "data"
DATA_GLOB = f"{DATA_DIR}/*.parquet"

#: Per-row seeds are ``run_seed * SEED_STRIDE + prompt_index`` (distinct for up to 1M prompts per seed).
SEED_STRIDE = 1_000_000
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
REGENERATED_SCHEMA = pa.schema(
    [
        *MAPO_SCHEMA,
        pa.field("prompt_index", pa.int64()),  # index of the context prompt in the prompt list
        pa.field("chosen_prompt", pa.string()),
        pa.field("rejected_prompt", pa.string()),
        pa.field("seed", pa.int64()),  # shared by the chosen and the rejected image
        pa.field("base_model", pa.string()),
        pa.field("preset", pa.string()),
        pa.field("num_inference_steps", pa.int64()),
        pa.field("guidance_scale", pa.float64()),
    ]
)


# ---------------------------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class Preset:
    """Prompt templates of a dataset family; ``{prompt}`` is the context prompt."""

    name: str
    chosen_template: str
    rejected_template: str
    description: str


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
    if chosen == rejected:
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
    """One pair to generate: the context prompt, both rendered prompts and their shared seed."""

    prompt_index: int
    caption: str
    chosen_prompt: str
    rejected_prompt: str
    seed: int


def plan_pairs(prompts: list[str], settings: RegenerateSettings) -> list[PairSpec]:
    """One ``PairSpec`` per prompt, in order (pure: no model, no Ray)."""
    specs = []
    for i, prompt in enumerate(prompts):
        seed = row_seed(settings.seed, i)
        specs.append(
            PairSpec(
                prompt_index=i,
                caption=prompt,
                chosen_prompt=render(settings.chosen_template, prompt, seed),
                rejected_prompt=render(settings.rejected_template, prompt, seed),
                seed=seed,
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
