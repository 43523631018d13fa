"""The cluster path of docs/cluster.md, for real: ``ray start --head`` + ``ray job submit --working-dir .``.

The test starts its own head (own ``--temp-dir``, own ports, own auth token), submits one job that runs
``prefopt cache`` then ``prefopt train`` on ``configs/demo.yaml`` (kept tiny by overrides), checks the job
status, its logs and the artifacts, and stops exactly the processes of that head.

Isolation from other Ray instances on the machine (the session's ``ray_cluster`` fixture, other people's
runs), in both directions:

* ``ray.init()`` without an address only joins the cluster named by ``RAY_ADDRESS`` or by
  ``<temp dir>/ray_current_cluster`` (default ``/tmp/ray``). Our head writes that file under its own
  ``--temp-dir``, and ``RAY_ADDRESS`` is only set in the environment of the processes we spawn, never in
  this process: nobody else's ``ray.init()`` finds our head, and we never join theirs (checked below).
* ``ray stop`` kills every Ray process on the machine (it matches process names; it has no scope), so
  it is never called here. :func:`_stop_head` ends only the processes whose command line names our
  temp dir (gcs_server, raylet, dashboard, agents, log monitor) plus their descendants (workers, the
  job's driver): raylet first, gcs_server last, as ``ray stop`` orders them.
* Token authentication (on by default in Ray 2.60 when a token exists) stays on: the head, its
  workers and the ``ray job`` CLI get ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` pointing to a
  fresh token in the temp dir, so ``~/.ray/auth_token`` is neither read nor created.

Run alone: ``pytest tests/test_cluster_submit.py -s`` (a few minutes on 2 busy cores).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
#: The environment this test runs in; the head is started from it, so its workers and the job's
#: driver use this Python and find ``prefopt`` on PATH (as after ``source .venv/bin/activate``).
ENV_BIN = Path(sys.executable).parent

#: Hang guards only (a broken cluster must fail the test, not block the suite); not timing checks.
START_TIMEOUT_S = 600
JOB_TIMEOUT_S = 1500

#: Variables of this process that would point the head or the CLI elsewhere.
_SCRUB = (
    "RAY_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
    "RAY_AUTH_TOKEN",  # would take precedence over our RAY_AUTH_TOKEN_PATH
    "RAY_JOB_CONFIG_JSON_ENV_VAR",
    "MLFLOW_TRACKING_URI",  # the run must use its own sqlite store under the workdir
)


def _ray_cli() -> str:
    cli = ENV_BIN / "ray"
    if cli.exists():
        return str(cli)
    found = shutil.which("ray")
    assert found, "the `ray` CLI (ray[default]) is not installed next to this Python nor on PATH"
    return found


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on every interface (held together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Head:
    temp_dir: Path
    gcs_port: int
    dashboard_url: str
    token: str
    env: dict[str, str]  # for the `ray job` CLI: token auth, no RAY_ADDRESS

    def api(self, path: str, *, auth: bool = True, token: str | None = None) -> tuple[int, str]:
        """GET on the job server's REST API; returns (HTTP status, body)."""
        request = urllib.request.Request(self.dashboard_url + path)
        if auth:
            request.add_header("Authorization", f"Bearer {token or self.token}")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode(errors="replace")


def _head_processes(temp_dir: Path) -> list[psutil.Process]:
    """Processes of the head started with ``--temp-dir=temp_dir``: those whose command line names it
    (gcs_server, raylet, dashboard, agents, monitors) and all their descendants (workers, job drivers).
    This process and its ancestors are never included."""
    me = psutil.Process()
    skip = {me.pid, *(p.pid for p in me.parents())}
    key = str(temp_dir)
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter():
        if proc.pid in skip:
            continue
        try:
            if any(key in arg for arg in proc.cmdline()):
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found.setdefault(child.pid, child)
        except psutil.Error:  # exited meanwhile, or not ours to inspect
            continue
    return [p for pid, p in found.items() if pid not in skip]


