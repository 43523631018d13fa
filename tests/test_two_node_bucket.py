"""The demo path with everything in a bucket, on two Ray nodes of one machine, against the local path.

One run (module fixture): ``prefopt demo`` -- cache -> train with checkpoints every 2 steps, a worker that
raises at step 3 and a restart from the step-2 checkpoint -> export -> eval -- as a driver joined to a
two-node cluster of its own (tests/_two_nodes.py): node ``a`` (3 logical CPUs, the driver's node) and node
``b`` (1 CPU), each with its own ``PREFOPT_LOCAL_DIR``, so a file one node writes locally and another reads
is not there. ``run.workdir``, ``cache.dir``, ``data.source`` and ``model.pretrained`` are in the session's
moto bucket; the two training workers are placed with ``train.placement_strategy=STRICT_SPREAD``; every
process of the run has a unique ``AWS_SECRET_ACCESS_KEY``.

The local path it is compared with, computed cheaply in this process: a cache build of the same source
into a local directory (the session's Ray), an uninterrupted one-process run of the worker recipe on that
cache (1 worker x 4 pairs = the same 4 pairs per step as 2 workers x 2, same per-pair noise), and ``prefopt
eval``'s code on the bucket run's export copied to a local directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest

from pipelines.latent_cache import read_manifest
from pipelines.sharded_build import read_parquet
from pipelines.synthetic import write_synthetic_pickapic
from prefopt_core.config import load_config
from prefopt_core.storage import Location
from ray_jobs.console import LOG_FILE
from tests._local_recipe import local_recipe
from tests._runs import history, train_overrides

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
#: What the bucket run and its local counterparts share (4 pairs: one step per epoch of 2 workers x 2).
COMMON = [
    "reference.strategy=frozen",
    f"train.max_steps={STEPS}",
    "train.checkpoint_every=2",
    "train.eval_every=2",
    "eval.seeds=[0,1]",
    "eval.num_prompts=2",
    "eval.num_inference_steps=2",
]


def _config(workdir, model, cache, source, tracking: str, *extra: str):
    return [
        *train_overrides(workdir, model, cache, "bucket"),
        f"data.source={source}",
        f"tracking.uri={tracking}",
        *COMMON,
        *extra,
    ]


class _Cluster:
    """tests/_two_nodes.py in a child process: its address, node ids, and the actors it ran."""

    def __init__(self, spec: dict, env: dict) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests._two_nodes", json.dumps(spec)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(60)
            raise RuntimeError("the two-node cluster did not start (see its stderr above)")
        info = json.loads(line)
        self.address, self.nodes = info["address"], info["nodes"]

    def actors(self, path: Path) -> list[dict]:
        self.proc.stdin.write(f"actors {path}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok"
        return json.loads(path.read_text())

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def bucket_run(tmp_path_factory, s3_bucket, tiny_sd3):
    """The bucket run on two nodes: ``{"tmp", "prefix", "scratch", "secret", "console", "actors",
    "summary", "ray_logs"}``."""
    tmp = tmp_path_factory.mktemp("two_node")
    prefix = f"{s3_bucket}/two-node"
    source = write_synthetic_pickapic(tmp / "src.parquet", num_pairs=4, seed=7, image_size=40)
    Location(f"{prefix}/src.parquet").write_bytes(Path(source).read_bytes())
    Location(f"{prefix}/base").upload_dir(tiny_sd3)
    secret = f"prefopt-secret-{uuid.uuid4().hex}"
    scratch = {name: tmp / f"scratch-{name}" for name in ("a", "b")}
    # one intra-op thread everywhere: the local counterparts run with one too (like with like)
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": secret, "OMP_NUM_THREADS": "1", "PREFOPT_LOG_LEVEL": "INFO"}
    ray_tmp = Path(tempfile.mkdtemp(prefix="prefopt-2n-"))  # short: Ray's unix sockets live under it
    spec = {
        "temp_dir": str(ray_tmp),
        "nodes": [
            {
                "name": "a",
                "num_cpus": 3,
                "resources": {"node_a": 1},
                "env": {"PREFOPT_LOCAL_DIR": str(scratch["a"])},
            },
            {
                "name": "b",
                "num_cpus": 1,
                "resources": {"node_b": 1},
                "env": {"PREFOPT_LOCAL_DIR": str(scratch["b"])},
            },
        ],
    }
    cluster = _Cluster(spec, env)
    try:
        overrides = _config(
            f"{prefix}/run",
            f"{prefix}/base",
            f"{prefix}/cache",
            f"{prefix}/src.parquet",
            f"sqlite:///{tmp}/mlflow.db",
            "train.fail_at_step=3",
            "train.max_failures=1",
            "train.placement_strategy=STRICT_SPREAD",
            f"ray.address={cluster.address}",
        )
        done = subprocess.run(
            [sys.executable, "-m", "ray_jobs.cli", "demo", str(ROOT / "configs/demo.yaml"), *overrides],
            cwd=tmp,  # a sqlite store's default artifact root is ./mlruns of the cwd
            env={**env, "PREFOPT_LOCAL_DIR": str(scratch["a"])},
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, done.stderr[-4000:]
        actors = cluster.actors(tmp / "actors.json")
    finally:
        cluster.close()
    yield {
        "tmp": tmp,
        "prefix": prefix,
        "scratch": scratch,
        "secret": secret,
        "console": done.stdout + done.stderr,
        "stdout": done.stdout,
        "actors": actors,
        "summary": Location(f"{prefix}/run/demo_summary.json").read_json(),
        "ray_logs": ray_tmp,
    }
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _rows(cache_dir) -> list[dict]:
    root = Location(cache_dir)
    rows = [r for f in read_manifest(root)["files"] for r in read_parquet(root / f).to_pylist()]
    return sorted(rows, key=lambda r: r["pair_id"])


@pytest.fixture(scope="module")
def local_cache(bucket_run, tiny_sd3, ray_cluster) -> Path:
    """The same source encoded into a local directory by ``prefopt cache``'s code (the session's Ray)."""
    from ray_jobs.cache import run_cache

    tmp = bucket_run["tmp"]
    cfg = load_config(
        ROOT / "configs/demo.yaml",
        _config(
            tmp / "local", tiny_sd3, tmp / "local" / "cache", tmp / "src.parquet", f"sqlite:///{tmp}/l.db"
        ),
    )
    run_cache(cfg)
    return tmp / "local" / "cache"


def test_bucket_cache_rows_equal_a_local_build_of_the_same_source(bucket_run, local_cache):
    """The cache the run built in the bucket (read from the bucket, encoded on either node) holds the pair
    ids, captions and latents of the local build: same encoder and batch shapes on this CPU, so latents
    agree to float tolerance (1e-5 relative)."""
    bucket, local = _rows(f"{bucket_run['prefix']}/cache"), _rows(local_cache)
    assert [r["pair_id"] for r in bucket] == [r["pair_id"] for r in local] and len(local) == 4
    assert [r["caption"] for r in bucket] == [r["caption"] for r in local]
    for a, b in zip(bucket, local, strict=True):
        for key in ("latents_w", "latents_l"):
            np.testing.assert_allclose(np.asarray(a[key]), np.asarray(b[key]), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def local_losses(bucket_run, local_cache, tiny_sd3, process_group) -> list[tuple[int, float]]:
    """An uninterrupted one-process recipe run (1 worker x 4 pairs) on the local cache: its losses."""
    from ray_jobs.training.recipe import run_recipe

    tmp = bucket_run["tmp"] / "recipe"
    cfg = load_config(
        ROOT / "configs/demo.yaml",
        _config(
            tmp,
            tiny_sd3,
            local_cache,
            "unused",
            f"sqlite:///{tmp}.db",
            "train.num_workers=1",
            "train.batch_size=4",
        ),
    )
    recipe, _ = local_recipe(cfg, local_cache, tiny_sd3, tmp)
    run_recipe(recipe)
    run_id = recipe.inputs.run_id
    return history(cfg.tracking_uri, run_id, "loss")


def test_bucket_training_through_a_fault_follows_the_local_losses(bucket_run, local_losses):
    """The bucket run's worker raised at step 3 (its marker object is in the bucket workdir) and the group
    restarted from the step-2 checkpoint in the bucket; its losses at steps 1..4 (each logged once) follow
    the uninterrupted one-process run: the same 4 pairs and per-pair noise every step, only the reduction
    order differs (2 workers x 2 pairs vs 1 x 4), hence the tolerance of the ZeRO-2/ZeRO-3 comparison."""
    summary = bucket_run["summary"]
    assert Location(f"{bucket_run['prefix']}/run/.fault_injected_bucket_3").exists()
    assert summary["final_metrics"]["step"] == STEPS
    bucket = history(summary["mlflow_tracking_uri"], summary["mlflow_run_id"], "loss")
    assert [s for s, _ in bucket] == [s for s, _ in local_losses] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([v for _, v in bucket], [v for _, v in local_losses], rtol=2e-3, atol=2e-4)


def test_bucket_eval_equals_a_local_eval_of_the_same_export(bucket_run, tiny_sd3, monkeypatch):
    """The run's export is in the bucket, and so are its eval grid and results.json; ``prefopt eval``'s code
    on a local copy of that export (local workdir, local base model, the same prompts, seeds and scorers)
    gives the same per-model statistics (same weights, kernels and thread count: 1e-5 relative)."""
    from ray_jobs.demo import evaluation_config
    from ray_jobs.evaluate import run_eval

    prefix, tmp = bucket_run["prefix"], bucket_run["tmp"]
    export = Location(bucket_run["summary"]["export_dir"])
    assert export.uri == f"{prefix}/run/export/transformer"
    assert Location(f"{prefix}/run/eval/grid.png").read_bytes().startswith(b"\x89PNG")
    remote = Location(f"{prefix}/run/eval/results.json").read_json()
    cfg = load_config(
        ROOT / "configs/demo.yaml",
        _config(tmp / "eval", tiny_sd3, tmp / "unused", "unused", f"sqlite:///{tmp}/eval.db"),
    )
    monkeypatch.chdir(tmp)  # a sqlite store's default artifact root is ./mlruns of the cwd
    local = run_eval(evaluation_config(cfg, str(export.local_dir(tmp / "download"))))
    got = json.loads(Path(local["results_json"]).read_text())
    assert got["prompts"] == remote["prompts"] and set(got["results"]) == {"base", "trained"}
    for model, per_scorer in remote["results"].items():
        for scorer, stats in per_scorer.items():
            for key, value in stats.items():
                assert got["results"][model][scorer][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (
                    model,
                    scorer,
                    key,
                )


def test_training_workers_are_strictly_spread_over_the_two_nodes(bucket_run):
    """STRICT_SPREAD: each of the two attempts (before and after the fault) had one training worker on
    node a and one on node b; and each node read the bucket's base model through its own local copy."""
    workers = [a["node"] for a in bucket_run["actors"] if a["class"] == "RayTrainWorker"]
    assert sorted(workers) == ["a", "a", "b", "b"]
    for name, scratch in bucket_run["scratch"].items():
        copies = list((scratch / "remote").glob("base-*/.prefopt-copy.json"))
        assert len(copies) == 1, name


