"""Tests of pipelines.transforms: pixel ranges, resize/crop geometry, shared crop and flip, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines.schema import pair_rng
from pipelines.transforms import TransformConfig, resized_size, to_pil, transform_pair
from tests._corpus import encode, make_image, make_jpeg


def png(image: Image.Image) -> bytes:
    return encode(image, "PNG")  # lossless, so pixel values can be checked exactly


def column_stripes(width: int, height: int) -> Image.Image:
    """RGB image whose red channel at column x is 4 * x (so a crop's left edge can be read back)."""
    hwc = np.zeros((height, width, 3), dtype=np.uint8)  # (H, W, 3)
    hwc[..., 0] = (4 * np.arange(width)).astype(np.uint8)[None, :]
    hwc[..., 1] = 128
    return Image.fromarray(hwc)


def test_shapes_dtype_range_and_to_pil():
    cfg = TransformConfig(resolution=32)
    pix = transform_pair(make_jpeg(1, (50, 40)), make_jpeg(2, (40, 50)), cfg, np.random.default_rng(0))
    for arr in (pix.w, pix.l):
        assert arr.shape == (3, 32, 32) and arr.dtype == np.float32
        assert arr.min() >= -1.0 and arr.max() <= 1.0 and arr.flags.c_contiguous
    assert pix.original_size_w == (40, 50) and pix.original_size_l == (50, 40)
    assert pix.flipped is False
    image = to_pil(pix.w)
    assert image.size == (32, 32) and image.mode == "RGB"
    back = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0  # (3, R, R)
    np.testing.assert_allclose(back, pix.w, atol=1 / 127.5)


def test_center_crop_geometry_hand_worked():
    """60 (w) x 40 (h) image at R = 20.

    Shorter side is the height: scale = 20 / 40 = 0.5, so the resized image is 30 (w) x 20 (h)
    (longer side floor(20 * 60 / 40) = 30). Centre crop of 20 x 20: top = round((20 - 20) / 2) = 0,
    left = round((30 - 20) / 2) = 5. Crop columns 5..24 of the resized image are columns 10..49 of the
    source. original_size is (h, w) = (40, 60).
    """
    assert resized_size(40, 60, 20) == (20, 30)
    assert resized_size(60, 40, 20) == (30, 20)
    assert resized_size(53, 97, 20) == (20, 36)  # floor(20 * 97 / 53) = floor(36.6)
    source = column_stripes(60, 40)
    other = make_image(5, (60, 40))
    pix = transform_pair(png(source), png(other), TransformConfig(resolution=20), np.random.default_rng(0))
    assert pix.original_size_w == (40, 60)
    assert pix.crop_top_left == (0, 5) and pix.crop_top_left_l == (0, 5)
    # same pixels as an explicit resize to 30 x 20 and crop at (left 5, top 0)
    reference = source.resize((30, 20), Image.Resampling.BICUBIC).crop((5, 0, 25, 20))
    np.testing.assert_array_equal(np.asarray(to_pil(pix.w)), np.asarray(reference))
    # red at output column j ~ 4 * (source column 10 + 2j + 0.5) (two source columns per output column)
    red = (pix.w[0].mean(axis=0) + 1.0) * 127.5
    np.testing.assert_allclose(red[2:-2], 4 * (10 + 2 * np.arange(20) + 0.5)[2:-2], atol=1.0)


def test_portrait_center_crop():
    """40 (w) x 60 (h) at R = 20 -> resized 20 x 30, top = round(10 / 2) = 5, left = 0."""
    pix = transform_pair(
        make_jpeg(1, (40, 60)), make_jpeg(2, (40, 60)), TransformConfig(20), np.random.default_rng(0)
    )
    assert pix.crop_top_left == (5, 0)


def test_flip_is_shared_by_both_images():
    jpg_w, jpg_l = png(column_stripes(60, 40)), png(make_image(9, (60, 40)))
    plain = transform_pair(jpg_w, jpg_l, TransformConfig(20), np.random.default_rng(0))
    flips = []
    for seed in range(16):
        pix = transform_pair(jpg_w, jpg_l, TransformConfig(20, random_flip=True), np.random.default_rng(seed))
        flips.append(pix.flipped)
        if pix.flipped:
            np.testing.assert_array_equal(pix.w, plain.w[:, :, ::-1])
            np.testing.assert_array_equal(pix.l, plain.l[:, :, ::-1])
        else:
            np.testing.assert_array_equal(pix.w, plain.w)
            np.testing.assert_array_equal(pix.l, plain.l)
        assert pix.crop_top_left == plain.crop_top_left  # crop coordinates are pre-flip
    assert any(flips) and not all(flips)


def test_random_crop_is_deterministic_and_shared():
    jpg_w, jpg_l = make_jpeg(1, (64, 40)), make_jpeg(2, (64, 40))
    cfg = TransformConfig(16, crop="random", random_flip=True)
    a = transform_pair(jpg_w, jpg_l, cfg, pair_rng(0, "abc:1", "transform"))
    b = transform_pair(jpg_w, jpg_l, cfg, pair_rng(0, "abc:1", "transform"))
    np.testing.assert_array_equal(a.w, b.w)
    np.testing.assert_array_equal(a.l, b.l)
    assert (a.crop_top_left, a.flipped) == (b.crop_top_left, b.flipped)
    # resized 25 (w) x 16 (h): top is always 0, left in [0, 9], same for both images of equal size
    crops = set()
    for seed in range(40):
        pix = transform_pair(jpg_w, jpg_l, cfg, np.random.default_rng(seed))
        assert pix.crop_top_left == pix.crop_top_left_l
        assert pix.crop_top_left[0] == 0 and 0 <= pix.crop_top_left[1] <= 9
        crops.add(pix.crop_top_left)
    assert len(crops) > 3


def test_different_sizes_share_relative_crop_position():
    """Chosen 80 x 40 -> resized 40 x 20 (slack 20); rejected 60 x 40 -> resized 30 x 20 (slack 10).
    A chosen left offset of 2k puts the rejected crop at round(2k / 20 * 10) = k."""
    jpg_w, jpg_l = make_jpeg(1, (80, 40)), make_jpeg(2, (60, 40))
    centre = transform_pair(jpg_w, jpg_l, TransformConfig(20), np.random.default_rng(0))
    assert centre.crop_top_left == (0, 10) and centre.crop_top_left_l == (0, 5)
    cfg = TransformConfig(20, crop="random")
    for seed in range(20):
        pix = transform_pair(jpg_w, jpg_l, cfg, np.random.default_rng(seed))
        left_w, left_l = pix.crop_top_left[1], pix.crop_top_left_l[1]
        assert left_l == round(left_w / 20 * 10)


def test_modes_are_converted_to_rgb():
    gray = encode(make_image(1, 30).convert("L"), "PNG")
    rgba = encode(make_image(2, 30).convert("RGBA"), "PNG")
    pix = transform_pair(gray, rgba, TransformConfig(24), np.random.default_rng(0))
    assert pix.w.shape == pix.l.shape == (3, 24, 24)
    np.testing.assert_array_equal(pix.w[0], pix.w[1])  # gray: R == G


def test_config_errors_list_valid_options():
    with pytest.raises(ValueError, match=r"crop must be one of \('center', 'random'\)"):
        TransformConfig(16, crop="top")
    with pytest.raises(ValueError, match="interpolation must be one of"):
        TransformConfig(16, interpolation="nearest")
    with pytest.raises(ValueError, match="resolution"):
        TransformConfig(0)
