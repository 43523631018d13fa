"""What a training worker needs from the runtime it runs in, and two runtimes that provide it.

The worker recipe (:mod:`ray_jobs.training.recipe`) never calls ``ray.train`` itself: it asks a
:class:`WorkerContext` for its rank, its micro-batches, the latest checkpoint, and hands it checkpoints
and progress records. :class:`RayTrainContext` is the real one (inside a Ray Train worker);
:class:`LocalContext` runs the same recipe in one process without Ray, on an in-memory cache table, with
checkpoints in a local directory (unit tests, debugging).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa


class WorkerContext(Protocol):
    rank: int
    world_size: int

    def epoch_batches(self, batch_size: int, shuffle_seed: int) -> Iterator[pa.Table]:
        """One pass over this worker's shard: full micro-batches of ``batch_size`` rows, locally shuffled
        with ``shuffle_seed`` (the same seed gives the same order)."""

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        """The latest reported checkpoint as a local directory, or ``None`` before the first one."""

    def report(self, metrics: dict[str, float], checkpoint_dir: Path, name: str) -> None:
        """Hand a complete checkpoint directory (every rank calls this, with its own shards) to the runtime."""

    def progress(self, record: dict[str, Any]) -> None:
        """Pass a progress record to the driver without waiting for it (rank 0 calls this)."""


class RayTrainContext:
    """The context of a Ray Train worker: dataset shard ``"train"``, Ray Train checkpoints, and progress
    records sent to the driver's sink actor (fire and forget: the step never waits for the driver)."""

    def __init__(self, progress_sink: Any | None = None) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self._sink = progress_sink

    def epoch_batches(self, batch_size: int, shuffle_seed: int) -> Iterator[pa.Table]:
        import ray.train

        shard = ray.train.get_dataset_shard("train")
        return shard.iter_batches(
            batch_size=batch_size,
            batch_format="pyarrow",
            drop_last=True,
            local_shuffle_buffer_size=max(batch_size * 8, 16),
            local_shuffle_seed=shuffle_seed,
        )

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as d:
            yield Path(d)

    def report(self, metrics: dict[str, float], checkpoint_dir: Path, name: str) -> None:
        import ray.train
        from ray.train import Checkpoint

        ray.train.report(
            metrics, checkpoint=Checkpoint.from_directory(str(checkpoint_dir)), checkpoint_dir_name=name
        )

    def progress(self, record: dict[str, Any]) -> None:
        if self._sink is not None:
            self._sink.push.remote(record)


class LocalContext:
    """One process, no Ray: rank 0 of 1, the whole cache ``table`` as its shard (shuffled per epoch with a
    numpy permutation), checkpoints copied to ``checkpoint_root/<name>``, progress records kept in
    :attr:`records`."""

    rank = 0
    world_size = 1

    def __init__(self, table: pa.Table, checkpoint_root: Path) -> None:
        self.table = table
        self.checkpoint_root = Path(checkpoint_root)
        self.reports: list[dict[str, float]] = []
        self.records: list[dict[str, Any]] = []

    def epoch_batches(self, batch_size: int, shuffle_seed: int) -> Iterator[pa.Table]:
        order = np.random.default_rng(shuffle_seed).permutation(self.table.num_rows)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield self.table.take(order[start : start + batch_size])

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        found = sorted(self.checkpoint_root.glob("step_*")) if self.checkpoint_root.exists() else []
        yield found[-1] if found else None

    def report(self, metrics: dict[str, float], checkpoint_dir: Path, name: str) -> None:
        dest = self.checkpoint_root / name
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(checkpoint_dir, dest)
        self.reports.append(dict(metrics))

    def progress(self, record: dict[str, Any]) -> None:
        self.records.append(record)
