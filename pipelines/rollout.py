"""Rollout actors of streaming online training: sample from the latest policy, score, pair, push rows.

One :class:`RolloutWorker` (a Ray actor, restarted by Ray when it dies) holds the base pipeline with the
policy's denoiser and a scorer (an :class:`pipelines.online.OnlineSampler`, whose sampling, seeds,
scoring, pairing, margin and skip rules are the round mode's) and loops::

    swap in the newest published policy (PolicyStore.latest), if any
    n = buffer.next_block(index, version, b)     # a block number nobody got before, restarts included
                                                 # (None under online.on_stale=wait: hold back, ask again)
    prompts of draws n*b .. n*b+b-1              # draw d samples prompt d % P with sample_seed(seed, attempt, d, k)
    sample K images per prompt, score, pair best vs worst (OnlineSampler.sample_chunk)
    kept pairs -> latent-cache rows (encoded_kept_table), pair id "online-r{attempt}:{d}"
    buffer.push(rows, version) until accepted   # backpressure: wait while the buffer is full

``attempt`` is the driver's launch number (a rerun after the driver died samples new ids and seeds).
Rows are the sampled latents themselves, exactly as the round mode caches them.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipelines.online import MAX_PROMPTS, OnlineSampler
from pipelines.online_pairs import ChunkResult, encoded_kept_table

logger = logging.getLogger(__name__)

#: Seconds between two push attempts while the buffer is full (or block requests while held back).
PUSH_RETRY_S = 0.05


def pipeline_denoiser(pipe: Any) -> torch.nn.Module:
    """The denoiser of a diffusers pipeline (SD3: ``transformer``; SDXL/SD1.5: ``unet``)."""
    return pipe.transformer if hasattr(pipe, "transformer") else pipe.unet


def attach_lora(denoiser: torch.nn.Module, lora: dict[str, Any] | None) -> None:
    """Give ``denoiser`` the LoRA adapters a policy published as adapters only is loaded into (``lora``:
    ``{"rank", "alpha", "targets"}`` as ``model.lora_*``; ``None``: full weights, nothing to add)."""
    if not lora:
        return
    from peft import LoraConfig

    denoiser.add_adapter(
        LoraConfig(
            r=lora["rank"],
            lora_alpha=lora["alpha"] or lora["rank"],
            init_lora_weights="gaussian",
            target_modules=lora["targets"],
        )
    )


def load_policy_state(
    denoiser: torch.nn.Module, state: dict[str, torch.Tensor], lora: dict[str, Any] | None
) -> None:
    """Load a published policy (:mod:`ray_jobs.training.policy_sync`) into ``denoiser``: every tensor of
    the full weights, or the adapter tensors onto :func:`attach_lora`'s adapters; a mismatch raises."""
    missing, unexpected = denoiser.load_state_dict(state, strict=not lora)
    if unexpected or (not lora and missing):
        raise RuntimeError(f"published policy does not fit the denoiser: {unexpected or missing}")


class RolloutWorker:
    """Ray actor (``ray.remote(max_restarts=-1)(RolloutWorker)``): see the module docstring.

    ``settings``: :class:`pipelines.online.OnlineSettings` fields with ``round`` = the driver's attempt;
    ``lora``: ``{"rank", "alpha", "targets"}`` when the policy is published as LoRA adapters only;
    ``index``: this actor's number in the pool (the buffer's owner of its block in flight).
    """

    def __init__(
        self,
        settings: dict[str, Any],
        prompts: list[str],
        lora: dict[str, Any] | None = None,
        index: int = 0,
    ) -> None:
        self.sampler = OnlineSampler(settings, cache_dir="")
        self.prompts = list(prompts)
        self.index = index
        self.serial = 0
        self.version = 0
        self.lora = lora
        attach_lora(self.denoiser, lora)

    @property
    def denoiser(self) -> torch.nn.Module:
        return pipeline_denoiser(self.sampler.pipe)

    def maybe_swap(self, store: Any) -> bool:
        """Load the newest publication of ``store`` if there is one newer than ours; True if swapped."""
        import ray

        latest = ray.get(store.latest.remote(self.serial))
        if latest is None:
            return False
        serial, version, (ref,) = latest
        load_policy_state(self.denoiser, ray.get(ref), self.lora)
        self.serial, self.version = serial, version
        return True

    def sample_block(self, block: int) -> tuple[pa.Table | None, ChunkResult, float]:
        """Sample draw block ``block``; -> (rows or None, the decisions, seconds)."""
        b = self.sampler.settings.batch_size
        start = block * b
        if start + b > MAX_PROMPTS:
            raise RuntimeError(f"draw {start + b} exceeds the {MAX_PROMPTS} sample-seed range")
        prompts = [self.prompts[(start + i) % len(self.prompts)] for i in range(b)]
        t0 = time.perf_counter()
        result = self.sampler.sample_chunk(start, prompts)
        table = encoded_kept_table(self.sampler.adapter, result, self.sampler.settings)
        return table, result, time.perf_counter() - t0

    def run(self, buffer: Any, store: Any) -> int:
        """Sample and push until the buffer closes; returns the number of blocks sampled."""
        import ray

        blocks = 0
        b = self.sampler.settings.batch_size
        while not ray.get(buffer.is_closed.remote()):
            self.maybe_swap(store)
            version = self.version
            block = ray.get(buffer.next_block.remote(self.index, version, b))
            if block is None:  # held back: the block could not be trained within the staleness bound
                time.sleep(PUSH_RETRY_S)
                continue
            table, result, seconds = self.sample_block(block)
            rewards = [float(x) for x in result.scores.reshape(-1) if np.isfinite(x)]
            kept = sum(c.kept for c in result.choices)
            images = result.scores.size
            buffer.report_rollout.remote(images, seconds, rewards, kept, len(result.choices) - kept)
            blocks += 1
            while table is not None:
                status = ray.get(buffer.push.remote(table, version, self.index))
                if status == "ok":
                    break
                if status == "closed":
                    return blocks
                time.sleep(PUSH_RETRY_S)
        return blocks

    def pid(self) -> int:
        import os

        return os.getpid()
