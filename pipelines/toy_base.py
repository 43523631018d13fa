"""Build the toy testbed's *base model*: a tiny SD3 pipeline whose VAE and transformer are trained on the toy world.

The base draws the coloured shape a prompt names, renders the outline ("cartoon") style in about ``p_style`` of
its samples when the prompt does not ask for it, and almost always when the prompt starts with
``"disney style."`` (see :mod:`pipelines.toy_prompts`), which leaves preference training room to move the
plain-prompt style rate. The repository ships one build (:mod:`pipelines.toy_base_asset`); rebuild it with
``python -m pipelines.toy_base build OUT [--seed N]`` (writes the sha256 manifest too).

Recipe (``build_toy_base``; every number lives in ``ToyBaseConfig``):

1. construct a tiny SD3 pipeline: the frozen random CLIP-L/CLIP-G/T5 encoders of ``prefopt_core.models.tiny`` with
   a CLIP tokenizer truncating at ``clip_max_length`` tokens, a 2-level ``AutoencoderKL`` (32 px -> 16 x 16 x 4
   latents, ``norm_num_groups=1``: per-channel group norm would erase the absolute colour) and an MMDiT with
   ``patch_size=2`` (64 image tokens);
2. train the VAE on world images: ``w (L1 + L2)`` reconstruction of a posterior sample + ``kl_weight * KL``, with
   ``w = vae_fill_weight`` on the shape's coloured fill (:func:`fill_weights`): unweighted, the small fill's hue
   drifts enough to change the colour's name (reconstructions named right ~0.7 of the time). The colour and shape
   accuracy of reconstructions (:func:`vae_fidelity`, the ceiling of the base's fidelity) go to ``toy_base.json``;
3. encode a fixed training set once (posterior mean and std; a fresh posterior sample every step) and set the
   VAE's ``shift_factor`` / ``scaling_factor`` to the latents' mean and ``1 / std``;
4. encode every distinct caption once with the pipeline's own ``encode_prompt``;
5. train the transformer with rectified flow matching (Esser et al. 2024, Eq. 2):
   ``x_t = (1 - σ) x0 + σ ε``, target ``ε - x0``, σ = logit-normal ``u`` shifted by the scheduler's ``shift``
   (``σ = s u / (1 + (s - 1) u)``), the transformer's timestep input ``1000 σ``; keep an EMA of the weights.
   With ``lr_schedule="constant"`` the weights after ``n`` steps do not depend on ``steps``, so a checkpoint
   (``on_checkpoint``) of a longer run is exactly the base a ``steps=n`` build gives;
6. ``save_pretrained`` the pipeline (EMA transformer) so ``StableDiffusion3Pipeline.from_pretrained(dir)`` loads it.

Everything downstream must call the pipeline with ``max_sequence_length=ToyBaseConfig.max_sequence_length``
(the T5 token count, 16 instead of SD3's 256): ``pipelines.toy_sampling.EVAL_SETTINGS`` carries it, with the
guidance scale the base is measured and used at.

    from pipelines.toy_base import build_toy_base
    from pipelines.toy_sampling import measure_base
    out = build_toy_base("/tmp/toy_base", seed=0)
    print(measure_base(out))
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from pipelines.toy_prompts import ToyWorldSpec, sample_dataset

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ToyBaseConfig:
    """Sizes, step counts and learning rates of the base (defaults: the shipped base's recipe)."""

    # tokenization: CLIP pads to clip_max_length, T5 to max_sequence_length (pass it to every pipeline call)
    clip_max_length: int = 16
    max_sequence_length: int = 16
    # architecture
    num_layers: int = 4
    num_attention_heads: int = 4
    attention_head_dim: int = 16
    patch_size: int = 2
    vae_channels: tuple[int, ...] = (8, 16)
    clip_hidden: int = 32
    clip_layers: int = 2
    scheduler_shift: float = 1.0
    # VAE training
    vae_images: int = 4096
    vae_steps: int = 1200
    vae_batch_size: int = 32
    vae_lr: float = 4e-3
    vae_kl_weight: float = 1e-6
    vae_fill_weight: float = 5.0
    # transformer training
    train_images: int = 8192
    steps: int = 12000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 200
    lr_schedule: str = "constant"  # "constant" or "cosine" (to 10 %) after the warm-up
    ema_decay: float = 0.999
    checkpoint_every: int = 1000
    # upright squares and triangles: in a one-off comparison of candidate builds (measure_base on 8 held-out
    # prompts x 8 seeds, guidance 2.5, at their on_checkpoint steps; not a committed script), shape accuracy
    # after 4000 steps was 0.70 upright vs 0.30 with random rotations (0.36 after 7000 steps)
    world: ToyWorldSpec = field(default_factory=lambda: ToyWorldSpec(upright=True))


def images_to_tensor(images: Sequence[Image.Image]) -> Tensor:
    """PIL RGB images -> ``(N, 3, H, W)`` float32 tensor in [-1, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])  # (N, H, W, 3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0  # (N, 3, H, W)


# ---------------------------------------------------------------------------------------------- construction


def build_untrained_pipeline(cfg: ToyBaseConfig, work_dir: Path, seed: int):
    """A ``StableDiffusion3Pipeline`` with seeded random weights (text encoders stay frozen and random)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    from prefopt_core.models.tiny import TinySD3Spec, build_tiny_sd3
    from prefopt_core.models.tokenizer import write_clip_tokenizer

    size = cfg.world.size
    tok_dir = write_clip_tokenizer(work_dir / "tokenizer_src", model_max_length=cfg.clip_max_length)
    spec = TinySD3Spec(
        num_layers=1,
        vae_channels=cfg.vae_channels,
        clip_hidden=cfg.clip_hidden,
        clip_layers=cfg.clip_layers,
        sample_size=size,
        with_t5=True,
    )
    encoders = build_tiny_sd3(spec, tok_dir, seed=seed)  # text encoders + tokenizers are reused as they are
    latent_size = size // 2 ** (len(cfg.vae_channels) - 1)
    torch.manual_seed(seed + 10)
    transformer = SD3Transformer2DModel(
        sample_size=latent_size,
        patch_size=cfg.patch_size,
        in_channels=4,
        num_layers=cfg.num_layers,
        attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads,
        caption_projection_dim=cfg.attention_head_dim * cfg.num_attention_heads,
        joint_attention_dim=2 * cfg.clip_hidden,
        pooled_projection_dim=2 * cfg.clip_hidden,
        out_channels=4,
        pos_embed_max_size=max(16, latent_size // cfg.patch_size * 2),
    )
    torch.manual_seed(seed + 11)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=cfg.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
        mid_block_add_attention=False,
        use_quant_conv=False,
        use_post_quant_conv=False,
        sample_size=size,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.scheduler_shift)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=encoders.text_encoder,
        tokenizer=encoders.tokenizer,
        text_encoder_2=encoders.text_encoder_2,
        tokenizer_2=encoders.tokenizer_2,
        text_encoder_3=encoders.text_encoder_3,
        tokenizer_3=encoders.tokenizer_3,
    )


