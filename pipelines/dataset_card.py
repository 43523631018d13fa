"""The Hugging Face dataset card (``README.md``) of a regenerated dataset: YAML front matter that points
``datasets`` at ``data/*.parquet``, then how the pairs were made and how to use them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml

from pipelines.regenerate_plan import (
    CARD,
    DATA_DIR,
    DATA_GLOB,
    DEFAULT_LICENSE,
    REGENERATED_SCHEMA,
    SAFETY_DESCRIPTORS,
    SECOND_SEED_OFFSET,
    SEED_STRIDE,
    PairSpec,
    RegenerateSettings,
    get_preset,
)
from pipelines.sharded_build import atomic_write_bytes, parquet_metadata
from prefopt_core.storage import Location, location

_HF_DTYPES = {
    pa.string(): "string",
    pa.binary(): "binary",
    pa.int64(): "int64",
    pa.float64(): "float64",
    pa.bool_(): "bool",
}


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


def _shard_sizes(output_dir: Location) -> tuple[int, int]:
    """``(uncompressed row bytes, file bytes)`` of the shards in ``output_dir/data``."""
    num_bytes = download = 0
    for f in (output_dir / DATA_DIR).glob("part-*.parquet"):
        meta = parquet_metadata(f)
        num_bytes += sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        download += f.size()
    return num_bytes, download


def _md(text: str) -> str:
    """Escape a value for a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def write_dataset_card(
    output_dir: str | Path | Location,
    settings: RegenerateSettings,
    specs: list[PairSpec],
    *,
    prompt_source: str = "",
    command: str = "",
    license_id: str = DEFAULT_LICENSE,
) -> Location:
    """Write ``README.md`` (YAML front matter + description) atomically; return its path."""
    output_dir = location(output_dir)
    num_bytes, download = _shard_sizes(output_dir)
    meta = yaml.safe_dump(
        card_metadata(settings, len(specs), license_id, num_bytes, download), sort_keys=False
    )
    body = _card_body(output_dir, settings, specs, prompt_source=prompt_source, command=command)
    path = output_dir / CARD
    atomic_write_bytes(f"---\n{meta}---\n\n{body}".encode(), path)
    return path


def _card_body(
    output_dir: Location,
    settings: RegenerateSettings,
    specs: list[PairSpec],
    *,
    prompt_source: str,
    command: str,
) -> str:
    """The markdown of the card below its front matter."""
    preset = get_preset(settings.preset)
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

- pairs: {len(specs)} ({math.ceil(len(specs) / settings.rows_per_shard)} shard(s) in `{DATA_GLOB}`)
- base model: `{settings.base_model}` (family `{settings.family}`, {settings.dtype})
- prompts: {prompt_source or "given by the caller"}
- chosen prompt template: `{settings.chosen_template}`
- rejected prompt template: `{settings.rejected_template}`
- generation: {settings.num_inference_steps} steps, guidance scale {settings.guidance_scale},
  {settings.resolution}x{settings.resolution} px, JPEG quality {settings.jpeg_quality}
{_seeds_and_labels(settings)}
{safety}
## Columns

`caption` (context prompt), `jpg_0` and `jpg_1` (JPEG), `label_0` and `label_1` (float64 as in Pick-a-Pic:
1 / 0 names the chosen image, 0.5 / 0.5 a tie; readers should use the labels, not the side), and provenance:
`prompt_index`, `chosen_prompt`, `rejected_prompt`, `seed`, `seed_1`, `score_0`, `score_1`, `label_flipped`,
`base_model`, `preset`, `num_inference_steps`, `guidance_scale`.

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
    return body


def _seeds_and_labels(settings: RegenerateSettings) -> str:
    """The card's bullet on seeds and labels (template presets vs seed-paired ones)."""
    base = f"pair `i` uses seed `{settings.seed} * {SEED_STRIDE} + i`"
    labels = get_preset(settings.preset).labels
    if labels is None:
        return (
            f"- seeds: {base} for *both* images (same initial noise: the prompt is the only difference);\n"
            "  `jpg_0` is always the chosen image (label 1)"
        )
    return (
        f"- seeds: {base} for `jpg_0` and that seed + {SECOND_SEED_OFFSET} for `jpg_1` (same prompt)\n"
        f"- labels: the image `{labels.scorer}` scores higher is chosen; scores within {labels.tie_margin} "
        f"are ties (0.5 / 0.5, dropped by `prefopt cache`); one row in every {labels.flip_block} consecutive "
        "prompt indices has its labels flipped on purpose (`label_flipped`)"
    )


def read_card_metadata(path: str | Path) -> dict[str, Any]:
    """Parse the YAML front matter of a dataset card (``---`` ... ``---``); raise if there is none."""
    text = Path(path).read_text(encoding="utf-8")
    if not text.startswith("---\n") or "\n---\n" not in text[4:]:
        raise ValueError(f"{path} has no YAML front matter (--- ... ---)")
    meta = yaml.safe_load(text[4 : text.index("\n---\n", 4)])
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: front matter is not a mapping")
    return meta
