"""Tiny diffusers pipelines built from configs, offline, for tests and the demo.

Nothing here is downloaded: every component is constructed from a config with seeded random weights,
written with ``save_pretrained`` and meant to be read back with ``from_pretrained`` — the same path a real
checkpoint takes. ``make_tiny_pipeline(dir, family="sd3")`` returns ``dir``.

Sizes (SD3, preset ``"test"``): transformer 1 layer, 4 heads x 8 dims, patch 1, joint dim 64; VAE with
two blocks (downsampling x2: 32 px images -> 16 x 16 x 4 latents); two CLIP text encoders with hidden 32
and projection 32 (pooled 64 = 32 + 32); a 1-layer T5 encoder (d_model 64) sharing the CLIP BPE
vocabulary, so the saved pipeline loads with a plain ``StableDiffusion3Pipeline.from_pretrained(dir)``
(SD3 does not list ``text_encoder_3`` as optional: a saved ``null`` T5 must be passed as ``None``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from prefopt_core.models.base import FAMILIES, Family
from prefopt_core.models.tokenizer import write_clip_tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TinySD3Spec:
    """Sizes of a tiny SD3 pipeline; ``"test"`` is the unit-test size, ``"toy"`` the testbed size."""

    num_layers: int = 1
    num_attention_heads: int = 4
    attention_head_dim: int = 8
    vae_channels: tuple[int, ...] = (8, 16)
    latent_channels: int = 4
    clip_hidden: int = 32
    clip_layers: int = 2
    sample_size: int = 32
    with_t5: bool = True


SD3_PRESETS: dict[str, TinySD3Spec] = {
    "test": TinySD3Spec(),
    "toy": TinySD3Spec(
        num_layers=4, num_attention_heads=4, attention_head_dim=16, vae_channels=(16, 32, 32), clip_layers=2
    ),
}


def _clip_text_encoder(hidden: int, layers: int, vocab: int, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 2 + 5,
        num_attention_heads=4,
        num_hidden_layers=layers,
        vocab_size=vocab,
        projection_dim=hidden,
        max_position_embeddings=77,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
        hidden_act="gelu",
    )
    return CLIPTextModelWithProjection(cfg).eval()


def build_tiny_sd3(spec: TinySD3Spec, tokenizer_dir: Path, *, seed: int = 0):
    """Construct (do not save) a tiny ``StableDiffusion3Pipeline`` with seeded random weights."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    vocab = len(tokenizer)
    pooled = 2 * spec.clip_hidden
    joint = 2 * spec.clip_hidden  # CLIP-L + CLIP-G hidden states are concatenated on channels
    vae_factor = 2 ** (len(spec.vae_channels) - 1)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=spec.sample_size // vae_factor,
        patch_size=1,
        in_channels=spec.latent_channels,
        num_layers=spec.num_layers,
        attention_head_dim=spec.attention_head_dim,
        num_attention_heads=spec.num_attention_heads,
        caption_projection_dim=spec.attention_head_dim * spec.num_attention_heads,
        joint_attention_dim=joint,
        pooled_projection_dim=pooled,
        out_channels=spec.latent_channels,
        pos_embed_max_size=max(16, spec.sample_size // vae_factor * 2),
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=spec.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(spec.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(spec.vae_channels),
        layers_per_block=1,
        latent_channels=spec.latent_channels,
        norm_num_groups=min(8, spec.vae_channels[0]),
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
        sample_size=spec.sample_size,
    )
    text_encoder = _clip_text_encoder(spec.clip_hidden, spec.clip_layers, vocab, seed + 2)
    text_encoder_2 = _clip_text_encoder(spec.clip_hidden, spec.clip_layers, vocab, seed + 3)
    text_encoder_3, tokenizer_3 = None, None
    if spec.with_t5:
        text_encoder_3, tokenizer_3 = _tiny_t5(joint, tokenizer_dir, seed + 4)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=CLIPTokenizer.from_pretrained(tokenizer_dir),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def _tiny_t5(d_model: int, tokenizer_dir: Path, seed: int):
    """A tiny T5 encoder that reuses the CLIP BPE vocabulary through a T5-compatible fast tokenizer."""
    from transformers import CLIPTokenizer, T5Config, T5EncoderModel

    tok = CLIPTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=len(tok),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=1,
        num_heads=4,
        dropout_rate=0.0,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )
    return T5EncoderModel(cfg).eval(), tok


def make_tiny_pipeline(
    directory: str | Path,
    *,
    family: Family = "sd3",
    preset: str = "test",
    seed: int = 0,
    resolution: int | None = None,
) -> Path:
    """Build a tiny pipeline of ``family`` and ``save_pretrained`` it to ``directory``.

    Idempotent: if ``directory/model_index.json`` exists it is returned untouched (so concurrent test
    workers and reruns share one model). Returns the directory.
    """
    directory = Path(directory)
    if (directory / "model_index.json").exists():
        return directory
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; valid: {', '.join(FAMILIES)}")
    tmp = directory.with_name(directory.name + ".partial")
    tok_dir = tmp / "_tokenizer_src"
    write_clip_tokenizer(tok_dir)
    if family == "sd3":
        if preset not in SD3_PRESETS:
            raise ValueError(f"unknown sd3 preset {preset!r}; valid: {', '.join(SD3_PRESETS)}")
        spec = SD3_PRESETS[preset]
        if resolution is not None:
            spec = TinySD3Spec(**{**spec.__dict__, "sample_size": resolution})
        pipe = build_tiny_sd3(spec, tok_dir, seed=seed)
    else:
        from prefopt_core.models import tiny_unet

        pipe = tiny_unet.build_tiny_unet_pipeline(family, tok_dir, seed=seed, resolution=resolution or 32)
    pipe.save_pretrained(tmp, safe_serialization=True)
    import shutil

    shutil.rmtree(tok_dir)
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)
    logger.info("wrote tiny %s pipeline (%s) to %s", family, preset, directory)
    return directory
