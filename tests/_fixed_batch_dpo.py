"""Test helper: a few Diffusion-DPO optimizer steps on one fixed toy-world batch, for any model adapter.

Used by the per-family model tests to check that an adapter's forward process, target and denoiser call
form a trainable preference objective end to end (``PreferenceObjective`` + a plain torch AdamW + a frozen
reference copy), without Ray or DeepSpeed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipelines.toy_world import sample_toy_scene
from prefopt_core.objective import PreferenceBatch, PreferenceObjective
from prefopt_core.timesteps import TimestepConfig

#: Image side of the fixed batch: 16 px (the toy world's minimum) -> 8 x 8 latents keeps 30 steps cheap.
IMAGE_SIZE = 16


@dataclass
class FitResult:
    loss_before: float  # loss of the fixed batch/epoch before training (policy == reference)
    loss_after: float  # ... after the last optimizer step, evaluated without grad
    acc_after: float  # implicit accuracy after training
    ref_err_before: torch.Tensor  # (2B,) reference errors before training
    ref_err_after: torch.Tensor  # (2B,) reference errors after training (the reference is frozen)
    max_weight_change: float  # max |Δθ| of the policy


def _pixels(image) -> torch.Tensor:
    """PIL RGB ``(S, S)`` -> ``(3, S, S)`` float in [-1, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def toy_batch(adapter, num_pairs: int = 4) -> PreferenceBatch:
    """``num_pairs`` pairs: chosen = outlined scene, rejected = the same scene plain (same rng seed)."""
    chosen = [sample_toy_scene(np.random.default_rng(i), IMAGE_SIZE, True) for i in range(num_pairs)]
    rejected = [sample_toy_scene(np.random.default_rng(i), IMAGE_SIZE, False) for i in range(num_pairs)]
    latents = adapter.encode_images(
        torch.stack([_pixels(s.image) for s in chosen + rejected])
    )  # (2B, C, h, w)
    latents_w, latents_l = latents.chunk(2)  # (B, C, h, w) each
    size = torch.full((num_pairs, 2), IMAGE_SIZE, dtype=torch.int64)  # (B, 2) original (h, w)
    crop = torch.zeros((num_pairs, 2), dtype=torch.int64)  # (B, 2) crop (top, left)
    side = adapter.side_conditioning(size, crop, IMAGE_SIZE)
    return PreferenceBatch(
        pair_key=torch.arange(num_pairs, dtype=torch.int64),
        latents_w=latents_w,
        latents_l=latents_l,
        cond=adapter.encode_prompts([s.caption for s in chosen]),
        cond_w=side,
        cond_l={k: v.clone() for k, v in side.items()},
    )


def fit_fixed_batch(
    adapter, *, steps: int = 30, lr: float = 1e-4, beta: float = 5000.0, sampling: str = "uniform"
) -> FitResult:
    """Train a copy of the adapter's denoiser with DPO on one fixed batch at one fixed epoch (fixed noise
    and timesteps), against a frozen reference copy; return the loss before/after."""
    torch.manual_seed(0)
    batch = toy_batch(adapter)
    policy = adapter.load_denoiser(dtype=torch.float32).train()
    reference = adapter.load_denoiser(dtype=torch.float32).requires_grad_(False).eval()
    start = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    objective = PreferenceObjective(
        adapter,
        loss_name="dpo",
        loss_params={"beta": beta},
        timesteps=TimestepConfig(sampling=sampling),
        seed=0,
    )
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0)
    noise, t = objective.draw(batch, epoch=0)
    ref_before = torch.cat(objective.reference_errors(reference, batch, noise, t))  # (2B,)
    with torch.no_grad():
        loss_before = float(objective(policy, batch, epoch=0, reference=reference).loss)
    for _ in range(steps):
        out = objective(policy, batch, epoch=0, reference=reference)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = objective(policy, batch, epoch=0, reference=reference)
    ref_after = torch.cat(objective.reference_errors(reference, batch, noise, t))
    change = max(float((v - start[k]).abs().max()) for k, v in policy.state_dict().items())
    return FitResult(
        loss_before=loss_before,
        loss_after=float(final.loss),
        acc_after=float(final.metrics["implicit_acc"]),
        ref_err_before=ref_before,
        ref_err_after=ref_after,
        max_weight_change=change,
    )
