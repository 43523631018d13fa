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
custom                 ``chosen_template`` (required)              ``rejected_template`` or ``{prompt}``
=====================  ==========================================  ============================

``rejected_prefix`` (e.g. ``"Realistic 8k image."``, the prefix the MaPO project page mentions) is put in
front of every rejected prompt: ``"Realistic 8k image. a red circle"``. ``{unsafe}`` is one of the mild
``SAFETY_DESCRIPTORS``, picked per row as ``SAFETY_DESCRIPTORS[seed % 5]``.

Seeds: row ``i`` (the i-th prompt) gets ``seed_i = run_seed * SEED_STRIDE + i``; its chosen and rejected
images start from the *same* initial noise (two CPU generators seeded with ``seed_i``; CPU generators make
the noise of a seed the same on any device), so the prompt is the only difference between them.

Sides: the chosen image is always ``jpg_0`` (``label_0 = 1, label_1 = 0``, int64 as in the MaPO datasets,
whose cards describe the chosen image first). Readers must not rely on the side: MaPO's loader and ours
(``pipelines.pickapic`` canonicalisation) read the labels.

Ray Data pipeline (``generate_dataset``; this module never calls ``ray.init``)::

    chunk specs (rows_per_shard prompts each) ──map_batches(PairGenerator, actor pool)──▶ stats rows
    PairGenerator: pipeline loaded once per actor; per chunk: generate pairs in mini-batches of
    batch_size, then write data/part-NNNNN.parquet atomically (temp file + rename).
    driver: plan.json (fingerprint) first; README.md (dataset card) last, only for a complete dataset.

A chunk is the unit of resume: a rerun skips chunks whose shard exists with exactly the chunk's rows and
generates the rest, so a run killed at any point ends, after a rerun, with exactly the rows of an
uninterrupted run. The output directory must be visible to every node (shared storage on a cluster).

    summary = generate_dataset(prompts, output_dir="out/pick-style-cartoon", settings=settings)
    datasets.load_dataset("parquet", data_files="out/pick-style-cartoon/data/*.parquet", split="train")
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import string
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipelines.plan import fingerprint_diff
from pipelines.schema import MAPO_SCHEMA

logger = logging.getLogger(__name__)

PresetName = Literal["pick-style-cartoon", "pick-style-pixel-art", "pick-safety", "custom"]
PRESET_NAMES: tuple[str, ...] = get_args(PresetName)

FORMAT = "prefopt-regenerated/1"
PLAN = "plan.json"
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


class RegenerateMismatchError(RuntimeError):
    """The output directory holds a dataset generated with other settings or prompts."""


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


