"""The pretrained pipeline a command starts from: a diffusers directory, or one built on demand.

``model.pretrained``: a pipeline directory, local or in object storage (used as is; every process that loads
it reads a local copy made once per node, see :func:`prefopt_core.storage.local_path`); ``tiny`` /
``tiny:<preset>`` (an offline random tiny pipeline built under ``<workdir>/base_model``); ``toy-base`` (the
toy testbed's trained SD3 shipped in the package, ``pipelines/assets/toy_base``, used after its sha256
manifest checks out); ``toy-base:rebuild`` (the same recipe retrained under ``<workdir>/base_model``, reused
once built). With a workdir in object storage a built pipeline is made in the node's scratch directory and
uploaded to ``<workdir>/base_model``, where every node finds it.
"""

from __future__ import annotations

from prefopt_core.config import TOY_BASE, TOY_BASE_REBUILD, ConfigError, RunConfig
from prefopt_core.storage import Location


def _build(cfg: RunConfig, local):
    if cfg.model.pretrained == TOY_BASE_REBUILD:
        from pipelines.toy_base import build_toy_base

        return build_toy_base(local, seed=cfg.run.seed)
    from prefopt_core.models.tiny import make_tiny_pipeline

    return make_tiny_pipeline(
        local,
        family=cfg.model.family,
        preset=cfg.tiny_preset,
        seed=cfg.run.seed,
        resolution=cfg.model.resolution,
    )


def prepare_base_model(cfg: RunConfig) -> Location:
    """The pretrained pipeline directory of ``cfg``, building it first where ``model.pretrained`` asks for a
    built one. Raises :class:`ConfigError` (with the fix) when a path is not a diffusers pipeline, and its
    subclass ``ManifestError`` (naming the file) when a shipped toy-base file fails its hash check."""
    if cfg.model.pretrained == TOY_BASE:
        from pipelines.toy_base_asset import shipped_base

        return Location(shipped_base())
    target = cfg.base_model_dir
    if cfg.model.pretrained == TOY_BASE_REBUILD or cfg.tiny_preset is not None:
        if target.is_local:
            return Location(_build(cfg, target.local))
        if not (target / "model_index.json").exists():
            target.upload_dir(_build(cfg, cfg.scratch_dir / "base_model"))
        return target
    path = target
    if not (path / "model_index.json").exists():
        raise ConfigError(
            f"model.pretrained={cfg.model.pretrained!r} is not a diffusers pipeline directory; download it "
            "first (e.g. `huggingface-cli download <id> --local-dir DIR`) and pass the directory (or its "
            "copy in object storage)"
        )
    return path
