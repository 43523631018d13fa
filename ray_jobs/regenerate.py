"""``prefopt regenerate CONFIG``: MaPO-style preference pairs from a base pipeline. Also ``python -m
ray_jobs.regenerate``.

    prefopt regenerate configs/regenerate_pick_style.yaml regenerate.preset=pick-safety

Reads the prompts (``regenerate.prompts``: text file or parquet with ``caption``; default: the 24 toy-world
captions, so the command works out of the box), makes sure the base model exists (``model.pretrained``,
``tiny`` builds the offline tiny model), runs :func:`pipelines.regenerate.generate_dataset` on Ray into
``regenerate.output_dir`` (default ``<workdir>/regenerated/<preset>``), stores the resolved config next
to the data (the dataset card's reproduction command) and writes ``<workdir>/regenerate_summary.json``.
Rerunning the same command finishes an interrupted run. The output is a ``data.source`` for
``prefopt cache``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

from prefopt_core.config import RunConfig
from prefopt_core.storage import Location

logger = logging.getLogger(__name__)

#: The resolved config, stored in the output directory: ``prefopt regenerate <output_dir>/<this>``.
CONFIG_NAME = "prefopt_regenerate.yaml"


def output_dir(cfg: RunConfig) -> Location:
    """``regenerate.output_dir``, or ``<workdir>/regenerated/<preset>`` (local or object storage)."""
    if cfg.regenerate.output_dir:
        return Location(cfg.regenerate.output_dir)
    return cfg.workdir / "regenerated" / cfg.regenerate.preset


def resolve_prompts(cfg: RunConfig) -> tuple[list[str], str]:
    """``(prompts, description of their source)``; toy-world captions when ``regenerate.prompts`` is None."""
    from pipelines.prompts import load_prompts, toy_world_prompts

    r = cfg.regenerate
    if r.prompts:
        path = Path(r.prompts).expanduser().resolve()
        prompts, source = load_prompts(path, r.num_prompts), f"`{path}`"
    else:
        prompts = toy_world_prompts()[: r.num_prompts]
        source = f"the first {len(prompts)} toy-world captions (`pipelines.regenerate.toy_world_prompts`)"
    if r.pairs_per_prompt > 1:  # the prompt list repeated: every row still gets its own seed
        prompts = prompts * r.pairs_per_prompt
        source += f", each {r.pairs_per_prompt} times (one pair per seed)"
    return prompts, source


def regenerate_settings(cfg: RunConfig, base_model_dir: Path):
    """The :class:`pipelines.regenerate.RegenerateSettings` of a run (templates validated)."""
    from pipelines.regenerate_plan import RegenerateSettings, resolve_templates

    r = cfg.regenerate
    chosen, rejected = resolve_templates(r.preset, r.chosen_template, r.rejected_template, r.rejected_prefix)
    return RegenerateSettings(
        preset=r.preset,
        chosen_template=chosen,
        rejected_template=rejected,
        family=cfg.model.family,
        base_model=cfg.model.pretrained,
        base_model_dir=str(base_model_dir),
        resolution=cfg.model.resolution,
        num_inference_steps=r.num_inference_steps,
        guidance_scale=r.guidance_scale,
        seed=cfg.run.seed,
        dtype=cfg.model.dtype,
        batch_size=r.batch_size,
        rows_per_shard=r.rows_per_shard,
        jpeg_quality=r.jpeg_quality,
        max_sequence_length=cfg.model.max_sequence_length,
    )


def _resolved_config(cfg: RunConfig, out: Path) -> str:
    """The config with absolute workdir / output_dir / prompts, so it reruns the same from anywhere."""
    data = cfg.to_dict()
    data["run"]["workdir"] = str(cfg.workdir)
    data["regenerate"]["output_dir"] = str(out)
    if cfg.regenerate.prompts:
        data["regenerate"]["prompts"] = str(Path(cfg.regenerate.prompts).expanduser().resolve())
    header = "# Resolved config of this dataset; rerun (resumes, or no-op when complete) with:\n"
    return header + f"#   prefopt regenerate {out / CONFIG_NAME}\n" + yaml.safe_dump(data, sort_keys=False)


def run_regenerate(cfg: RunConfig) -> dict:
    """Generate (or finish) the preference dataset of ``cfg``; returns (and writes) the summary."""
    from pipelines.base_model import prepare_base_model
    from pipelines.regenerate import generate_dataset
    from pipelines.regenerate_plan import resolve_templates
    from ray_jobs.cluster import ensure_ray

    r = cfg.regenerate
    resolve_templates(r.preset, r.chosen_template, r.rejected_template, r.rejected_prefix)  # fail fast
    prompts, prompt_source = resolve_prompts(cfg)
    ensure_ray(cfg)
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    base = prepare_base_model(cfg)
    out = output_dir(cfg)
    settings = regenerate_settings(cfg, base)
    result = generate_dataset(
        prompts,
        output_dir=out,
        settings=settings,
        num_actors=r.num_actors,
        cpus_per_actor=r.cpus_per_actor,
        license_id=r.license,
        prompt_source=prompt_source,
        command=f"prefopt regenerate {out / CONFIG_NAME}",
    )
    (out / CONFIG_NAME).write_text(_resolved_config(cfg, out))
    summary = {
        **result,
        "preset": r.preset,
        "base_model": cfg.model.pretrained,
        "base_model_dir": str(base),
        "cache_source": f"prefopt cache CONFIG data.source={out}",
    }
    (cfg.workdir / "regenerate_summary.json").write_text(json.dumps(summary, indent=1))
    logger.info("regenerated %d %s pairs in %s", result["num_pairs"], r.preset, out)
    return summary