# ---------------------------------------------------------------------------------------------- prompts
def load_prompts(
    path: str | os.PathLike[str], num_prompts: int | None = None, *, dedupe: bool = True
) -> list[str]:
    """Context prompts from a text file (one per line) or parquet (file or directory) with ``caption``.

    Each prompt is stripped; empty ones (and null captions) are skipped, duplicates too when ``dedupe``
    (the first occurrence keeps its place), both with a logged count. Order is kept; ``num_prompts``
    keeps the first ones. Parquet is read column-only and stops once ``num_prompts`` are found.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"prompt source {path} does not exist (a .txt file or parquet with 'caption')"
        )
    if num_prompts is not None and num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1 or None, got {num_prompts}")
    prompts: list[str] = []
    seen: set[str] = set()
    counts = {"empty": 0, "duplicate": 0}

    def add(raw: Any) -> bool:
        """Add one raw prompt; True once ``num_prompts`` prompts are collected."""
        text = "" if raw is None else str(raw).strip()
        if not text:
            counts["empty"] += 1
        elif dedupe and text in seen:
            counts["duplicate"] += 1
        else:
            seen.add(text)
            prompts.append(text)
        return num_prompts is not None and len(prompts) >= num_prompts

    if path.is_dir() or path.suffix == ".parquet":
        _read_parquet_captions(path, add)
    else:
        for line in path.read_text(encoding="utf-8").splitlines():
            if add(line):
                break
    if counts["empty"] or counts["duplicate"]:
        logger.info(
            "%s: skipped %d empty and %d duplicate prompt(s)", path, counts["empty"], counts["duplicate"]
        )
    if not prompts:
        raise ValueError(f"{path} holds no non-empty prompt")
    logger.info("loaded %d prompt(s) from %s", len(prompts), path)
    return prompts


def _read_parquet_captions(path: Path, add) -> None:
    files = (
        sorted(
            f
            for f in path.rglob("*.parquet")
            if not any(p.startswith(".") for p in f.relative_to(path).parts)
        )
        if path.is_dir()
        else [path]
    )
    if not files:
        raise FileNotFoundError(f"{path}: directory holds no .parquet file")
    for f in files:
        pf = pq.ParquetFile(f)
        if "caption" not in pf.schema_arrow.names:
            raise ValueError(
                f"{f}: no 'caption' column to read prompts from; columns: {pf.schema_arrow.names}"
            )
        for batch in pf.iter_batches(columns=["caption"], batch_size=4096):
            for caption in batch.column(0).to_pylist():
                if add(caption):
                    return


def toy_world_prompts() -> list[str]:
    """The 24 captions of the synthetic toy world (``"a red circle"``, ``"a red square"``, ...), colours
    outer, shapes inner: the default prompt source, so ``prefopt regenerate`` works out of the box."""
    from pipelines.toy_world import SHAPES, TOY_COLORS

    return [f"a {color} {shape}" for color in TOY_COLORS for shape in SHAPES]


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

    base = Path(settings.base_model_dir)
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


# ---------------------------------------------------------------------------------------------- generation
def generate_pairs(pipe: Any, specs: list[PairSpec], settings: RegenerateSettings) -> pa.Table:
    """Generate the chosen and rejected image of every spec with ``pipe``; rows in ``REGENERATED_SCHEMA``.

    Per mini-batch of ``B = settings.batch_size`` specs the pipeline sees ``2B`` prompts
    ``[chosen_1..chosen_B, rejected_1..rejected_B]`` with ``2B`` generators, the two of a pair seeded
    with the pair's seed (separate generator objects: a generator is consumed by the noise it draws).
    """
    import torch

    rows: list[dict[str, Any]] = []
    for start in range(0, len(specs), settings.batch_size):
        part = specs[start : start + settings.batch_size]
        prompts = [p.chosen_prompt for p in part] + [p.rejected_prompt for p in part]  # (2B,)
        # (2B,) generators: one fresh object per image, the two of a pair seeded alike
        generators = [torch.Generator("cpu").manual_seed(p.seed) for p in part + part]
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
        chosen, rejected = images[: len(part)], images[len(part) :]
        for spec, img_w, img_l in zip(part, chosen, rejected, strict=True):
            rows.append(
                {
                    "caption": spec.caption,
                    "jpg_0": _jpeg(img_w, settings.jpeg_quality),  # chosen first (label_0 = 1)
                    "jpg_1": _jpeg(img_l, settings.jpeg_quality),
                    "label_0": 1,
                    "label_1": 0,
                    "prompt_index": spec.prompt_index,
                    "chosen_prompt": spec.chosen_prompt,
                    "rejected_prompt": spec.rejected_prompt,
                    "seed": spec.seed,
                    "base_model": settings.base_model,
                    "preset": settings.preset,
                    "num_inference_steps": settings.num_inference_steps,
                    "guidance_scale": float(settings.guidance_scale),
                }
            )
    return pa.Table.from_pylist(rows, schema=REGENERATED_SCHEMA)


def _jpeg(image: Any, quality: int) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def shard_path(output_dir: str | Path, chunk: int) -> Path:
    return Path(output_dir) / DATA_DIR / f"part-{chunk:05d}.parquet"


def _atomic_write_bytes(data: bytes, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_shard(table: pa.Table, output_dir: str | Path, chunk: int) -> Path:
    """Write one chunk's rows to ``data/part-NNNNN.parquet`` atomically (temp file + rename)."""
    path = shard_path(output_dir, chunk)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    _atomic_write_bytes(buf.getvalue().to_pybytes(), path)
    return path


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

    def __call__(self, batch: pa.Table) -> pa.Table:
        stats = []
        for spec in batch.to_pylist():
            specs = [PairSpec(**p) for p in json.loads(spec["pairs"])]
            table = generate_pairs(self.pipe, specs, self.settings)
            path = write_shard(table, self.output_dir, int(spec["chunk"]))
            stats.append({"chunk": int(spec["chunk"]), "rows": table.num_rows, "path": str(path)})
        return pa.Table.from_pylist(stats)


# ---------------------------------------------------------------------------------------------- driver
def _chunks(specs: list[PairSpec], rows_per_shard: int) -> list[list[PairSpec]]:
    return [specs[i : i + rows_per_shard] for i in range(0, len(specs), rows_per_shard)]


def _check_plan(output_dir: Path, fp: dict[str, Any]) -> None:
    """Write ``plan.json`` on a fresh directory; refuse a directory made with another plan."""
    plan_path = output_dir / PLAN
    if plan_path.exists():
        old = json.loads(plan_path.read_text())["fingerprint"]
        if old != fp:
            diff = fingerprint_diff(old, fp)
            raise RegenerateMismatchError(
                f"{output_dir} holds a dataset generated with other settings or prompts (differs in: "
                f"{', '.join(diff)}); use another regenerate.output_dir or delete this one"
            )
        return
    if list((output_dir / DATA_DIR).glob("*.parquet")):
        raise RegenerateMismatchError(
            f"{output_dir / DATA_DIR} holds parquet files but no {PLAN}: not a prefopt regenerate output; "
            "use an empty regenerate.output_dir"
        )
    _atomic_write_bytes(json.dumps({"fingerprint": fp}, indent=1, sort_keys=True).encode(), plan_path)


