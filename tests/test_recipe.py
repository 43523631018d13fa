"""The training worker recipe in one process, without Ray: :class:`LocalContext` gives it the cache, a
checkpoint directory and a progress list; DeepSpeed (ZeRO-2) runs on a one-rank gloo process group.

Two 6-step runs of the tiny SD3 with the same seed and data: one uninterrupted, one that raises at step 5
(``train.fail_at_step``) and is resumed by a new recipe from its step-3 checkpoint. Same process, same
batch shapes and kernels, so the two trajectories are compared like with like.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.cache_reader import batch_from_table, read_cache_table
from pipelines.latent_cache import read_manifest
from prefopt_core.config import load_config
from prefopt_core.models.sd3 import SD3Adapter
from prefopt_core.objective import PreferenceObjective
from prefopt_core.timesteps import TimestepConfig
from ray_jobs.training.context import LocalContext
from ray_jobs.training.recipe import WorkerRecipe, run_recipe
from tests._local_recipe import local_recipe
from tests._runs import history, train_overrides

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6


def _recipe(
    workdir: Path, tiny_sd3: Path, cache: Path, extra: list[str]
) -> tuple[WorkerRecipe, LocalContext]:
    cfg = load_config(
        ROOT / "configs/demo.yaml",
        [
            *train_overrides(workdir, tiny_sd3, cache, "local"),
            "train.num_workers=1",
            f"train.max_steps={STEPS}",
            "train.checkpoint_every=3",
            "train.eval_every=3",
            *extra,
        ],
    )
    return local_recipe(cfg, cache, tiny_sd3, workdir, progress_every_s=0.0)  # a record at every step


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory, tiny_sd3, cache8, process_group):
    """``(uninterrupted, resumed)``: each ``(workdir, recipe, context)`` after its run ended."""
    root = tmp_path_factory.mktemp("recipe")
    full, full_ctx = _recipe(root / "full", tiny_sd3, cache8, [])
    run_recipe(full)
    faulted, _ = _recipe(root / "fault", tiny_sd3, cache8, ["train.fail_at_step=5"])
    with pytest.raises(RuntimeError, match="injected fault at step 5"):
        run_recipe(faulted)
    resumed, resumed_ctx = _recipe(root / "fault", tiny_sd3, cache8, ["train.fail_at_step=5"])
    run_recipe(resumed)
    return (root / "full", full, full_ctx), (root / "fault", resumed, resumed_ctx)


def _fixed_batch_loss(adapter, cache: Path, policy, reference) -> float:
    """DPO loss (beta 500) of the whole 8-pair cache as one batch, with the noise and timesteps of epoch 0."""
    manifest = read_manifest(cache)
    batch = batch_from_table(read_cache_table(cache, manifest), manifest["columns"])
    objective = PreferenceObjective(
        adapter,
        loss_name="dpo",
        loss_params={"beta": 500.0},
        timesteps=TimestepConfig(sampling="logit_normal"),
        seed=0,
    )
    with torch.no_grad():
        return float(objective(policy, batch, epoch=0, reference=reference).loss)


def test_one_process_recipe_lowers_the_fixed_batch_loss(local_runs, tiny_sd3, cache8):
    """Before training policy == reference, so every DPO margin is 0 and the fixed-batch loss is exactly
    ln 2; after 6 steps at lr 1e-3 the exported policy prefers the chosen images: loss < ln 2 - 0.02."""
    (workdir, _, _), _ = local_runs
    adapter = SD3Adapter(tiny_sd3)
    base = adapter.load_denoiser().eval()
    trained = adapter.load_denoiser(workdir / "export" / "transformer").eval()
    assert _fixed_batch_loss(adapter, cache8, base, base) == pytest.approx(math.log(2), abs=1e-6)
    assert _fixed_batch_loss(adapter, cache8, trained, base) < math.log(2) - 0.02


def test_resume_after_a_fault_follows_the_uninterrupted_trajectory(local_runs):
    """The faulted run restarted from its step-3 checkpoint (engine, optimizer, data position, reference
    state) and trained steps 4-6 again: its losses at steps 1..6 equal the uninterrupted run's (same
    process and kernels: only float reassociation could differ, hence rtol 1e-5)."""
    (_, full, _), (_, resumed, _) = local_runs
    a = history(full.inputs.tracking_uri, full.inputs.run_id, "loss")
    b = history(resumed.inputs.tracking_uri, resumed.inputs.run_id, "loss")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, STEPS + 1))
    for (_, x), (_, y) in zip(a, b, strict=True):
        assert y == pytest.approx(x, rel=1e-5)


def test_resumed_recipe_starts_at_the_checkpoint_step(local_runs):
    """The resumed recipe's progress counter starts at the checkpoint (step 3): its first record says 4/6
    done, and the last 6/6 with the final checkpoint named."""
    _, (_, _, ctx) = local_runs
    assert ctx.records[0]["done"] == 4 and ctx.records[0]["total"] == STEPS
    assert ctx.records[-1]["done"] == STEPS
    assert ctx.records[-1]["extra"]["checkpoint"] == f"step {STEPS}"


def test_progress_records_carry_step_loss_and_rate(local_runs):
    """One record per step (``progress_every_s=0``), each with the step, the loss, implicit accuracy,
    reward margin and pairs/s of that step; the step counter is the task's ``done``."""
    (_, _, ctx), _ = local_runs
    records = [r for r in ctx.records if r["task"] == "train"]
    assert [r["done"] for r in records][:STEPS] == list(range(1, STEPS + 1))
    for key in ("loss", "implicit_acc", "reward_margin", "pairs/s"):
        assert all(key in r["extra"] for r in records[:STEPS]), key


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_sd3, cache8, process_group):
    """A 4-step LoRA (rank 4) run with a frozen reference, in one process: ``(workdir, context)``."""
    workdir = tmp_path_factory.mktemp("lora")
    recipe, ctx = _recipe(
        workdir,
        tiny_sd3,
        cache8,
        ["reference.strategy=frozen", "model.lora_rank=4", "train.max_steps=4", "train.eval_every=2"],
    )
    run_recipe(recipe)
    return workdir, ctx


