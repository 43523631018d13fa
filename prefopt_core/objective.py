"""One preference-optimisation step, family- and loss-agnostic (pure torch; the trainer wraps it).

    batch -> per-pair noise + timestep (seeded by (seed, pair, epoch)) -> policy errors (2B rows)
          -> reference errors (live model, or precomputed in the cache) -> loss (prefopt_core.losses)

Noise and timesteps are drawn from a generator seeded by ``(run seed, pair key, epoch)``, not from a
global RNG: the draw of a pair does not depend on the worker, the batch it lands in, the number of
workers or a resume — which is what makes ZeRO stages comparable, resumes exact, and precomputed
reference errors equal to live ones.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from prefopt_core.losses import LossOutput, compute_loss, get_loss, loss_kwargs
from prefopt_core.models.base import ModelAdapter, per_sample_mse
from prefopt_core.timestep_weights import (
    TimestepWeight,
    read_calibration,
    timestep_weight,
    timestep_weight_table,
)
from prefopt_core.timesteps import TimestepConfig, sample_timesteps

if TYPE_CHECKING:
    from prefopt_core.config import RunConfig


@dataclass
class PreferenceBatch:
    """B preference pairs as stored in the latent cache (chosen = w, rejected = l)."""

    pair_key: Tensor  # (B,) int64, stable id of the pair
    latents_w: Tensor  # (B, C, h, w)
    latents_l: Tensor  # (B, C, h, w)
    cond: dict[str, Tensor]  # per-pair text conditioning, each (B, ...)
    cond_w: dict[str, Tensor] = field(default_factory=dict)  # per-image conditioning of w (SDXL time ids)
    cond_l: dict[str, Tensor] = field(default_factory=dict)
    ref_err_w: Tensor | None = None  # (B,) precomputed reference errors (reference.strategy=precomputed)
    ref_err_l: Tensor | None = None

    def __len__(self) -> int:
        return int(self.pair_key.shape[0])

    def to(self, device: torch.device | str) -> PreferenceBatch:
        def mv(d: dict[str, Tensor]) -> dict[str, Tensor]:
            return {k: v.to(device) for k, v in d.items()}

        return PreferenceBatch(
            pair_key=self.pair_key.to(device),
            latents_w=self.latents_w.to(device),
            latents_l=self.latents_l.to(device),
            cond=mv(self.cond),
            cond_w=mv(self.cond_w),
            cond_l=mv(self.cond_l),
            ref_err_w=None if self.ref_err_w is None else self.ref_err_w.to(device),
            ref_err_l=None if self.ref_err_l is None else self.ref_err_l.to(device),
        )


def pair_seed(seed: int, pair_key: int, epoch: int) -> int:
    """A 63-bit seed for the draw of ``pair_key`` in ``epoch`` (stable across processes and platforms)."""
    digest = hashlib.blake2b(f"{seed}:{pair_key}:{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def draw_noise_and_timesteps(
    pair_keys: Tensor,
    latent_shape: tuple[int, ...],
    *,
    seed: int,
    epoch: int,
    num_train_timesteps: int,
    timesteps: TimestepConfig,
) -> tuple[Tensor, Tensor]:
    """Per-pair noise ``(B, C, h, w)`` and integer timesteps ``(B,)``, each from its own seeded generator."""
    noises, ts = [], []
    for key in pair_keys.tolist():
        g = torch.Generator().manual_seed(pair_seed(seed, int(key), epoch))
        noises.append(torch.randn(latent_shape, generator=g))
        ts.append(
            sample_timesteps(
                1,
                num_train_timesteps,
                sampling=timesteps.sampling,
                generator=g,
                logit_mean=timesteps.logit_mean,
                logit_std=timesteps.logit_std,
                gamma=timesteps.gamma,
                bins=timesteps.bins,
            )
        )
    return torch.stack(noises), torch.cat(ts)


def pair_errors(
    adapter: ModelAdapter, denoiser: nn.Module, batch: PreferenceBatch, noise: Tensor, t: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-sample errors ``(B,)`` of the chosen and the rejected images under shared noise and timestep."""
    x0 = torch.cat([batch.latents_w, batch.latents_l])  # (2B, C, h, w)
    noise2 = torch.cat([noise, noise])  # (2B, C, h, w): w and l share the noise
    t2 = torch.cat([t, t])  # (2B,)
    cond = {k: torch.cat([v, v]) for k, v in batch.cond.items()}  # (2B, ...)
    for k in batch.cond_w:
        cond[k] = torch.cat([batch.cond_w[k], batch.cond_l[k]])
    x_t = adapter.noisy_latents(x0, noise2, t2)
    pred = adapter.predict(denoiser, x_t, t2, cond)
    err = per_sample_mse(pred, adapter.target(x0, noise2, t2))  # (2B,)
    err_w, err_l = err.chunk(2)  # (B,), (B,)
    return err_w, err_l


