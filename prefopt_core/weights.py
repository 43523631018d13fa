"""Weight copies and full state dicts that work on plain modules and on ZeRO-3 partitioned ones.

The reference strategies (:mod:`prefopt_core.reference`) copy the policy into the reference and checkpoint
the reference with these; DeepSpeed is imported only when a partitioned parameter is present, so plain
PyTorch modules need no DeepSpeed at all.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DeepSpeed engine, ``DistributedDataParallel`` or ``DataParallel``; else ``model``.

    Only these wrappers are unwrapped (by type, or by the ``deepspeed.`` module path of the engine class,
    so DeepSpeed need not be imported): a plain module with a submodule named ``module`` is returned as is.
    """
    inner = getattr(model, "module", None)
    is_wrapper = isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel) or type(
        model
    ).__module__.startswith("deepspeed.")
    return inner if is_wrapper and isinstance(inner, nn.Module) else model


def _is_partitioned(p: Tensor) -> bool:
    """Whether ``p`` is a ZeRO-3 partitioned parameter (DeepSpeed tags those with ``ds_id``)."""
    return hasattr(p, "ds_id")


def _gathered(params: list[Tensor], modifier_rank: int | None):
    """``deepspeed.zero.GatheredParameters`` over the ZeRO-3 parameters among ``params``; a no-op if none."""
    zero_params = [p for p in params if _is_partitioned(p)]
    if not zero_params:
        return contextlib.nullcontext()
    import deepspeed  # lazy: prefopt_core stays importable without DeepSpeed

    return deepspeed.zero.GatheredParameters(zero_params, modifier_rank=modifier_rank)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _check_same_names(src: dict[str, Any], dst: dict[str, Any], what: str) -> None:
    if src.keys() != dst.keys():
        missing, unexpected = sorted(dst.keys() - src.keys()), sorted(src.keys() - dst.keys())
        raise ValueError(
            f"{what} differ: missing in source {missing[:5]}, not in destination {unexpected[:5]}"
        )


@torch.no_grad()
def plain_copy(src: nn.Module, dst: nn.Module) -> None:
    """Copy ``src``'s parameters and buffers into ``dst`` in place (``dst.load_state_dict(src.state_dict())``).

    ``dst`` keeps its parameter objects, device and dtype (values are cast, e.g. fp32 -> bf16); strict
    about names. For modules whose parameters are not ZeRO-3 partitioned.
    """
    unwrap(dst).load_state_dict(unwrap(src).state_dict(), strict=True)


@torch.no_grad()
def zero3_copy(src: nn.Module, dst: nn.Module) -> None:
    """Copy ``src`` into ``dst`` where either may hold ZeRO-3 partitioned parameters (trl's ref-sync pattern).

    One parameter at a time (memory bounded by the largest parameter, not the model): the source is gathered
    read-only (``modifier_rank=None``), the destination with ``modifier_rank=0``; rank 0 writes and DeepSpeed
    broadcasts and re-partitions the destination on exit. A destination parameter that is not partitioned is
    a full replica and is written on every rank. Buffers are never partitioned and are copied directly.
    Must be called on every rank. Falls back to :func:`plain_copy` semantics for ordinary modules (DeepSpeed
    is imported only when a partitioned parameter is present).
    """
    src, dst = unwrap(src), unwrap(dst)
    src_params, dst_params = dict(src.named_parameters()), dict(dst.named_parameters())
    _check_same_names(src_params, dst_params, "parameters")
    rank = _rank()
    for name, p_dst in dst_params.items():
        p_src = src_params[name]
        with _gathered([p_src], None), _gathered([p_dst], 0):
            if rank == 0 or not _is_partitioned(p_dst):
                if p_src.shape != p_dst.shape:
                    raise ValueError(f"parameter {name}: shape {tuple(p_src.shape)} != {tuple(p_dst.shape)}")
                p_dst.data.copy_(p_src.data)
    src_buffers, dst_buffers = dict(src.named_buffers()), dict(dst.named_buffers())
    _check_same_names(src_buffers, dst_buffers, "buffers")
    for name, b in dst_buffers.items():
        b.copy_(src_buffers[name])


@torch.no_grad()
def full_state_dict(module: nn.Module, *, rank0_only: bool = False) -> dict[str, Tensor]:
    """CPU copies of every parameter and persistent buffer, gathering ZeRO-3 parameters one at a time.

    Collective under ZeRO-3 (call on every rank). With ``rank0_only`` the other ranks take part in the
    gathers but keep nothing and return ``{}`` (bounds host memory when only rank 0 writes the file).
    """
    module = unwrap(module)
    keep = not rank0_only or _rank() == 0
    keys = set(module.state_dict().keys())
    out: dict[str, Tensor] = {}
    for name, p in module.named_parameters():
        with _gathered([p], None):
            if keep:
                out[name] = p.detach().cpu().clone()
    if keep:
        for name, b in module.named_buffers():
            if name in keys:
                out[name] = b.detach().cpu().clone()
    return out


@torch.no_grad()
def load_full_state_dict(module: nn.Module, state: dict[str, Tensor]) -> None:
    """Write a :func:`full_state_dict` into ``module`` in place (ZeRO-3 aware; call on every rank)."""
    module = unwrap(module)
    params = dict(module.named_parameters())
    keys = set(module.state_dict().keys())
    buffers = {k: b for k, b in module.named_buffers() if k in keys}
    _check_same_names(state, {**params, **buffers}, "state entries")
    rank = _rank()
    for name, p in params.items():
        with _gathered([p], 0):
            if rank == 0 or not _is_partitioned(p):
                p.data.copy_(state[name])
    for name, b in buffers.items():
        b.copy_(state[name])