def test_lora_reference_is_the_base_with_adapters_disabled(lora_run):
    """Only adapter weights train, and the reference is the same module with its adapters switched off:
    its probe errors stay those of the pretrained model (``kl/ref_init`` exactly 0) while the policy moves
    away from them (``kl/policy_init`` > 0) -- read from the last checkpoint's report."""
    _, ctx = lora_run
    final = ctx.reports[-1]
    assert final["step"] == 4
    assert final["kl/ref_init"] == 0.0 and final["kl/policy_init"] > 0


def test_lora_export_loads_with_load_lora_weights_like_the_fused_export(lora_run, tiny_sd3):
    """The exported adapters load into the base pipeline with ``load_lora_weights`` and give (3 steps, same
    seed, same batch) the same image as the fused full-weight export, and a different one from the base."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    workdir, _ = lora_run

    def sample(pipe):
        return pipe(
            "a red circle",
            height=32,
            width=32,
            num_inference_steps=3,
            guidance_scale=1.0,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images[0]

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    base = sample(pipe)
    pipe.load_lora_weights(workdir / "export" / "lora")
    with_lora = sample(pipe)
    fused_transformer = SD3Transformer2DModel.from_pretrained(workdir / "export" / "transformer")
    fused = sample(StableDiffusion3Pipeline.from_pretrained(tiny_sd3, transformer=fused_transformer))
    assert np.abs(with_lora - base).max() > 1e-4
    np.testing.assert_allclose(with_lora, fused, atol=1e-4)


def test_zero3_reference_updates_after_probe_forwards(tmp_path, tiny_sd3, cache8, process_group):
    """ZeRO-3 with model-sized prefetch buffers: the divergence probe's forward passes leave parameters
    gathered or in flight, and the periodic reference copy must still gather every weight (it releases
    them first). tau=2 over 4 steps: updates at steps 2 and 4, so the last report counts 2."""
    recipe, ctx = _recipe(
        tmp_path, tiny_sd3, cache8, ["train.zero_stage=3", "reference.tau=2", "train.max_steps=4"]
    )
    run_recipe(recipe)
    assert ctx.reports[-1]["step"] == 4
    assert ctx.reports[-1]["ref/updates"] == 2


def test_step_time_includes_the_previous_steps_logging(
    tmp_path, tiny_sd3, cache8, process_group, monkeypatch
):
    """``time/step_s`` is the wall time since the previous step ended, so it carries that step's metric flush:
    with ``log_every=1`` and a flush made 0.3 s slower, steps 2 and 3 each log >= 0.3 s. (A timer around the
    optimizer step alone would not see it, and pairs/s would overstate what the run delivers.)"""
    import time

    slow = 0.3
    original = WorkerRecipe._flush

    def slow_flush(self, *args, **kwargs):
        time.sleep(slow)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(WorkerRecipe, "_flush", slow_flush)
    recipe, _ = _recipe(tmp_path, tiny_sd3, cache8, ["train.max_steps=3", "train.log_every=1"])
    run_recipe(recipe)
    steps = history(recipe.inputs.tracking_uri, recipe.inputs.run_id, "time/step_s")
    assert [s for s, _ in steps] == [1, 2, 3]
    assert all(v >= slow for _, v in steps[1:]), steps


def test_one_rank_skips_the_gradient_all_reduce(tmp_path, tiny_sd3, cache8, process_group, monkeypatch):
    """One worker (ZeRO-2 runs as stage 0 there): DeepSpeed's all-reduce of the gradients is never called in a
    2-step run, which still completes both steps (its last report is step 2)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    calls = []
    original = DeepSpeedEngine.allreduce_gradients

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DeepSpeedEngine, "allreduce_gradients", counting)
    recipe, ctx = _recipe(tmp_path, tiny_sd3, cache8, ["train.max_steps=2"])
    run_recipe(recipe)
    assert ctx.reports[-1]["step"] == 2
    assert calls == []
