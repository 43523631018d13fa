"""What a training worker needs from the runtime it runs in, and two runtimes that provide it.

The worker recipe (:mod:`ray_jobs.training.recipe`) never calls ``ray.train`` itself: it asks a
:class:`WorkerContext` for its rank, its micro-batches, the latest checkpoint, and hands it checkpoints
and progress records. :class:`RayTrainContext` is the real one (inside a Ray Train worker);
:class:`LocalContext` runs the same recipe in one process without Ray, on an in-memory cache table, with
checkpoints in a local directory (unit tests, debugging).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

logger = logging.getLogger(__name__)

#: ``() -> policy state dict`` on rank 0, ``None`` elsewhere; a collective every rank calls (ZeRO-3 gather).
StateFn = Callable[[], "dict[str, Any] | None"]


class WorkerContext(Protocol):
    rank: int
    world_size: int

    def epoch_batches(self, batch_size: int, shuffle_seed: int, skip: int = 0) -> Iterator[pa.Table]:
        """One pass over this worker's shard: full micro-batches of ``batch_size`` rows, locally shuffled
        with ``shuffle_seed`` (the same seed gives the same order), without its first ``skip`` batches
        (consumed before a resume). A streaming context never ends the pass and never replays."""

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        """The latest reported checkpoint as a local directory, or ``None`` before the first one."""

    def report(self, metrics: dict[str, float], checkpoint_dir: Path, name: str) -> None:
        """Hand a complete checkpoint directory (every rank calls this, with its own shards) to the runtime."""

    def progress(self, record: dict[str, Any]) -> None:
        """Pass a progress record to the driver without waiting for it (rank 0 calls this)."""

    def policy_step(self, step: int, state_fn: StateFn, *, start: bool = False) -> dict[str, float]:
        """After optimizer step ``step`` (or, with ``start``, when training starts or resumes at it): publish
        the policy if this runtime samples from it (every rank calls this); returns metrics to log."""


class RayTrainContext:
    """The context of a Ray Train worker: dataset shard ``"train"``, Ray Train checkpoints, and progress
    records sent to the driver's sink actor (fire and forget: the step never waits for the driver)."""

    def __init__(self, progress_sink: Any | None = None) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self._sink = progress_sink

    def epoch_batches(self, batch_size: int, shuffle_seed: int, skip: int = 0) -> Iterator[pa.Table]:
        import ray.train

        shard = ray.train.get_dataset_shard("train")
        batches = shard.iter_batches(
            batch_size=batch_size,
            batch_format="pyarrow",
            drop_last=True,
            local_shuffle_buffer_size=max(batch_size * 8, 16),
            local_shuffle_seed=shuffle_seed,
        )
        for i, table in enumerate(batches):
            if i >= skip:
                yield table

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

    def policy_step(self, step: int, state_fn: StateFn, *, start: bool = False) -> dict[str, float]:
        return {}  # nothing samples from a policy trained on a finished cache


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

    def epoch_batches(self, batch_size: int, shuffle_seed: int, skip: int = 0) -> Iterator[pa.Table]:
        order = np.random.default_rng(shuffle_seed).permutation(self.table.num_rows)
        for start in range(skip * batch_size, len(order) - batch_size + 1, batch_size):
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

    def policy_step(self, step: int, state_fn: StateFn, *, start: bool = False) -> dict[str, float]:
        return {}


class StreamingContext(RayTrainContext):
    """A Ray Train worker fed by the pair buffer of streaming online training
    (:mod:`ray_jobs.training.pair_buffer`) instead of a dataset shard, publishing the policy to the
    :class:`~ray_jobs.training.policy_sync.PolicyStore` every ``sync_every`` optimizer steps.

    Batches: ``buffer.take(batch_size, trainer version, rank, next step)``, retried every ``poll_s`` while the buffer
    holds too few fresh rows (the wait is measured: ``online/trainer_wait_s`` and the idle fraction of the
    wall time since the previous step). The pass never ends; ``skip`` is ignored (streamed rows are never
    replayed: a resumed worker takes new ones). Publications of the steps
    :func:`~ray_jobs.training.policy_sync.eval_due` names (``eval_every``, ``max_steps``) are also queued
    for the held-out evaluation, which the step never waits for.
    """

    def __init__(
        self,
        buffer: Any,
        store: Any,
        sync_every: int,
        progress_sink: Any | None = None,
        poll_s: float = 0.05,
        eval_every: int | None = None,
        max_steps: int = 0,
    ) -> None:
        super().__init__(progress_sink)
        self.buffer, self.store = buffer, store
        self.sync_every = sync_every
        self.eval_every, self.max_steps = eval_every, max_steps
        self.poll_s = poll_s
        self.version = 0
        self.step = 0  # optimizer steps done: the next take is for step + 1
        self.wait_s = 0.0
        self._last_step_t = time.perf_counter()

    def epoch_batches(self, batch_size: int, shuffle_seed: int, skip: int = 0) -> Iterator[pa.Table]:
        import ray

        while True:
            t0 = time.perf_counter()
            take = (batch_size, self.version, self.rank, self.step + 1)
            table = ray.get(self.buffer.take.remote(*take))
            while table is None:
                time.sleep(self.poll_s)
                table = ray.get(self.buffer.take.remote(*take))
            self.wait_s += time.perf_counter() - t0
            yield table

    def policy_step(self, step: int, state_fn: StateFn, *, start: bool = False) -> dict[str, float]:
        import ray

        from ray_jobs.training.policy_sync import eval_due, policy_version

        self.step = step
        if start or step % self.sync_every == 0:
            self.version = policy_version(step, self.sync_every)
            state = state_fn()  # every rank: a collective under ZeRO-3
            if self.rank == 0:
                evaluate = not start and eval_due(step, self.eval_every, self.max_steps)
                ray.get(self.store.publish.remote(self.version, step, state, start, evaluate))
                logger.info("published policy version %d at step %d", self.version, step)
        now = time.perf_counter()
        wall, wait = now - self._last_step_t, self.wait_s
        self._last_step_t, self.wait_s = now, 0.0
        if self.rank != 0 or start:
            return {}
        metrics = ray.get(self.buffer.stats.remote())
        metrics.update(
            {
                "online/policy_version": float(self.version),
                "online/trainer_wait_s": wait,
                "online/trainer_idle_fraction": wait / wall if wall > 0 else 0.0,
            }
        )
        return metrics
