"""The scorer interface every reward / evaluation scorer implements, and the input check they share.

A scorer has a ``name`` and ``score(images, prompts) -> (N,) float32 tensor`` (higher = better); the registry
that builds scorers by name is :func:`pipelines.rewards.build_scorer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from PIL import Image


@runtime_checkable
class Scorer(Protocol):
    """Anything with a ``name`` and ``score(images, prompts) -> (N,) float32 tensor`` (higher = better)."""

    name: str

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor: ...


def check_inputs(images: Sequence[Image.Image], prompts: Sequence[str] | None) -> None:
    """Raise loudly on non-PIL images or an images/prompts length mismatch (``prompts=None`` skips that check)."""
    for i, img in enumerate(images):
        if not isinstance(img, Image.Image):
            raise TypeError(f"images[{i}] must be a PIL.Image.Image, got {type(img).__name__}")
    if prompts is not None:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, got a single str")
        if len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; they are scored pairwise")
