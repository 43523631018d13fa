"""Tests for the toy world's captions, the toy base builder and its sampling (``pipelines.toy_prompts``,
``pipelines.toy_base``, ``pipelines.toy_sampling``).

The builder runs end-to-end with tiny step counts (the measured style rates of a full-size base are reported
by ``python -m benchmarks.toy_style``, not asserted here). Run: ``.venv/bin/pytest tests/test_toy_base.py -q``.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from pipelines.fidelity import color_accuracy, dominant_color, nearest_color_name
from pipelines.toy_base import ToyBaseConfig, build_toy_base, sample_sigmas
from pipelines.toy_prompts import (
    ALL_COMBOS,
    HELDOUT_COMBOS,
    TRAIN_COMBOS,
    VALIDATION_COMBOS,
    ToyWorldSpec,
    heldout_prompts,
    prompt_color,
    sample_dataset,
    style_prompt,
    train_prompts,
    validation_prompts,
)
from pipelines.toy_sampling import SamplerSettings, generate, load_base, measure_base, style_rate
from pipelines.toy_world import SHAPES, TOY_COLORS, draw_toy_image, plain_prompt

os.environ["HF_HUB_OFFLINE"] = "1"

TINY = ToyBaseConfig(
    vae_images=16, vae_steps=2, vae_batch_size=4, train_images=32, steps=3, batch_size=4, warmup_steps=1
)


# ------------------------------------------------------------------------------------------------ world


def test_captions_and_holdouts_by_hand():
    assert heldout_prompts() == [
        "a red circle",
        "a green square",
        "a blue triangle",
        "a yellow circle",
        "a orange square",
        "a purple triangle",
        "a cyan circle",
        "a pink square",
    ]
    # validation: colour i, shape (i + 1) mod 3 for red, green, blue, yellow
    assert validation_prompts() == ["a red square", "a green triangle", "a blue circle", "a yellow square"]
    assert train_prompts()[:3] == ["a red triangle", "a green circle", "a blue square"]
    assert len(TRAIN_COMBOS) == 12 and not set(TRAIN_COMBOS) & (set(HELDOUT_COMBOS) | set(VALIDATION_COMBOS))
    assert set(TRAIN_COMBOS) | set(HELDOUT_COMBOS) | set(VALIDATION_COMBOS) == set(ALL_COMBOS)
    assert len(ALL_COMBOS) == 24
    # every colour and every shape also occurs among the preference-training prompts
    assert {c for c, _ in TRAIN_COMBOS} == set(TOY_COLORS)
    assert {s for _, s in TRAIN_COMBOS} == set(SHAPES)
    assert style_prompt("a red circle") == "disney style. a red circle"
    assert prompt_color("disney style. a pink square") == "pink"
    with pytest.raises(ValueError, match="no toy colour"):
        prompt_color("a circle")


def test_style_words_are_single_tokens_and_captions_fit(tmp_path):
    """Every word of the style phrase is one token; every world caption fits the base's CLIP and T5 windows."""
    from transformers import CLIPTokenizer

    from prefopt_core.models.tokenizer import write_clip_tokenizer

    cfg = ToyBaseConfig()
    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path, model_max_length=cfg.clip_max_length))
    tokens = tok.convert_ids_to_tokens(tok(style_prompt("a red circle")).input_ids)
    assert tokens == [
        "<|startoftext|>",
        "disney</w>",
        "style</w>",
        ".</w>",
        "a</w>",
        "red</w>",
        "circle</w>",
        "<|endoftext|>",
    ]
    longest = max(len(tok(style_prompt(plain_prompt(c, s))).input_ids) for c, s in ALL_COMBOS)
    assert longest <= min(cfg.clip_max_length, cfg.max_sequence_length)


def test_training_distribution_follows_the_spec():
    spec = ToyWorldSpec(p_style=0.25, style_caption_prob=0.3, uncond_prob=0.1, size=32)
    data = sample_dataset(3000, spec, seed=7)
    again = sample_dataset(5, spec, seed=7)
    assert [e.caption for e in again] == [e.caption for e in data[:5]]
    assert all(e.image.size == (32, 32) for e in data[:10])
    styled = [e for e in data if e.caption.startswith("disney style. ")]
    plain = [e for e in data if e.caption and not e.caption.startswith("disney style. ")]
    uncond = [e for e in data if e.caption == ""]
    assert all(e.outline for e in styled)  # the style caption always shows the style
    assert abs(len(styled) / len(data) - 0.3) < 0.03
    assert abs(np.mean([e.outline for e in plain]) - 0.25) < 0.04  # the prior style rate
    assert abs(len(uncond) / (len(data) - len(styled)) - 0.1) < 0.02
    assert abs(np.mean([e.outline for e in uncond]) - 0.25) < 0.1
    assert {(e.color, e.shape) for e in data} == set(ALL_COMBOS)  # the base sees every combination