def _pending_chunks(output_dir: Path, chunks: list[list[PairSpec]]) -> list[int]:
    """Chunks without a complete shard; shards that are incomplete or outside the plan are deleted."""
    for tmp in (output_dir / DATA_DIR).glob(".*.tmp"):  # left by a killed writer
        tmp.unlink()
    pending = []
    for i, chunk in enumerate(chunks):
        path = shard_path(output_dir, i)
        if path.exists():
            try:
                got = pq.read_table(path, columns=["prompt_index"])["prompt_index"].to_pylist()
            except (OSError, pa.ArrowException) as e:
                logger.warning("%s is unreadable (%s): generating it again", path, e)
                got = None
            if got == [p.prompt_index for p in chunk]:
                continue
            path.unlink()
        pending.append(i)
    known = {shard_path(output_dir, i).name for i in range(len(chunks))}
    for f in (output_dir / DATA_DIR).glob("part-*.parquet"):
        if f.name not in known:
            logger.warning("deleting %s: not part of this plan", f)
            f.unlink()
    return pending


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
    import ray

    if not prompts:
        raise ValueError("no prompts to generate pairs from")
    output_dir = Path(output_dir).expanduser().resolve()
    (output_dir / DATA_DIR).mkdir(parents=True, exist_ok=True)
    specs = plan_pairs(prompts, settings)
    _check_plan(output_dir, plan_fingerprint(settings, specs))
    chunks = _chunks(specs, settings.rows_per_shard)
    pending = _pending_chunks(output_dir, chunks)
    logger.info(
        "regenerate %s -> %s: %d pairs in %d chunk(s), %d done, %d to generate",
        settings.preset,
        output_dir,
        len(specs),
        len(chunks),
        len(chunks) - len(pending),
        len(pending),
    )

    t0 = time.perf_counter()
    rows_done = 0
    if pending:
        (output_dir / CARD).unlink(missing_ok=True)  # a card only ever describes a complete dataset
        items = [{"chunk": i, "pairs": json.dumps([asdict(p) for p in chunks[i]])} for i in pending]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(
            PairGenerator,
            fn_constructor_kwargs={
                "settings": asdict(settings),
                "output_dir": str(output_dir),
            },
            batch_size=1,
            batch_format="pyarrow",
            concurrency=num_actors,
            num_cpus=cpus_per_actor,
            num_gpus=1 if ray.cluster_resources().get("GPU", 0) > 0 else 0,
        )
        for stat in ds.iter_rows():
            rows_done += int(stat["rows"])
            logger.info(
                "regenerate: chunk %d written (%d pairs, %.2f pairs/s)",
                stat["chunk"],
                rows_done,
                rows_done / (time.perf_counter() - t0),
            )
    elapsed = time.perf_counter() - t0

    missing = _pending_chunks(output_dir, chunks)
    if missing:
        raise RuntimeError(
            f"regenerate ended with {len(missing)} incomplete chunk(s) {missing[:5]}; rerun to finish"
        )
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


# ---------------------------------------------------------------------------------------------- card
_HF_DTYPES = {pa.string(): "string", pa.binary(): "binary", pa.int64(): "int64", pa.float64(): "float64"}


def size_category(n: int) -> str:
    """Hugging Face ``size_categories`` label of ``n`` rows (``n<1K``, ``1K<n<10K``, ...)."""
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")]
    for bound, label in bounds:
        if n < bound:
            return label
    return "1M<n<10M"


def card_metadata(
    settings: RegenerateSettings,
    num_pairs: int,
    license_id: str = DEFAULT_LICENSE,
    num_bytes: int = 0,
    download_size: int = 0,
) -> dict:
    """The YAML front matter of the dataset card (``configs`` points ``datasets`` at ``data/*.parquet``).

    ``num_bytes``: uncompressed size of the rows (parquet row-group sizes); ``download_size``: file sizes.
    """
    return {
        "license": license_id,
        "task_categories": ["text-to-image"],
        "tags": ["preference", "mapo", settings.preset, "synthetic", "prefopt"],
        "size_categories": [size_category(num_pairs)],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": DATA_GLOB}]}],
        "dataset_info": {
            "features": [{"name": f.name, "dtype": _HF_DTYPES[f.type]} for f in REGENERATED_SCHEMA],
            "splits": [{"name": "train", "num_bytes": num_bytes, "num_examples": num_pairs}],
            "download_size": download_size,
            "dataset_size": num_bytes,
        },
    }


