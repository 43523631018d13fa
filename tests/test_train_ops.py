"""Training in operation: fault tolerance, ZeRO-2/ZeRO-3 equivalence, resume, LoRA, MLflow outages.

All runs share one 8-pair cache of the tiny SD3 and 2 Ray Train workers over gloo.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from prefopt_core.config import load_config
from ray_jobs.train import run_training
from tests._cache import synthetic_cache

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache8(tmp_path_factory, tiny_sd3, ray_cluster):
    root = tmp_path_factory.mktemp("ops_cache")
    return synthetic_cache(root, tiny_sd3, num_pairs=8, seed=21)


def base_overrides(workdir, tiny_sd3, cache, name):
    return [
        f"run.workdir={workdir}",
        f"run.name={name}",
        f"model.pretrained={tiny_sd3}",
        "model.max_sequence_length=256",  # the shared cache's (schema default); demo.yaml's toy base reads 16
        f"cache.dir={cache}",
        "train.num_workers=2",
        "train.batch_size=2",
        "train.lr=1e-3",
        "loss.beta=500",
        "reference.strategy=periodic",
        "reference.tau=5",
        "train.eval_every=5",
        "timesteps.sampling=gamma",
        "timesteps.bins=10",
        "timesteps.reward_scale=true",
        "train.sample_prompts=0",  # no end-of-run sample grid (tests/test_train_families.py checks it)
    ]


def history(uri, run_id, key):
    client = mlflow.MlflowClient(uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory, tiny_sd3, cache8, ray_cluster):
    """Two 10-step runs of the same seed with a reference update every 5 steps: ZeRO-2 with an injected
    worker failure at step 5 (checkpoints every 3 steps, one restart allowed) and ZeRO-3 uninterrupted."""
    wd = tmp_path_factory.mktemp("zero")
    common = ["train.max_steps=10", "train.checkpoint_every=3"]
    z2 = run_training(
        load_config(
            ROOT / "configs/demo.yaml",
            [
                *base_overrides(wd, tiny_sd3, cache8, "z2"),
                *common,
                "train.zero_stage=2",
                "train.fail_at_step=5",
                "train.max_failures=1",
            ],
        )
    )
    z3 = run_training(
        load_config(
            ROOT / "configs/demo.yaml",
            [*base_overrides(wd, tiny_sd3, cache8, "z3"), *common, "train.zero_stage=3"],
        )
    )
    return wd, z2, z3


def test_fault_injection_ends_with_unique_contiguous_steps(zero_runs):
    """The worker raising at step 5 restarts the group from the step-3 checkpoint; the run still ends at
    max_steps=10 and every metric has exactly the steps 1..10 (steps 4-5 logged once, not twice)."""
    wd, z2, _ = zero_runs
    assert (wd / ".fault_injected_z2_5").exists(), "the fault must have fired"
    for key in ("loss", "implicit_acc", "reward_margin"):
        steps = [s for s, _ in history(z2.mlflow_tracking_uri, z2.mlflow_run_id, key)]
        assert steps == list(range(1, 11)), key
    # reference/KL metrics also carry the step-0 measurement of the pretrained model
    assert [s for s, _ in history(z2.mlflow_tracking_uri, z2.mlflow_run_id, "ref/updates")] == list(range(11))
    assert z2.final_metrics["step"] == 10


def test_zero2_and_zero3_agree_including_reference_updates(zero_runs):
    """Same seed, data order and per-pair noise: ZeRO-3 (partitioned policy, sharded inference-only
    reference, gathered reference copy) must follow the ZeRO-2 trajectory (which itself went through a
    failure and resume) to float tolerance over 10 steps, with 2 reference updates (steps 5 and 10)."""
    _, z2, z3 = zero_runs
    for key in ("loss", "reward_margin", "mse/policy_w", "mse/ref_w"):
        a = np.array([v for _, v in history(z2.mlflow_tracking_uri, z2.mlflow_run_id, key)])
        b = np.array([v for _, v in history(z3.mlflow_tracking_uri, z3.mlflow_run_id, key)])
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-4, err_msg=key)
    updates = history(z3.mlflow_tracking_uri, z3.mlflow_run_id, "ref/updates")
    assert updates[-1] == (10, 2.0) and updates[5] == (5, 1.0) and updates[4] == (4, 0.0)
    from diffusers import SD3Transformer2DModel

    w2 = SD3Transformer2DModel.from_pretrained(z2.export_dir).state_dict()
    w3 = SD3Transformer2DModel.from_pretrained(z3.export_dir).state_dict()
    for k in w2:
        torch.testing.assert_close(w2[k], w3[k], rtol=1e-3, atol=1e-4)


def test_require_resume_without_checkpoint_fails_loudly(tmp_path, tiny_sd3, cache8):
    cfg = load_config(
        ROOT / "configs/demo.yaml",
        [*base_overrides(tmp_path, tiny_sd3, cache8, "nothing-here"), "train.resume=require"],
    )
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run_training(cfg)


def test_lora_run_exports_loadable_adapters(tmp_path, tiny_sd3, cache8):
    """LoRA rank 4: only adapter weights train; the reference is the base with adapters disabled (its
    probe errors stay those of the pretrained model: kl/ref_init == 0); the adapters load with
    pipe.load_lora_weights and give the same images as the fused full export."""
    cfg = load_config(
        ROOT / "configs/demo.yaml",
        [
            *base_overrides(tmp_path, tiny_sd3, cache8, "lora"),
            "reference.strategy=frozen",
            "model.lora_rank=4",
            "train.max_steps=4",
            "train.eval_every=2",
        ],
    )
    summary = run_training(cfg)
    assert summary.final_metrics["kl/ref_init"] == 0.0 and summary.final_metrics["kl/policy_init"] > 0
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

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
    pipe.load_lora_weights(Path(cfg.workdir) / "export" / "lora")
    with_lora = sample(pipe)
    fused = sample(
        StableDiffusion3Pipeline.from_pretrained(
            tiny_sd3, transformer=SD3Transformer2DModel.from_pretrained(summary.export_dir)
        )
    )
    assert np.abs(with_lora - base).max() > 1e-4
    np.testing.assert_allclose(with_lora, fused, atol=1e-4)


def test_unreachable_mlflow_never_kills_training(tmp_path, tiny_sd3, cache8):
    """With nothing listening at the tracking URI, training completes, and the metrics of every step are
    spilled locally and replay into a real store afterwards (steps 1..3 of `loss`)."""
    from ray_jobs.tracking import replay_pending

    cfg = load_config(
        ROOT / "configs/demo.yaml",
        [
            *base_overrides(tmp_path, tiny_sd3, cache8, "offline"),
            "reference.strategy=frozen",
            "train.max_steps=3",
            "train.export=false",
            "tracking.uri=http://127.0.0.1:9",
        ],
    )
    summary = run_training(cfg)
    assert summary.mlflow_run_id is None and summary.final_metrics["step"] == 3
    pending = Path(cfg.workdir) / "mlflow_pending.jsonl"
    rows = [json.loads(line) for line in pending.read_text().splitlines()]
    assert sorted({r["step"] for r in rows if r["key"] == "loss"}) == [1, 2, 3]
    uri = f"sqlite:///{tmp_path / 'later.db'}"
    assert replay_pending(uri, pending) == len(rows)
    client = mlflow.MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])[0]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]


def test_rerun_after_driver_kill_resumes(tmp_path, tiny_sd3, cache8):
    """SIGKILL the `prefopt train` driver once its first checkpoint exists; the same command again
    resumes the run (same MLflow run, continues from the checkpoint) and ends at max_steps with each
    step logged once."""
    args = [
        sys.executable,
        "-m",
        "ray_jobs.cli",
        "train",
        str(ROOT / "configs/demo.yaml"),
        *base_overrides(tmp_path, tiny_sd3, cache8, "killed"),
        "reference.strategy=frozen",
        "train.max_steps=8",  # the first run is killed at its first checkpoint (step 2), well before 8
        "train.checkpoint_every=2",
        "train.export=false",
        "train.num_workers=1",
        "ray.address=local",
    ]
    env = {**os.environ, "PREFOPT_LOG_LEVEL": "WARNING"}
    first = subprocess.Popen(
        args, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    storage = tmp_path / "ray_results" / "killed"
    deadline = time.time() + 300
    while time.time() < deadline and not list(storage.glob("step_*")):
        assert first.poll() is None, "the first run ended before it could be killed"
        time.sleep(0.2)
    assert list(storage.glob("step_*")), "no checkpoint within 300 s"
    os.killpg(first.pid, signal.SIGKILL)  # the driver and everything it started
    first.wait()
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["resumed_run"] is True and summary["final_metrics"]["step"] == 8
    steps = [s for s, _ in history(summary["mlflow_tracking_uri"], summary["mlflow_run_id"], "loss")]
    assert steps == list(range(1, 9))