def test_strict_holdout_variant_never_shows_heldout_combinations():
    data = sample_dataset(500, ToyWorldSpec(include_heldout=False), seed=1)
    assert {(e.color, e.shape) for e in data} == set(ALL_COMBOS) - set(
        HELDOUT_COMBOS
    )  # neither plain nor styled


# ------------------------------------------------------------------------------------------------ colour check


def test_color_check_on_toy_world_images():
    rng = np.random.default_rng(0)
    images, prompts = [], []
    for i in range(96):
        name = list(TOY_COLORS)[i % 8]
        shape = SHAPES[(i // 8) % 3]
        images.append(draw_toy_image(shape, TOY_COLORS[name], i % 2 == 1, 32, rng))
        prompts.append(f"a {name} {shape}")
    plain = color_accuracy(images[0::2], prompts[0::2])
    outlined = color_accuracy(images[1::2], prompts[1::2])
    assert plain == 1.0
    # an outlined 32 px triangle can be all outline (no fill left); everything else is named right
    assert outlined >= 0.85
    # a half-dark orange stays orange (chromaticity, not RGB distance)
    assert nearest_color_name((122.0, 65.0, 15.0)) == "orange"
    assert nearest_color_name(None) is None
    blank = draw_toy_image("circle", TOY_COLORS["red"], False, 32, rng).point(lambda _: 230)
    assert dominant_color(blank) is None
    assert color_accuracy([blank], ["a red circle"]) == 0.0


def test_sigma_sampler_is_shifted_logit_normal():
    g = torch.Generator().manual_seed(0)
    s1 = sample_sigmas(20000, 1.0, g)
    s3 = sample_sigmas(20000, 3.0, torch.Generator().manual_seed(0))
    assert s1.min() > 0 and s1.max() < 1
    assert abs(s1.median().item() - 0.5) < 0.02  # logit-normal(0, 1) has median 0.5
    assert abs(s3.median().item() - 0.75) < 0.02  # shift 3 maps 0.5 to 3 * 0.5 / (1 + 2 * 0.5)


# ------------------------------------------------------------------------------------------------ builder


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    torch.manual_seed(0)
    return build_toy_base(tmp_path_factory.mktemp("toy") / "base", seed=0, config=TINY)


def test_builder_writes_a_loadable_pipeline(tiny_base):
    from diffusers import StableDiffusion3Pipeline

    assert (tiny_base / "model_index.json").exists()
    assert not (tiny_base / "tokenizer_src").exists()
    info = json.loads((tiny_base / "toy_base.json").read_text())
    assert info["config"]["max_sequence_length"] == TINY.max_sequence_length
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_base)  # the plain call, no extra arguments
    assert pipe.transformer.config.patch_size == 2
    assert pipe.tokenizer.model_max_length == TINY.clip_max_length
    vae = pipe.vae.config
    assert vae.scaling_factor > 0 and vae.shift_factor != 0.0609  # set from the trained latents
    settings = SamplerSettings(num_inference_steps=2, guidance_scale=2.0, max_sequence_length=16)
    pipe.set_progress_bar_config(disable=True)
    images, prompts = generate(pipe, ["a red circle", "disney style. a red circle"], [0, 1], settings)
    assert len(images) == 4 and prompts[:2] == ["a red circle", "disney style. a red circle"]
    assert all(im.size == (32, 32) for im in images)
    # Fixed seeds reproduce: the same batch again (like with like; a prompt sampled alone runs other CPU kernels
    # than the same prompt in a batch of four, so only the same batch composition is bit-identical).
    again, _ = generate(pipe, ["a red circle", "disney style. a red circle"], [0, 1], settings)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(again, images, strict=True))


def test_rates_are_fractions(tiny_base, tmp_path):
    pipe = load_base(tiny_base)
    rate = style_rate(pipe, ["a red circle"], [0, 1], steps=2, guidance=1.0)
    assert 0.0 <= rate <= 1.0
    sheet = tmp_path / "sheet.png"
    metrics = measure_base(
        pipe, prompts=["a red circle"], seeds=[0], settings=SamplerSettings(2, 1.0, 16), sheet_path=sheet
    )
    assert sheet.exists()
    assert set(metrics) == {
        "plain_style_rate",
        "plain_color_acc",
        "plain_shape_acc",
        "style_style_rate",
        "style_color_acc",
        "style_shape_acc",
        "n_per_kind",
    }
    assert metrics["n_per_kind"] == 1.0


def test_builder_reuses_an_existing_base(tiny_base):
    stamp = (tiny_base / "toy_base.json").stat().st_mtime_ns
    assert build_toy_base(tiny_base, config=TINY) == tiny_base
    assert (tiny_base / "toy_base.json").stat().st_mtime_ns == stamp
