"""The shipped toy base (``pipelines/assets/toy_base``): its manifest, the hash check, what it draws.

Run: ``.venv/bin/pytest tests/test_toy_base_asset.py -q``.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from pipelines.base_model import prepare_base_model
from pipelines.toy_base_asset import MANIFEST, SHIPPED_DIR, ManifestError, sha256_file, verify_manifest
from pipelines.toy_prompts import heldout_prompts
from pipelines.toy_sampling import EVAL_SETTINGS, load_base, measure_base
from prefopt_core.config import load_config

os.environ["HF_HUB_OFFLINE"] = "1"


def test_manifest_lists_every_shipped_file_with_its_sha256():
    """Every file but the manifest is listed, with the sha256 of its bytes; the rebuild command is recorded."""
    manifest = json.loads((SHIPPED_DIR / MANIFEST).read_text())
    on_disk = sorted(
        p.relative_to(SHIPPED_DIR).as_posix()
        for p in SHIPPED_DIR.rglob("*")
        if p.is_file() and p.name != MANIFEST
    )
    assert sorted(manifest["files"]) == on_disk
    assert manifest["files"]["transformer/diffusion_pytorch_model.safetensors"] == sha256_file(
        SHIPPED_DIR / "transformer" / "diffusion_pytorch_model.safetensors"
    )
    assert manifest["rebuild"] == "python -m pipelines.toy_base build pipelines/assets/toy_base --seed 0"
    assert sum(p.stat().st_size for p in SHIPPED_DIR.rglob("*") if p.is_file()) <= 16 * 2**20


def test_a_flipped_byte_fails_the_hash_check_naming_the_file(tmp_path):
    """A copy verifies; flipping one byte in the middle of the VAE weights makes the check fail, naming them."""
    copy = tmp_path / "toy_base"
    shutil.copytree(SHIPPED_DIR, copy)
    assert verify_manifest(copy) == copy
    weights = copy / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(
        ManifestError, match=r"vae/diffusion_pytorch_model\.safetensors does not match its sha256"
    ):
        verify_manifest(copy)


def test_a_missing_file_or_manifest_is_named(tmp_path):
    copy = tmp_path / "toy_base"
    shutil.copytree(SHIPPED_DIR, copy)
    (copy / "transformer" / "config.json").unlink()
    with pytest.raises(ManifestError, match=r"transformer/config\.json is missing"):
        verify_manifest(copy)
    (copy / MANIFEST).unlink()
    with pytest.raises(ManifestError, match=r"has no manifest\.json"):
        verify_manifest(copy)


def test_toy_base_resolves_to_the_verified_shipped_directory(tmp_path):
    cfg = load_config(
        None, [f"run.workdir={tmp_path}", "model.pretrained=toy-base", "model.max_sequence_length=16"]
    )
    assert prepare_base_model(cfg) == SHIPPED_DIR
    assert not (tmp_path / "base_model").exists()  # nothing is built


@pytest.fixture(scope="module")
def reduced_sample() -> dict[str, float]:
    """The shipped base on 4 held-out prompts x 8 seeds with the testbed's sampler settings (plain and style)."""
    return measure_base(load_base(SHIPPED_DIR), prompts=heldout_prompts()[:4], seeds=range(8))


def test_the_shipped_base_draws_the_colour_it_is_asked(reduced_sample):
    """Reduced quality bar for colour and style (32 plain samples). The full bar (8 held-out prompts x 32 seeds) is
    colour >= 0.90 and an outline rate of 0.15-0.35 on plain prompts; here the thresholds sit about two binomial
    standard deviations below it (n = 32: sd ~0.05): colour >= 0.80, outline rate in [0.05, 0.50]. A base that
    draws blobs fails: the earlier 1500-step base named the right colour on 0.4-0.7 of held-out samples, the
    shipped recipe after 1000 steps on 0.44 (guidance 1.0) to 0.63 (guidance 2.5)."""
    assert reduced_sample["plain_color_acc"] >= 0.80, reduced_sample
    assert 0.05 <= reduced_sample["plain_style_rate"] <= 0.50, reduced_sample
    assert reduced_sample["style_style_rate"] >= 0.8, (
        reduced_sample
    )  # the style word still asks for the outline
    assert EVAL_SETTINGS.max_sequence_length == 16


def test_the_shipped_base_draws_the_shape_it_is_asked(reduced_sample):
    """Reduced bar for shape (full bar 0.85, the shipped base measures 0.875 on 256 samples): >= 0.70 on the 32
    plain samples, about two binomial standard deviations below; blobs score near 0 (the rotated-shape base
    that preceded it: 0.35 on 256)."""
    assert reduced_sample["plain_shape_acc"] >= 0.70, reduced_sample