def _shard_sizes(output_dir: Path) -> tuple[int, int]:
    """``(uncompressed row bytes, file bytes)`` of the shards in ``output_dir/data``."""
    num_bytes = download = 0
    for f in sorted((output_dir / DATA_DIR).glob("part-*.parquet")):
        meta = pq.ParquetFile(f).metadata
        num_bytes += sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        download += f.stat().st_size
    return num_bytes, download


def _md(text: str) -> str:
    """Escape a value for a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def write_dataset_card(
    output_dir: str | Path,
    settings: RegenerateSettings,
    specs: list[PairSpec],
    *,
    prompt_source: str = "",
    command: str = "",
    license_id: str = DEFAULT_LICENSE,
) -> Path:
    """Write ``README.md`` (YAML front matter + description) atomically; return its path."""
    output_dir = Path(output_dir)
    preset = get_preset(settings.preset)
    num_bytes, download = _shard_sizes(output_dir)
    meta = yaml.safe_dump(
        card_metadata(settings, len(specs), license_id, num_bytes, download), sort_keys=False
    )
    examples = "\n".join(
        f"| {p.prompt_index} | {_md(p.caption)} | {_md(p.chosen_prompt)} | {_md(p.rejected_prompt)} | {p.seed} |"
        for p in specs[:5]
    )
    safety = (
        f"\nUnsafe descriptors (`{{unsafe}}`, row with seed `s` gets `[s % {len(SAFETY_DESCRIPTORS)}]`): "
        + ", ".join(f"`{d}`" for d in SAFETY_DESCRIPTORS)
        + "\n"
        if "{unsafe}" in settings.chosen_template + settings.rejected_template
        else ""
    )
    body = f"""# {settings.preset}: MaPO-style preference pairs generated with {settings.base_model}

{preset.description} The `caption` column holds the *context prompt* (no style), so training on these
pairs (e.g. with MaPO, arXiv:2406.06424) teaches the model the chosen behaviour without being asked for it.

- pairs: {len(specs)} ({len(_chunks(specs, settings.rows_per_shard))} shard(s) in `{DATA_GLOB}`)
- base model: `{settings.base_model}` (family `{settings.family}`, {settings.dtype})
- prompts: {prompt_source or "given by the caller"}
- chosen prompt template: `{settings.chosen_template}`
- rejected prompt template: `{settings.rejected_template}`
- generation: {settings.num_inference_steps} steps, guidance scale {settings.guidance_scale},
  {settings.resolution}x{settings.resolution} px, JPEG quality {settings.jpeg_quality}
- seeds: pair `i` uses seed `{settings.seed} * {SEED_STRIDE} + i` for *both* images (same initial noise:
  the prompt is the only difference)
{safety}
## Columns

`caption` (context prompt), `jpg_0` (chosen image, JPEG), `jpg_1` (rejected image), `label_0` = 1,
`label_1` = 0 (int64, the MaPO convention; readers should use the labels, not the side), and provenance:
`prompt_index`, `chosen_prompt`, `rejected_prompt`, `seed`, `base_model`, `preset`, `num_inference_steps`,
`guidance_scale`.

## Examples

| # | caption | chosen prompt | rejected prompt | seed |
|---|---|---|---|---|
{examples}

## How it was produced

```bash
{command or "prefopt regenerate CONFIG"}
```

Generated by prefopt's `pipelines.regenerate` (Ray Data actor pool, one shard per chunk of
{settings.rows_per_shard} prompts, resumable: rerunning the command finishes an interrupted run).

## Usage

```python
import datasets
ds = datasets.load_dataset("parquet", data_files="{output_dir / DATA_GLOB}", split="train")
```

As the source of a latent cache for training (Pick-a-Pic schema, chosen first after canonicalisation):

```bash
prefopt cache CONFIG data.source={output_dir}
prefopt train CONFIG data.source={output_dir} loss.name=mapo reference.strategy=none
```
"""
    path = output_dir / CARD
    _atomic_write_bytes(f"---\n{meta}---\n\n{body}".encode(), path)
    return path


def read_card_metadata(path: str | Path) -> dict[str, Any]:
    """Parse the YAML front matter of a dataset card (``---`` ... ``---``); raise if there is none."""
    text = Path(path).read_text(encoding="utf-8")
    if not text.startswith("---\n") or "\n---\n" not in text[4:]:
        raise ValueError(f"{path} has no YAML front matter (--- ... ---)")
    meta = yaml.safe_load(text[4 : text.index("\n---\n", 4)])
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: front matter is not a mapping")
    return meta