# ---------------------------------------------------------------------------------------------- VAE


def train_vae(vae: nn.Module, pixels: Tensor, cfg: ToyBaseConfig, generator: torch.Generator) -> float:
    """Train ``vae`` in place on ``pixels (N, 3, H, W)`` in [-1, 1]; return the last step's L1 error.

    Loss per step: ``w |x̂ - x| + w (x̂ - x)^2`` (means over pixels) ``+ kl_weight * KL(q(z|x) || N(0, I))`` with
    ``x̂ = decode(z)``, ``z ~ q(z|x)``; AdamW with a one-cycle learning rate. ``w`` (:func:`fill_weights`) is
    ``vae_fill_weight`` on the shape's coloured fill and 1 elsewhere: the fill is a small part of the image, and
    an unweighted loss leaves its hue off by enough to change the colour's name.
    """
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.vae_lr, total_steps=cfg.vae_steps, pct_start=0.1)
    l1 = torch.tensor(float("nan"))
    for step in range(cfg.vae_steps):
        idx = torch.randint(len(pixels), (cfg.vae_batch_size,), generator=generator)
        x = pixels[idx]  # (B, 3, H, W)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample  # (B, 3, H, W)
        w = fill_weights(x, cfg.vae_fill_weight)  # (B, 1, H, W)
        l1 = (recon - x).abs().mean()
        loss = (
            w * ((recon - x).abs() + (recon - x).pow(2))
        ).mean() + cfg.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == cfg.vae_steps - 1:
            logger.info("vae step %d/%d l1 %.4f", step + 1, cfg.vae_steps, l1.item())
    vae.eval().requires_grad_(False)
    return float(l1.item())


def fill_weights(x: Tensor, fill_weight: float) -> Tensor:
    """``(B, 3, H, W)`` in [-1, 1] -> ``(B, 1, H, W)`` loss weights: ``fill_weight`` where the pixel's chroma
    ``max - min`` over channels exceeds 0.4 (~50 of 255: the world's fills have >= 130, the background, the
    outline and their blends < 35), else 1."""
    chroma = x.amax(dim=1, keepdim=True) - x.amin(dim=1, keepdim=True)  # (B, 1, H, W)
    return torch.where(chroma > 0.4, fill_weight, 1.0)


