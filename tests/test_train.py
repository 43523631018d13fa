"""Ray Train + DeepSpeed training end to end on the tiny SD3 (2 workers, gloo, CPU): the fixed-batch loss,
a worker failure, a killed driver, ZeRO-2/ZeRO-3 equivalence, the cache's two read paths.

Two 10-step runs of the same seed share one 8-pair cache, each in its own fixture (a failure of one
does not stop the tests of the other): ZeRO-2 through an injected worker failure and ZeRO-3 through a
killed driver and its rerun. A Ray Train run costs tens of seconds of start-up, so each run's checks are
several tests over one run. The recipe's own resume, LoRA and ZeRO-3 reference updates are tested in one
process in tests/test_recipe.py; an unreachable tracking server in tests/test_train_ops.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.cache_reader import batch_from_table
from pipelines.latent_cache import read_manifest
from prefopt_core.config import ConfigError, load_config
from prefopt_core.models.sd3 import SD3Adapter
from prefopt_core.objective import PreferenceObjective
from prefopt_core.timesteps import TimestepConfig
from ray_jobs.training.driver import run_training
from tests._runs import history, train_overrides

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

#: The metrics every training step logs.
METRICS = (
    "loss",
    "implicit_acc",
    "reward_margin",
    "mse/policy_w",
    "mse/policy_l",
    "mse/ref_w",
    "mse/ref_l",
    "lr",
    "pairs_per_s",
)


COMMON = ["train.max_steps=10", "train.checkpoint_every=3"]


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory, tiny_sd3, cache8, ray_cluster):
    """A 10-step ZeRO-2 run (reference update every 5 steps, checkpoints every 3), in this process: one
    worker raises at step 5 (``train.fail_at_step``), and Ray Train restarts the group from the step-3
    checkpoint (``train.max_failures=1``). Returns ``(workdir, summary)``."""
    wd = tmp_path_factory.mktemp("zero2")
    z2 = run_training(
        load_config(
            ROOT / "configs/demo.yaml",
            [
                *train_overrides(wd / "z2", tiny_sd3, cache8, "z2"),
                *COMMON,
                "train.zero_stage=2",
                "train.fail_at_step=5",
                "train.max_failures=1",
            ],
        )
    )
    return wd, z2


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, tiny_sd3, cache8, ray_cluster):
    """The same run under ZeRO-3, as ``python -m ray_jobs.cli train`` joined to the session's Ray (as a
    second driver joins a cluster): SIGKILLed once its first checkpoint exists, then the same command
    again, which resumes. Returns ``(summary, console output of the rerun)``."""
    wd = tmp_path_factory.mktemp("zero3")
    args = [
        sys.executable,
        "-m",
        "ray_jobs.cli",
        "train",
        str(ROOT / "configs/demo.yaml"),
        *train_overrides(wd / "z3", tiny_sd3, cache8, "z3"),
        *COMMON,
        "train.zero_stage=3",
        f"ray.address={ray_cluster.get_runtime_context().gcs_address}",
    ]
    first = subprocess.Popen(
        args, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    storage = wd / "z3" / "ray_results" / "z3"
    deadline = time.time() + 300  # a hang guard, not a timing check
    while time.time() < deadline and not list(storage.glob("step_*")):
        assert first.poll() is None, "the first ZeRO-3 driver ended before it could be killed"
        time.sleep(0.2)
    assert list(storage.glob("step_*")), "no checkpoint within 300 s"
    os.killpg(first.pid, signal.SIGKILL)  # the driver (its job's actors are ended by Ray, not the cluster)
    first.wait()
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    z3 = json.loads((wd / "z3" / "train_summary.json").read_text())
    return SimpleNamespace(**z3), done.stdout + done.stderr


def fixed_batch_loss(adapter, cache_dir, policy, reference, beta: float) -> float:
    """DPO loss of the whole cache as one batch, noise/timesteps of epoch 0 (a fixed batch)."""
    manifest = read_manifest(cache_dir)
    table = pq.read_table(cache_dir / manifest["files"][0])
    batch = batch_from_table(table, manifest["columns"])
    objective = PreferenceObjective(
        adapter,
        loss_name="dpo",
        loss_params={"beta": beta},
        timesteps=TimestepConfig(sampling="logit_normal"),
        seed=0,
    )
    with torch.no_grad():
        return float(objective(policy, batch, epoch=0, reference=reference).loss)


def test_two_worker_zero2_dpo_lowers_fixed_batch_loss(zero2_run, tiny_sd3, cache8):
    """The 2-worker ZeRO-2 run (10 steps over the 8 cached pairs, through one failure and restart).

    Expected: (1) before training policy == reference, so the fixed-batch DPO loss (beta 500, all 8
    pairs, the noise and timesteps of epoch 0) is exactly ln 2 (inside = 0 for every pair); (2) the
    exported policy's loss on the same batch against the *pretrained* model is below ln 2 - 0.02 (it now
    prefers the chosen images); (3) MLflow holds each required metric at steps 1..10 exactly once; (4) the
    export loads into StableDiffusion3Pipeline and generates a 32x32 image.
    """
    _, z2 = zero2_run
    client = mlflow.MlflowClient(z2.mlflow_tracking_uri)
    for key in METRICS:
        steps = [m.step for m in client.get_metric_history(z2.mlflow_run_id, key)]
        assert sorted(steps) == list(range(1, 11)), key
    assert client.get_run(z2.mlflow_run_id).data.params["train.zero_stage"] == "2"

    adapter = SD3Adapter(tiny_sd3)
    base = adapter.load_denoiser().eval()
    trained = adapter.load_denoiser(z2.export_dir).eval()
    before = fixed_batch_loss(adapter, cache8, base, base, beta=500)
    after = fixed_batch_loss(adapter, cache8, trained, base, beta=500)
    assert before == pytest.approx(math.log(2), abs=1e-6)
    assert after < math.log(2) - 0.02

    pipe = adapter.pipeline(trained)
    image = pipe(
        "a red circle",
        height=32,
        width=32,
        num_inference_steps=2,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (32, 32)


def test_fault_injection_ends_with_unique_contiguous_steps(zero2_run):
    """The worker raising at step 5 restarts the group from the step-3 checkpoint; the run still ends at
    max_steps=10 and every metric has exactly the steps 1..10 (steps 4-5 logged once, not twice)."""
    wd, z2 = zero2_run
    assert (wd / "z2" / ".fault_injected_z2_5").exists(), "the fault must have fired"
    for key in ("loss", "implicit_acc", "reward_margin"):
        steps = [s for s, _ in history(z2.mlflow_tracking_uri, z2.mlflow_run_id, key)]
        assert steps == list(range(1, 11)), key
    # reference/KL metrics also carry the step-0 measurement of the pretrained model
    assert [s for s, _ in history(z2.mlflow_tracking_uri, z2.mlflow_run_id, "ref/updates")] == list(range(11))
    assert z2.final_metrics["step"] == 10


def test_rerun_after_driver_kill_resumes(zero3_run):
    """The ZeRO-3 driver was SIGKILLed once its first checkpoint existed; the same command again resumed
    the run (same MLflow run, from the checkpoint) and ended at max_steps=10 with each step logged once
    (steps the killed attempt logged after its checkpoint are not logged again)."""
    z3, _ = zero3_run
    assert z3.resumed_run is True and z3.final_metrics["step"] == 10
    for key in ("loss", "implicit_acc", "reward_margin"):
        assert [s for s, _ in history(z3.mlflow_tracking_uri, z3.mlflow_run_id, key)] == list(range(1, 11)), (
            key
        )


def test_zero2_and_zero3_agree_including_reference_updates(zero2_run, zero3_run):
    """Same seed, data order and per-pair noise: ZeRO-3 (partitioned policy, sharded inference-only
    reference, gathered reference copy) must follow the ZeRO-2 trajectory to float tolerance over 10
    steps, with 2 reference updates (steps 5 and 10) -- although ZeRO-2 went through a worker failure and
    restart and ZeRO-3 through a killed driver and a rerun: both resumes are exact."""
    (_, z2), (z3, _) = zero2_run, zero3_run
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


def test_train_console_shows_progress_and_no_ray_noise(zero3_run):
    """``prefopt train``'s console (the resumed ZeRO-3 run, steps 4..10 of 10): progress lines from the
    rank-0 relay with step k/10, the loss and an ETA while steps remain, and none of Ray Train's
    ``PlacementGroupCleaner`` warnings (Ray's own logs stay in the session logs)."""
    _, console = zero3_run
    lines = [line for line in console.splitlines() if re.search(r"train: \d+/10 steps", line)]
    assert lines, console[-3000:]
    assert any("loss" in line and "ETA" in line for line in lines), lines
    assert "train: 10/10 steps" in lines[-1]
    assert "PlacementGroupCleaner" not in console


def test_require_resume_without_checkpoint_fails_loudly(tmp_path, tiny_sd3, cache8):
    cfg = load_config(
        ROOT / "configs/demo.yaml",
        [*train_overrides(tmp_path, tiny_sd3, cache8, "nothing-here"), "train.resume=require"],
    )
    with pytest.raises(ConfigError, match="no checkpoint"):
        run_training(cfg)


def test_driver_read_and_streamed_cache_give_the_same_rows(cache8, ray_cluster):
    """The small-cache path (the driver reads the 8-pair cache, ~1 MB, and puts it into the object store)
    and the large-cache path (``train.driver_read_max_mb=0``: Ray Data read tasks stream it) must feed
    training the same thing. Expected: the same columns (the geometry columns are not read), the same 8
    rows in shard order, byte-identical."""
    import pyarrow as pa
    import ray

    from pipelines.cache_reader import GEOMETRY_COLUMNS, cache_dataset

    manifest = read_manifest(cache8)
    tables = {}
    for limit in ("256", "0"):
        cfg = load_config(None, [f"cache.dir={cache8}", f"train.driver_read_max_mb={limit}"])
        dataset = cache_dataset(cfg.cache_dir, manifest, driver_read_max_mb=cfg.train.driver_read_max_mb)
        tables[limit] = pa.concat_tables(ray.get(dataset.to_arrow_refs())).combine_chunks()
    driver, streamed = tables["256"], tables["0"]
    expected_columns = [c for c in ["pair_key", *manifest["columns"]] if c not in GEOMETRY_COLUMNS]
    assert driver.column_names == expected_columns
    assert driver.num_rows == 8
    assert (
        driver.column("pair_key").to_pylist()
        == pq.read_table(cache8 / manifest["files"][0], columns=["pair_key"]).column("pair_key").to_pylist()
    )
    assert streamed.equals(driver)


def test_rerun_of_a_finished_run_reports_its_final_metrics(zero2_run, tiny_sd3, cache8):
    """The finished ZeRO-2 run, rerun with the same config: it resumes at step 10 = max_steps and trains
    nothing, yet its summary carries the run's final metrics (step 10 and the same final loss), read back
    from its MLflow run; no step is logged twice."""
    wd, z2 = zero2_run
    again = run_training(
        load_config(
            ROOT / "configs/demo.yaml",
            [
                *train_overrides(wd / "z2", tiny_sd3, cache8, "z2"),
                *COMMON,
                "train.zero_stage=2",
                "train.fail_at_step=5",
                "train.max_failures=1",
            ],
        )
    )
    assert again.resumed_run is True and again.mlflow_run_id == z2.mlflow_run_id
    assert again.final_metrics["step"] == 10
    assert again.final_metrics["loss"] == pytest.approx(z2.final_metrics["loss"])
    assert [s for s, _ in history(again.mlflow_tracking_uri, again.mlflow_run_id, "loss")] == list(
        range(1, 11)
    )