def _stop_head(temp_dir: Path, grace_s: float = 15.0) -> None:
    """``ray stop`` for one head only: SIGTERM in ray stop's order (raylet, the rest, gcs_server),
    SIGKILL whatever outlives the grace period."""

    def name(p: psutil.Process) -> str:
        try:
            return p.name()
        except psutil.Error:
            return ""

    procs = _head_processes(temp_dir)
    raylets = [p for p in procs if name(p) == "raylet"]
    gcs = [p for p in procs if name(p) == "gcs_server"]
    rest = [p for p in procs if p not in raylets and p not in gcs]
    for group in (raylets, rest, gcs):
        for p in group:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(group, timeout=grace_s)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=5)


@pytest.fixture
def ray_head() -> Iterator[Head]:
    """A Ray head of our own on this machine, stopped (only it) afterwards, even on failure."""
    # /tmp, not pytest's deep tmp_path: Ray's unix sockets live under the temp dir (108-byte limit).
    temp_dir = Path(tempfile.mkdtemp(prefix="prefopt-rayhead-", dir="/tmp"))
    token = secrets.token_hex(32)  # what `ray get-auth-token --generate` writes
    token_file = temp_dir / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    gcs_port, dash_port, client_port, agent_http, agent_grpc, env_agent, metrics = _free_ports(7)

    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_file),
        RAY_USAGE_STATS_ENABLED="0",
        HF_HUB_OFFLINE="1",
        PATH=f"{ENV_BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    head_env = dict(env)
    # Every process of the head (and so every actor of the job) inherits this. Ray Train's
    # PlacementGroupCleaner queries the state API without an address, which raises "Found multiple
    # active Ray instances" (a dead monitor thread, not a failed job) when another Ray runs on this
    # machine; naming our GCS here makes that lookup unambiguous. `ray start --head` itself ignores it.
    head_env["RAY_ADDRESS"] = f"127.0.0.1:{gcs_port}"

    start = [
        _ray_cli(),
        "start",
        "--head",
        # Ray 2.60 replaces a loopback --node-ip-address with the machine's address, and its GCS,
        # raylet and workers listen on all interfaces whatever this says; the dashboard/job server
        # (the part that runs code for any caller) honours --dashboard-host. Token auth covers both.
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        "--include-dashboard=true",
        f"--port={gcs_port}",
        f"--dashboard-port={dash_port}",
        # fixed defaults (10001, 52365, ...) would collide with other heads on this machine
        f"--ray-client-server-port={client_port}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={env_agent}",
        f"--metrics-export-port={metrics}",
        "--num-cpus=4",  # logical: Ray Data tasks + encoder actor + a train worker on 2 cores
        "--num-gpus=0",
        f"--object-store-memory={256 * 1024 * 1024}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    try:
        started = subprocess.run(
            start, env=head_env, cwd=REPO, capture_output=True, text=True, timeout=START_TIMEOUT_S
        )
        assert started.returncode == 0, (
            f"ray start failed:\n{started.stdout[-3000:]}\n{started.stderr[-3000:]}"
        )
        # The head registered itself under its own temp dir only: a ray.init() elsewhere, which reads
        # /tmp/ray/ray_current_cluster (or RAY_ADDRESS), cannot pick it up.
        assert (temp_dir / "ray_current_cluster").read_text().strip().endswith(f":{gcs_port}")
        default_address_file = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if default_address_file.exists():
            assert not default_address_file.read_text().strip().endswith(f":{gcs_port}")
        yield Head(temp_dir, gcs_port, f"http://127.0.0.1:{dash_port}", token, env)
    finally:
        _stop_head(temp_dir)
        left = [p.pid for p in _head_processes(temp_dir)]
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes of the test's Ray head survived the stop: {left}"


def test_submit_cache_and_train_to_a_real_head(ray_head: Head, tmp_path: Path):
    # The job server refuses callers without the token (401) or with a wrong one (403); ours works.
    status, body = ray_head.api("/api/jobs/", auth=False)
    assert status == 401, (status, body[:300])
    status, body = ray_head.api("/api/jobs/", token=secrets.token_hex(32))
    assert status == 403, (status, body[:300])
    status, body = ray_head.api("/api/jobs/")
    assert status == 200, (status, body[:300])

    # Absolute and outside the repo: the job runs in a copy of the working dir, on every node.
    workdir = (tmp_path / "run").resolve()
    overrides = [
        "data.synthetic.num_pairs=8",
        "data.synthetic.tie_fraction=0",
        "model.pretrained=tiny",  # the offline random tiny SD3 (demo.yaml's toy base takes minutes to train)
        "train.max_steps=3",
        "train.num_workers=1",
        "train.use_gpu=false",
        "train.sample_prompts=0",  # no end-of-run sample grid: seconds saved, nothing checked here
        f"run.workdir={workdir}",
    ]
    ov = " ".join(overrides)
    probe = (
        "python -c 'import os, ray_jobs; "
        'print("JOB_CWD", os.getcwd()); print("JOB_CODE", ray_jobs.__file__); '
        'print("JOB_VENV_UPLOADED", os.path.exists(".venv"))\''
    )
    # --verbose: the checks below read ensure_ray's INFO line on the console
    entrypoint = f"{probe} && prefopt --verbose cache configs/demo.yaml {ov} && prefopt --verbose train configs/demo.yaml {ov}"
    submission_id = f"prefopt-test-{secrets.token_hex(4)}"
    submit = [
        _ray_cli(),
        "job",
        "submit",
        f"--address={ray_head.dashboard_url}",
        f"--submission-id={submission_id}",
        "--working-dir=.",
        # .gitignore already keeps .venv, prefopt_work and caches out of the upload; .git is not needed
        "--runtime-env-json=" + json.dumps({"excludes": [".git"]}),
        "--",
        "bash",
        "-c",
        entrypoint,
    ]
    try:
        done = subprocess.run(
            submit, env=ray_head.env, cwd=REPO, capture_output=True, text=True, timeout=JOB_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as err:  # the fixture still stops the head
        pytest.fail(f"job did not finish within {JOB_TIMEOUT_S} s: {str(err.stdout)[-3000:]}")

    status, body = ray_head.api(f"/api/jobs/{submission_id}/logs")
    assert status == 200, (status, body[:300])
    logs = json.loads(body)["logs"]
    tail = f"\n--- job logs (tail) ---\n{logs[-5000:]}\n--- ray job submit stderr ---\n{done.stderr[-2000:]}"
    status, body = ray_head.api(f"/api/jobs/{submission_id}")
    assert status == 200, (status, body[:300])
    assert json.loads(body)["status"] == "SUCCEEDED", tail
    assert done.returncode == 0, tail

    # The job ran the uploaded copy of the repo (not the checkout), without the virtualenv in it.
    lines = dict(line.split(" ", 1) for line in logs.splitlines() if line.startswith("JOB_"))
    job_cwd = Path(lines["JOB_CWD"])
    assert job_cwd != REPO and str(ray_head.temp_dir) in str(job_cwd), lines
    assert Path(lines["JOB_CODE"]).is_relative_to(job_cwd), lines
    assert lines["JOB_VENV_UPLOADED"] == "False", lines

    # ensure_ray joined the cluster the job runs on (RAY_ADDRESS set by Ray), twice; never a local Ray.
    joined = [
        line for line in logs.splitlines() if "ray_jobs.cluster INFO connecting to Ray cluster at" in line
    ]
    assert len(joined) == 2, tail
    assert all(line.rstrip().endswith(f":{ray_head.gcs_port}") for line in joined), joined
    assert "starting a local Ray" not in logs, tail
    assert "== prefopt cache ==" in logs, tail
    assert "== prefopt train ==" in logs, tail
    assert f"summary written to {workdir / 'train_summary.json'}" in logs, tail

    cache_summary = json.loads((workdir / "cache_summary.json").read_text())
    assert cache_summary["num_pairs"] == 8
    summary = json.loads((workdir / "train_summary.json").read_text())
    assert summary["final_metrics"]["step"] == 3
    assert summary["mlflow_tracking_uri"] == f"sqlite:///{workdir / 'mlflow.db'}"
    assert Path(summary["export_dir"]) == workdir / "export" / "transformer"
    config = json.loads((workdir / "export" / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "SD3Transformer2DModel"
    assert list((workdir / "export" / "transformer").glob("*.safetensors"))