def test_the_secret_is_in_no_file_the_run_wrote_nor_its_console(bucket_run):
    """AWS_SECRET_ACCESS_KEY (a unique token every process of the run had) appears in none of the objects
    the run wrote to the bucket (summaries, resolved config, manifest, checkpoints), none of the files in
    either node's scratch dir (the command log, local copies, exports), the MLflow store (params,
    artifacts), the Ray session logs of both nodes (driver, workers, raylets), nor the command's console
    output."""
    secret = bucket_run["secret"].encode()
    assert secret not in bucket_run["console"].encode()
    prefix = Location(bucket_run["prefix"])
    objects = prefix.rglob("*")
    assert any(o.name == "resolved_config.json" for o in objects)
    leaks = [o.uri for o in objects if secret in o.read_bytes()]
    files = [p for root in ("tmp", "ray_logs") for p in bucket_run[root].rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in files) and any(p.name == LOG_FILE for p in files)
    leaks += [str(p) for p in files if secret in p.read_bytes()]
    assert leaks == []


def test_demo_console_ends_with_its_summary_and_outcome_lines(bucket_run):
    """What the operator reads last: the summary table, where it was written, then adoption and the two
    fidelity lines (base -> trained); Ray's worker logs (``(RayTrainWorker pid=...)``, ``(MapWorker ...)``)
    never reach the console, so nothing comes after them."""
    lines = bucket_run["stdout"].rstrip("\n").splitlines()
    assert lines[-3].startswith("style adoption rate (held-out prompts without the style word): base ")
    assert lines[-2].startswith("fidelity, color accuracy (same samples): base ")
    assert lines[-1].startswith("fidelity, shape accuracy (same samples): base ")
    assert lines[-4].startswith("summary written to ")
    assert "== prefopt demo ==" in lines
    assert not any(marker in bucket_run["console"] for marker in ("(RayTrainWorker", "(MapWorker"))
