"""The pretrained pipeline a command starts from: a local diffusers directory, or one built on demand.

``model.pretrained``: a local pipeline directory (used as is); ``tiny`` / ``tiny:<preset>`` (an offline random
tiny pipeline built under ``<workdir>/base_model``); ``toy-base`` (the toy testbed's trained SD3 shipped in
``pipelines/assets/toy_base``, used after its sha256 manifest checks out); ``toy-base:rebuild`` (the same
recipe retrained under ``<workdir>/base_model``, reused once built).
"""

from __future__ import annotations

from pathlib import Path

from prefopt_core.config import TOY_BASE, TOY_BASE_REBUILD, ConfigError, RunConfig


def prepare_base_model(cfg: RunConfig) -> Path:
    """The pretrained pipeline directory of ``cfg``, building it first where ``model.pretrained`` asks for a
    built one. Raises :class:`ConfigError` (with the fix) when a path is not a diffusers pipeline, and its
    subclass ``ManifestError`` when a shipped toy-base file fails its hash check."""
    if cfg.model.pretrained == TOY_BASE:
        from pipelines.toy_base_asset import shipped_base

        return shipped_base()
    if cfg.model.pretrained == TOY_BASE_REBUILD:
        from pipelines.toy_base import build_toy_base

        return build_toy_base(cfg.base_model_dir, seed=cfg.run.seed)
    if cfg.tiny_preset is not None:
        from prefopt_core.models.tiny import make_tiny_pipeline

        return make_tiny_pipeline(
            cfg.base_model_dir,
            family=cfg.model.family,
            preset=cfg.tiny_preset,
            seed=cfg.run.seed,
            resolution=cfg.model.resolution,
        )
    path = cfg.base_model_dir
    if not (path / "model_index.json").exists():
        raise ConfigError(
            f"model.pretrained={cfg.model.pretrained!r} is not a local diffusers pipeline directory; download it "
            "first (e.g. `huggingface-cli download <id> --local-dir DIR`) and pass the directory"
        )
    return path
