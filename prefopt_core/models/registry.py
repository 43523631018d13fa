"""The adapter of each model family, by name: the one module that imports every family.

Usage::

    adapter = adapter_for(cfg.model, "path/to/pipeline")          # from a ModelSection-like object
    adapter = get_adapter("sd3", "path/to/pipeline", max_sequence_length=77)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefopt_core.models.base import FAMILIES, ModelAdapter
from prefopt_core.models.sd3 import SD3Adapter
from prefopt_core.models.sd15 import SD15Adapter
from prefopt_core.models.sdxl import SDXLAdapter
from prefopt_core.storage import local_path

#: Adapter class of every family in :data:`prefopt_core.models.base.FAMILIES`.
ADAPTERS: dict[str, type] = {"sd3": SD3Adapter, "sdxl": SDXLAdapter, "sd15": SD15Adapter}


def adapter_kwargs(
    family: str,
    *,
    dtype: str = "fp32",
    max_sequence_length: int = 256,
    prediction_type: str | None = None,
    micro_conditioning: str = "per_image",
) -> dict[str, Any]:
    """The ``get_adapter`` keyword arguments of a model config (one place for every caller)."""
    kwargs: dict[str, Any] = {"dtype": dtype, "prediction_type": prediction_type}
    if family == "sd3":
        kwargs["max_sequence_length"] = max_sequence_length
    if family == "sdxl":
        kwargs["micro_conditioning"] = micro_conditioning
    return kwargs


def adapter_for(model: Any, pretrained: str | Path, **extra: Any) -> ModelAdapter:
    """The adapter of a ``ModelSection``-like object (``family``, ``dtype``, ...) for ``pretrained``."""
    kwargs = adapter_kwargs(
        model.family,
        dtype=model.dtype,
        max_sequence_length=model.max_sequence_length,
        prediction_type=model.prediction_type,
        micro_conditioning=getattr(model, "micro_conditioning", "per_image"),
    )
    return get_adapter(model.family, pretrained, **kwargs, **extra)


def get_adapter(family: str, pretrained: str | Path, **kwargs: Any) -> ModelAdapter:
    """Construct the adapter of ``family`` for the pipeline at ``pretrained`` (a local directory, or an
    object-store one, read from a copy made once per node)."""
    if family not in ADAPTERS:
        raise ValueError(f"unknown model family {family!r}; valid: {', '.join(FAMILIES)}")
    return ADAPTERS[family](local_path(pretrained), **kwargs)  # a bucket copy is read locally