@torch.no_grad()
def vae_fidelity(pipe, world: ToyWorldSpec, n: int = 256, seed: int = 999) -> dict[str, float]:
    """Colour and shape accuracy of ``n`` world images (half outlined) after encode -> decode (posterior mean):
    the ceiling the VAE puts on the base's fidelity."""
    from pipelines.fidelity import color_accuracy, shape_accuracy

    data = sample_dataset(n, ToyWorldSpec(p_style=0.5, size=world.size), seed)
    recon = pipe.vae.decode(
        pipe.vae.encode(images_to_tensor([e.image for e in data])).latent_dist.mean
    ).sample
    images = pipe.image_processor.postprocess(recon, output_type="pil")
    captions = [f"a {e.color} {e.shape}" for e in data]
    return {
        "vae_color_acc": color_accuracy(images, captions),
        "vae_shape_acc": shape_accuracy(images, captions),
    }


@torch.no_grad()
def encode_posteriors(vae: nn.Module, pixels: Tensor, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """``(N, 3, H, W)`` -> posterior ``mean, std``, each ``(N, 4, h, w)``, unscaled."""
    means, stds = [], []
    for start in range(0, len(pixels), batch_size):
        dist = vae.encode(pixels[start : start + batch_size]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def set_latent_scaling(vae: nn.Module, mean: Tensor) -> tuple[float, float]:
    """Set ``vae.config`` shift/scale so that ``(z - shift) * scale`` has mean 0 and std 1 on ``mean``."""
    shift = float(mean.mean())
    scale = float(1.0 / mean.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    logger.info("vae latents: shift_factor %.4f scaling_factor %.4f", shift, scale)
    return shift, scale


# ---------------------------------------------------------------------------------------------- transformer


@torch.no_grad()
def encode_captions(pipe, captions: Sequence[str], max_sequence_length: int) -> dict[str, Tensor]:
    """Distinct captions -> ``prompt_embeds (K, L_clip + L_t5, D)`` and ``pooled (K, P)`` via ``encode_prompt``."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=list(captions),
        prompt_2=None,
        prompt_3=None,
        device=torch.device("cpu"),
        do_classifier_free_guidance=False,
        max_sequence_length=max_sequence_length,
    )
    return {"prompt_embeds": embeds.float(), "pooled": pooled.float()}


def sample_sigmas(n: int, shift: float, generator: torch.Generator) -> Tensor:
    """``(n,)`` σ: logit-normal ``u`` (mean 0, std 1), then the scheduler shift ``s u / (1 + (s - 1) u)``."""
    u = torch.sigmoid(torch.randn(n, generator=generator))
    return shift * u / (1.0 + (shift - 1.0) * u)


def lr_lambda(warmup: int, total: int, schedule: str = "cosine"):
    """Linear warm-up over ``warmup`` steps, then ``"cosine"`` decay to 10 % at ``total`` or ``"constant"``.

    With ``"constant"`` the weights after ``n`` steps do not depend on ``total``, so a checkpoint taken at step
    ``n`` of a longer run is the model a run with ``steps=n`` builds.
    """
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"lr schedule must be 'cosine' or 'constant', got {schedule!r}")

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def train_transformer(
    transformer: nn.Module,
    latent_mean: Tensor,
    latent_std: Tensor,
    caption_index: Tensor,
    text: dict[str, Tensor],
    cfg: ToyBaseConfig,
    generator: torch.Generator,
    on_checkpoint: Callable[[int, nn.Module], None] | None = None,
) -> nn.Module:
    """Flow-matching training of ``transformer`` on scaled latents; returns the EMA copy.

    ``on_checkpoint(step, ema)`` (optional) is called every ``cfg.checkpoint_every`` steps with the EMA
    transformer in eval mode (e.g. to measure the base while it trains); training resumes after it returns.

    Args:
        latent_mean, latent_std: ``(N, 4, h, w)`` scaled posterior mean and std of the training images.
        caption_index: ``(N,)`` row of ``text`` holding each image's caption embeddings.
        text: ``prompt_embeds (K, L, D)`` and ``pooled (K, P)``.
    """
    transformer.train().requires_grad_(True)
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    opt = torch.optim.AdamW(transformer.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, cfg.steps, cfg.lr_schedule))
    running = 0.0
    for step in range(cfg.steps):
        idx = torch.randint(len(latent_mean), (cfg.batch_size,), generator=generator)
        x0 = latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=generator)
        noise = torch.randn(x0.shape, generator=generator)  # (B, 4, h, w)
        sigma = sample_sigmas(cfg.batch_size, cfg.scheduler_shift, generator)  # (B,)
        s = sigma.view(-1, 1, 1, 1)
        x_t = (1.0 - s) * x0 + s * noise  # (Eq. 2 of Esser et al.)
        pred = transformer(
            hidden_states=x_t,
            timestep=sigma * 1000.0,
            encoder_hidden_states=text["prompt_embeds"][caption_index[idx]],
            pooled_projections=text["pooled"][caption_index[idx]],
            return_dict=False,
        )[0]
        loss = (pred - (noise - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        sched.step()
        _ema_update(ema, transformer, cfg.ema_decay if step >= cfg.warmup_steps else 0.0)
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if step % 250 == 0 or step == cfg.steps - 1:
            logger.info("transformer step %d/%d loss %.4f", step + 1, cfg.steps, running)
        if on_checkpoint is not None and (step + 1) % cfg.checkpoint_every == 0:
            on_checkpoint(step + 1, ema)
    transformer.eval().requires_grad_(False)
    return ema


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` parameter-wise."""
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1.0 - decay)


# ---------------------------------------------------------------------------------------------- the builder


def build_toy_base(
    out_dir: str | Path,
    *,
    seed: int = 0,
    config: ToyBaseConfig | None = None,
    overwrite: bool = False,
    on_checkpoint: Callable[[int, object], None] | None = None,
) -> Path:
    """Build, train and save the toy base pipeline to ``out_dir``; return ``out_dir``.

    ``on_checkpoint(step, pipe)`` (optional) sees the pipeline with the EMA transformer every
    ``config.checkpoint_every`` transformer steps (e.g. ``pipelines.toy_sampling.measure_base``).

    Deterministic given ``seed`` and ``config`` (and the torch build). If ``out_dir/model_index.json`` exists
    and ``overwrite`` is False the directory is returned untouched. Writes ``out_dir/toy_base.json`` with the
    config, the timings and the final training losses.
    """
    cfg = config or ToyBaseConfig()
    out_dir = Path(out_dir)
    if (out_dir / "model_index.json").exists() and not overwrite:
        logger.info("toy base exists at %s; reusing it", out_dir)
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    pipe = build_untrained_pipeline(cfg, tmp, seed)
    pipe.set_progress_bar_config(disable=True)

    vae_world = ToyWorldSpec(p_style=0.5, size=cfg.world.size, upright=cfg.world.upright)
    vae_data = sample_dataset(cfg.vae_images, vae_world, seed + 100)
    vae_l1 = train_vae(pipe.vae, images_to_tensor([e.image for e in vae_data]), cfg, generator)
    timings["vae_s"] = time.perf_counter() - t0
    vae_check = vae_fidelity(pipe, cfg.world)
    logger.info("vae reconstructions: colour accuracy %.3f, shape accuracy %.3f", *vae_check.values())

    t1 = time.perf_counter()
    train = sample_dataset(cfg.train_images, cfg.world, seed + 200)
    mean, std = encode_posteriors(pipe.vae, images_to_tensor([e.image for e in train]))
    shift, scale = set_latent_scaling(pipe.vae, mean)
    captions = sorted({e.caption for e in train})
    caption_index = torch.tensor([captions.index(e.caption) for e in train])
    text = encode_captions(pipe, captions, cfg.max_sequence_length)
    timings["encode_s"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    student = pipe.transformer

    def checkpoint(step: int, ema: nn.Module) -> None:
        pipe.register_modules(transformer=ema)
        try:
            on_checkpoint(step, pipe)  # type: ignore[misc]
        finally:
            pipe.register_modules(transformer=student)

    ema = train_transformer(
        student,
        (mean - shift) * scale,
        std * scale,
        caption_index,
        text,
        cfg,
        generator,
        checkpoint if on_checkpoint is not None else None,
    )
    pipe.register_modules(transformer=ema)
    timings["transformer_s"] = time.perf_counter() - t2

    shutil.rmtree(tmp / "tokenizer_src")
    pipe.save_pretrained(tmp, safe_serialization=True)
    timings["total_s"] = time.perf_counter() - t0
    info = {"seed": seed, "config": asdict(cfg), "timings": timings, "vae_l1": vae_l1, **vae_check}
    (tmp / "toy_base.json").write_text(json.dumps(info, indent=1))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    logger.info("toy base written to %s in %.0f s (%s)", out_dir, timings["total_s"], timings)
    return out_dir


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipelines.toy_base build OUT [--seed N]``: (re)build the base into OUT and write its
    sha256 manifest (:mod:`pipelines.toy_base_asset`); OUT is replaced if it exists."""
    import argparse

    from pipelines.toy_base_asset import write_manifest

    parser = argparse.ArgumentParser(prog="python -m pipelines.toy_base", description=main.__doc__)
    parser.add_argument("command", choices=["build"])
    parser.add_argument("out", type=Path, help="directory to write the pipeline to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the float summation order, and so the weights, of the shipped build)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = build_toy_base(args.out, seed=args.seed, overwrite=True)
    logger.info("manifest: %s", write_manifest(out, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
