"""The probe set on which the reference strategies measure divergence, and the errors of a model on it.

A probe is a fixed set of clean preferred latents with fixed noise and timesteps (:func:`build_probe`);
:func:`probe_errors` evaluates a model's per-sample denoising errors on it, in chunks, without gradients.
See :mod:`prefopt_core.reference` for how the errors become the divergence D.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from prefopt_core.weights import unwrap

#: ``errors_fn(model, probe) -> (P,)`` per-sample denoising errors of ``model`` on ``probe``.
ErrorsFn = Callable[[nn.Module, "Probe"], Tensor]


@dataclass(frozen=True, eq=False)
class Probe:
    """A fixed probe set: ``P`` clean preferred latents with fixed noise and integer timesteps.

    ``latents`` ``(P, C, h, w)``; ``cond`` per-sample conditioning, each ``(P, ...)`` (the pair's text
    conditioning plus, for SDXL, the preferred image's micro-conditioning); ``noise`` ``(P, C, h, w)``;
    ``t`` ``(P,)`` int64 in ``[0, T)``.
    """

    latents: Tensor
    cond: dict[str, Tensor]
    noise: Tensor
    t: Tensor

    def __post_init__(self) -> None:
        n = self.latents.shape[0] if self.latents.ndim >= 1 else 0
        if self.latents.ndim < 2 or n == 0:
            raise ValueError(
                f"latents must have shape (P, C, ...) with P >= 1, got {tuple(self.latents.shape)}"
            )
        if self.noise.shape != self.latents.shape:
            raise ValueError(
                f"noise {tuple(self.noise.shape)} must match latents {tuple(self.latents.shape)}"
            )
        if self.t.shape != (n,) or self.t.dtype.is_floating_point:
            raise ValueError(
                f"t must be integer timesteps of shape ({n},), got {tuple(self.t.shape)} {self.t.dtype}"
            )
        for k, v in self.cond.items():
            if v.ndim < 1 or v.shape[0] != n:
                raise ValueError(f"cond[{k!r}] must have leading dim P={n}, got {tuple(v.shape)}")

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def slice(self, start: int, stop: int) -> Probe:
        """Rows ``[start, stop)`` of every tensor (a view, no copy)."""
        return Probe(
            latents=self.latents[start:stop],
            cond={k: v[start:stop] for k, v in self.cond.items()},
            noise=self.noise[start:stop],
            t=self.t[start:stop],
        )

    def to(self, device: torch.device | str) -> Probe:
        return Probe(
            latents=self.latents.to(device),
            cond={k: v.to(device) for k, v in self.cond.items()},
            noise=self.noise.to(device),
            t=self.t.to(device),
        )

    def state_dict(self) -> dict[str, Any]:
        """CPU copies of the tensors (for checkpoints)."""
        return {
            "latents": self.latents.detach().cpu().clone(),
            "cond": {k: v.detach().cpu().clone() for k, v in self.cond.items()},
            "noise": self.noise.detach().cpu().clone(),
            "t": self.t.detach().cpu().clone(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Probe:
        return cls(latents=state["latents"], cond=dict(state["cond"]), noise=state["noise"], t=state["t"])


def build_probe(
    latents: Tensor,
    cond: dict[str, Tensor],
    *,
    size: int,
    num_train_timesteps: int,
    seed: int,
) -> Probe:
    """The probe set from the first ``size`` preferred latents ``latents (N, C, h, w)`` and ``cond`` ``(N, ...)``.

    Noise and timesteps come from one ``torch.Generator`` seeded with ``seed``: ``noise ~ N(0, I)``
    ``(size, C, h, w)`` float32, then stratified timesteps ``t[p] = floor((p + u_p) * T / size)``,
    ``u_p ~ U[0, 1)``, so timestep ``t[p]`` lies in the ``p``-th of ``size`` equal slices of ``[0, T)`` and the
    probe covers the whole schedule evenly (e.g. T=1000, size=4: t[0] in [0, 250), ..., t[3] in [750, 1000)).
    """
    if size < 1:
        raise ValueError(f"probe size must be >= 1, got {size}")
    if latents.ndim < 2 or latents.shape[0] < size:
        raise ValueError(
            f"need at least reference.probe_size={size} preferred latents for the probe set, got "
            f"{tuple(latents.shape)}; lower reference.probe_size"
        )
    g = torch.Generator().manual_seed(int(seed))
    x0 = latents[:size].detach().cpu().float().clone()  # (P, C, h, w)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float32)  # (P, C, h, w)
    u = torch.rand(size, generator=g, dtype=torch.float64)  # (P,)
    t = ((torch.arange(size, dtype=torch.float64) + u) * num_train_timesteps / size).long()
    t = t.clamp(0, num_train_timesteps - 1)  # (P,)
    return Probe(
        latents=x0, cond={k: v[:size].detach().cpu().clone() for k, v in cond.items()}, noise=noise, t=t
    )


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode inside the block; each one's own training flag restored after."""
    modules = list(module.modules())
    flags = [m.training for m in modules]
    module.eval()
    try:
        yield
    finally:
        for m, flag in zip(modules, flags, strict=True):
            m.training = flag


def probe_errors(model: nn.Module, probe: Probe, errors_fn: ErrorsFn, *, chunk_size: int) -> Tensor:
    """``(P,)`` float32 CPU errors of ``model`` on ``probe``, evaluated ``chunk_size`` samples at a time.

    No gradients, eval mode (restored after). ``errors_fn`` receives the unwrapped module and a
    :class:`Probe` of at most ``chunk_size`` rows and must return one error per row.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    module = unwrap(model)
    parts: list[Tensor] = []
    with torch.no_grad(), _eval_mode(module):
        for start in range(0, len(probe), chunk_size):
            chunk = probe.slice(start, min(start + chunk_size, len(probe)))
            err = errors_fn(module, chunk)
            if err.shape != (len(chunk),):
                raise ValueError(f"errors_fn must return shape ({len(chunk)},), got {tuple(err.shape)}")
            parts.append(err.detach().float().cpu())
    return torch.cat(parts)  # (P,)