def precomputed_errors(batch: PreferenceBatch, epoch: int) -> tuple[Tensor, Tensor]:
    """The cached reference errors ``(B,)`` of ``epoch`` from ``(B, E)`` columns (or ``(B,)``: one epoch)."""
    ref_w, ref_l = batch.ref_err_w, batch.ref_err_l
    if ref_w.ndim == 1:
        ref_w, ref_l = ref_w[:, None], ref_l[:, None]
    if epoch >= ref_w.shape[1]:
        raise ValueError(
            f"the cache holds precomputed reference errors for {ref_w.shape[1]} epoch(s), training reached "
            f"epoch {epoch}; rebuild the cache with a larger reference.precompute_epochs"
        )
    return ref_w[:, epoch].float(), ref_l[:, epoch].float()


@dataclass
class StepOutput:
    loss: Tensor  # scalar, differentiable
    loss_output: LossOutput  # the loss function's output (per-pair losses, metrics, per_sample values)
    t: Tensor  # (B,)
    metrics: dict[str, Tensor]  # detached scalars for logging


class PreferenceObjective:
    """Computes the preference loss of a batch for any family, loss and reference strategy.

    ``loss_params``: the loss function's keyword arguments (:func:`prefopt_core.losses.loss_kwargs`);
    ``timestep_weight``: the name of the ``lambda(t)`` that scales the implicit reward ("none": no scaling;
    losses without an implicit reward ignore it, see :func:`prefopt_core.losses.compute_loss`);
    ``timestep_weight_calibration``: the ``(K,)`` per-bin table of ``"calibrated"``
    (:func:`prefopt_core.timestep_weights.read_calibration`).
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        *,
        loss_name: str,
        loss_params: dict[str, Any],
        timesteps: TimestepConfig,
        seed: int,
        timestep_weight: TimestepWeight = "none",
        timestep_weight_calibration: Tensor | None = None,
    ) -> None:
        self.adapter = adapter
        self.spec = get_loss(loss_name)
        self.loss_params = loss_params
        self.timesteps = timesteps
        self.seed = seed
        self.T = adapter.schedule.num_train_timesteps
        self.lambda_table = (
            None
            if timestep_weight == "none"
            else timestep_weight_table(adapter.schedule, timestep_weight, timestep_weight_calibration)
        )

    @classmethod
    def from_config(cls, adapter: ModelAdapter, cfg: RunConfig) -> PreferenceObjective:
        """The objective of a run config: its loss (parameters via ``loss_kwargs`` and the adapter's
        schedule), timestep sampling, timestep weight (and its calibration table) and seed."""
        calibration = cfg.loss.timestep_weight_calibration
        return cls(
            adapter,
            loss_name=cfg.loss.name,
            loss_params=loss_kwargs(cfg.loss, adapter.schedule),
            timesteps=cfg.timestep_config(),
            seed=cfg.run.seed,
            timestep_weight=cfg.loss.timestep_weight,
            timestep_weight_calibration=None if calibration is None else read_calibration(calibration),
        )

    def draw(self, batch: PreferenceBatch, epoch: int) -> tuple[Tensor, Tensor]:
        noise, t = draw_noise_and_timesteps(
            batch.pair_key.cpu(),
            tuple(batch.latents_w.shape[1:]),
            seed=self.seed,
            epoch=epoch,
            num_train_timesteps=self.T,
            timesteps=self.timesteps,
        )
        return noise.to(batch.latents_w.device, batch.latents_w.dtype), t.to(batch.latents_w.device)

    @torch.no_grad()
    def reference_errors(self, reference: nn.Module, batch: PreferenceBatch, noise: Tensor, t: Tensor):
        return pair_errors(self.adapter, reference, batch, noise, t)

    def __call__(
        self,
        policy: nn.Module,
        batch: PreferenceBatch,
        *,
        epoch: int,
        reference: nn.Module | None = None,
    ) -> StepOutput:
        noise, t = self.draw(batch, epoch)
        err_w, err_l = pair_errors(self.adapter, policy, batch, noise, t)
        ref_w = ref_l = None
        if self.spec.needs_reference:
            if batch.ref_err_w is not None:
                ref_w, ref_l = precomputed_errors(batch, epoch)
            elif reference is not None:
                ref_w, ref_l = self.reference_errors(reference, batch, noise, t)
            else:
                raise ValueError(
                    f"loss {self.spec.name!r} needs a reference model or precomputed reference errors"
                )
        weight = None if self.lambda_table is None else timestep_weight(t, self.lambda_table)
        out = compute_loss(
            self.spec.name, err_w, err_l, ref_w, ref_l, timestep_weight=weight, **self.loss_params
        )
        metrics = {k: v.detach() for k, v in out.metrics.items()}
        metrics["mse/policy_w"] = err_w.detach().mean()
        metrics["mse/policy_l"] = err_l.detach().mean()
        if ref_w is not None:
            metrics["mse/ref_w"] = ref_w.detach().mean()
            metrics["mse/ref_l"] = ref_l.detach().mean()
        return StepOutput(loss=out.losses.mean(), loss_output=out, t=t, metrics=metrics)
