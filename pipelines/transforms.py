"""Image bytes -> model pixels for a preference pair, with the geometry SDXL micro-conditioning needs.

Pure numpy / PIL (no Ray, no torch). ``pipelines.latent_cache`` calls, per validated pair::

    rng = schema.pair_rng(seed, pair_id, "transform")
    pix = transform_pair(jpg_w, jpg_l, TransformConfig(resolution=1024, crop="random", random_flip=True), rng)
    pix.w, pix.l                      # (3, R, R) float32 in [-1, 1], RGB, CHW
    pix.original_size_w, pix.crop_top_left  # SDXL add_time_ids: original (h, w), crop (top, left), target (R, R)

Per image (as diffusers' SDXL training scripts): EXIF orientation applied, convert to RGB (alpha dropped),
shorter side resized to R with the longer side ``floor(R * long / short)`` (torchvision ``Resize``), an
R x R crop, an optional horizontal flip. The resize and crop happen in one Pillow call
(``Image.resize(size, box=...)``: the crop box mapped back to source pixels), which gives the pixels of
resize-then-crop without materialising the resized image -- a 8 x 4000 image is never blown up to
1024 x 512000.

A pair shares one crop position and one flip: the crop of the chosen image is drawn (or centred), and the
rejected image is cropped at the same *relative* position ``u = offset / (resized - R)`` (per axis,
rounded); for two images of the same size that is the same offset. ``crop_top_left`` is the chosen
image's crop, ``crop_top_left_l`` the rejected one's (equal when sizes match). Crop coordinates are in
the resized image and describe the pixels taken *before* the flip.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
from PIL import Image, ImageOps

CropMode = Literal["center", "random"]
Interpolation = Literal["bilinear", "bicubic", "lanczos"]
CROP_MODES: tuple[str, ...] = get_args(CropMode)
INTERPOLATIONS: tuple[str, ...] = get_args(Interpolation)
_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class TransformConfig:
    """``resolution``: output side R; ``crop``: "center" | "random" (offsets from the caller's rng);
    ``random_flip``: one shared horizontal flip with probability 0.5; ``interpolation``: Pillow filter
    (antialiased when downscaling)."""

    resolution: int
    crop: CropMode = "center"
    random_flip: bool = False
    interpolation: Interpolation = "bicubic"

    def __post_init__(self) -> None:
        if int(self.resolution) != self.resolution or self.resolution < 1:
            raise ValueError(f"resolution must be a positive integer, got {self.resolution!r}")
        if self.crop not in CROP_MODES:
            raise ValueError(f"crop must be one of {CROP_MODES}, got {self.crop!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")


@dataclass(frozen=True, eq=False)
class PairPixels:
    """Model-ready pixels of one pair (chosen ``w``, rejected ``l``) and their geometry."""

    w: np.ndarray  # (3, R, R) float32 in [-1, 1], RGB
    l: np.ndarray  # noqa: E741 -- (3, R, R) float32 in [-1, 1], RGB
    original_size_w: tuple[int, int]  # (height, width) of the decoded chosen image
    original_size_l: tuple[int, int]  # (height, width) of the decoded rejected image
    crop_top_left: tuple[int, int]  # (top, left) of the chosen image's crop in its resized image
    crop_top_left_l: tuple[int, int]  # (top, left) of the rejected image's crop in its resized image
    flipped: bool  # both images mirrored left-right after the crop


def load_rgb(data: bytes) -> Image.Image:
    """Decode image bytes, apply the EXIF orientation, convert to RGB (alpha dropped)."""
    image = Image.open(io.BytesIO(data))
    image = ImageOps.exif_transpose(image)
    return image.convert("RGB")


def resized_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """(height, width) after resizing the shorter side to R: the longer becomes floor(R * long / short).

    60 (w) x 40 (h) at R=20 -> (20, 30); 40 x 60 -> (30, 20); 100 x 100 -> (20, 20).
    """
    if height <= width:
        return resolution, resolution * width // height
    return resolution * height // width, resolution


def _offset(fraction: float, slack: int) -> int:
    """Offset at relative position ``fraction`` in [0, 1] of ``slack`` free pixels (half to even)."""
    return round(fraction * slack)


def _fraction(offset: int, slack: int) -> float:
    return offset / slack if slack > 0 else 0.5


def _draw_chosen_crop(
    resized_hw: tuple[int, int], cfg: TransformConfig, rng: np.random.Generator
) -> tuple[int, int]:
    """(top, left) of the chosen image's crop: centred, or uniform over every valid offset.

    Draw order (fixed, for determinism): top, then left -- both always drawn when crop="random".
    """
    slack_h, slack_w = resized_hw[0] - cfg.resolution, resized_hw[1] - cfg.resolution
    if cfg.crop == "center":
        return _offset(0.5, slack_h), _offset(0.5, slack_w)
    return int(rng.integers(0, slack_h + 1)), int(rng.integers(0, slack_w + 1))


def _resize_crop(
    image: Image.Image, resized_hw: tuple[int, int], top_left: tuple[int, int], cfg: TransformConfig
) -> Image.Image:
    """The R x R crop at ``top_left`` of ``image`` resized to ``resized_hw``, in one resampling pass."""
    (top, left), r = top_left, cfg.resolution
    scale_y, scale_x = image.height / resized_hw[0], image.width / resized_hw[1]
    box = (left * scale_x, top * scale_y, (left + r) * scale_x, (top + r) * scale_y)
    return image.resize((r, r), _RESAMPLE[cfg.interpolation], box=box)


def _to_chw(image: Image.Image, flip: bool) -> np.ndarray:
    """RGB image (R, R) -> (3, R, R) float32 in [-1, 1], mirrored left-right when ``flip``."""
    hwc = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (R, R, 3)
    if flip:
        hwc = hwc[:, ::-1, :]
    return np.ascontiguousarray(hwc.transpose(2, 0, 1))  # (3, R, R)


def transform_pair(jpg_w: bytes, jpg_l: bytes, cfg: TransformConfig, rng: np.random.Generator) -> PairPixels:
    """Decode, resize, crop and (maybe) flip both images of a pair with shared random choices.

    ``rng`` is drawn from in a fixed order -- crop top, crop left (crop="random" only), then the flip
    (random_flip only) -- so a generator seeded from (seed, pair_id) gives reproducible pixels.
    """
    images = load_rgb(jpg_w), load_rgb(jpg_l)
    sizes = [(im.height, im.width) for im in images]
    resized = [resized_size(h, w, cfg.resolution) for h, w in sizes]
    top_w, left_w = _draw_chosen_crop(resized[0], cfg, rng)
    slack = [(rh - cfg.resolution, rw - cfg.resolution) for rh, rw in resized]
    u_top, u_left = _fraction(top_w, slack[0][0]), _fraction(left_w, slack[0][1])
    crop_l = (_offset(u_top, slack[1][0]), _offset(u_left, slack[1][1]))
    flipped = bool(cfg.random_flip and rng.random() < 0.5)
    crops = [(top_w, left_w), crop_l]
    pix_w, pix_l = (
        _to_chw(_resize_crop(im, hw, tl, cfg), flipped) for im, hw, tl in zip(images, resized, crops)
    )
    return PairPixels(
        w=pix_w,
        l=pix_l,
        original_size_w=sizes[0],
        original_size_l=sizes[1],
        crop_top_left=crops[0],
        crop_top_left_l=crops[1],
        flipped=flipped,
    )


def to_pil(chw: np.ndarray) -> Image.Image:
    """Inverse of the pixel mapping, for debugging: (3, H, W) in [-1, 1] -> RGB PIL image."""
    if chw.ndim != 3 or chw.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) array, got shape {chw.shape}")
    hwc = np.clip(np.rint((np.asarray(chw, dtype=np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(hwc.transpose(1, 2, 0)))  # (H, W, 3) uint8 -> RGB
