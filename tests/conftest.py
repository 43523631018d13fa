"""Shared fixtures: offline hub, one tiny model per family per session, one local Ray per session.

Ray starts once (4 logical CPUs on 127.0.0.1, no dashboard) and is shared by every test that asks for
``ray_cluster``; tiny pipelines are built once into a session temp dir.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from tests._s3 import S3_ENV

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
# object-store tests talk only to the moto server on 127.0.0.1, with fake credentials (tests/_s3.py)
os.environ.update(S3_ENV)
os.environ.pop("AWS_PROFILE", None)


#: Test files that start Ray Train runs or Ray clusters, longest first (minutes each on 2 cores). The
#: suite runs under pytest-xdist with ``--dist loadfile --no-loadscope-reorder`` (scripts/test.sh):
#: handing these out first and the many short files last keeps both workers busy to the end.
LONGEST_FIRST = (
    "test_train.py",
    "test_cluster_submit.py",
    "test_train_families.py",
    "test_train_ops.py",
    "test_two_node_bucket.py",
    "test_online_streaming.py",
    "test_online.py",
    "test_benchmarks.py",
    "test_regenerate.py",
    "test_latent_cache.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest files first (a stable sort: the order inside each file is kept)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    """A tiny SD3 pipeline directory (built offline once per session)."""
    from prefopt_core.models.tiny import make_tiny_pipeline

    return make_tiny_pipeline(tmp_path_factory.mktemp("models") / "sd3", family="sd3")


@pytest.fixture(scope="session")
def s3_bucket() -> str:
    """``s3://prefopt-test``: a bucket on the session's moto S3 server (127.0.0.1); tests use their own
    prefixes in it."""
    from tests._s3 import create_bucket, start_server

    server = start_server()
    yield create_bucket("prefopt-test")
    server.stop()


@pytest.fixture(scope="session")
def tiny_unets(tmp_path_factory) -> dict[str, Path]:
    """``{"sdxl": dir, "sd15": dir}``: tiny UNet pipelines (built offline once per session)."""
    from prefopt_core.models.tiny import make_tiny_pipeline

    root = tmp_path_factory.mktemp("unet_models")
    return {f: make_tiny_pipeline(root / f, family=f, seed=0) for f in ("sdxl", "sd15")}


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray shared by the session (4 logical CPUs so Data tasks are never starved by Train workers)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            logging_level=logging.WARNING,
            runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}},
        )
    from ray_jobs.cluster import configure_data_context

    configure_data_context(verbose=False)
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One intra-op thread in the test process: Ray workers run beside it on the same 2 cores, and
    oversubscribed thread pools make small CPU kernels many times slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def cache8(tmp_path_factory, tiny_sd3, ray_cluster) -> Path:
    """An 8-pair latent cache of ``tiny_sd3`` (synthetic Pick-a-Pic-schema source, seed 21), shared by the
    SD3 training tests."""
    from tests._cache import synthetic_cache

    return synthetic_cache(tmp_path_factory.mktemp("train_cache"), tiny_sd3, num_pairs=8, seed=21)


@pytest.fixture(scope="session")
def _one_rank_group() -> int:
    """A one-rank gloo process group on 127.0.0.1, made once per test process (DeepSpeed keeps the first
    group it sees, so a second one would be unknown to it); yields its port."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield port
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def process_group(_one_rank_group):
    """The one-rank group and, for this module, the launcher variables DeepSpeed reads, as a launcher
    (torchrun, Ray Train) would set them (for the one-process worker recipe)."""
    env = {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_one_rank_group),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
