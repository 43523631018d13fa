"""The pair buffer of streaming online training: rollouts push latent-cache rows tagged with the policy
version that sampled them, training workers take disjoint micro-batches of fresh rows.

Rules (owned here):

* **capacity** ``online.buffer_pairs``: a push that does not fit is refused (``"full"``) and the rollout
  retries later: backpressure, nothing is dropped silently. A push into an empty buffer always fits, so a
  batch larger than the capacity cannot deadlock.
* **staleness** of a row = trainer version at the take - version that sampled it. Rows above
  ``online.max_staleness`` are dropped and counted (``dropped_stale``); rows from a version *newer* than the
  trainer's (sampled by a policy that a training restart rolled back) are dropped and counted
  (``dropped_rollback``).
* **on stale** ``online.on_stale``: ``drop`` (above) lets rollouts sample as far ahead as the capacity allows.
  ``wait`` admits a rollout's next block (:meth:`PairBufferState.next_block`) only if every row buffered or
  in flight can still be trained within the bound, so rows do not go stale: rollouts hold back and the
  trainer waits for fresh rows instead (``online/trainer_wait_s``). With the trainer at optimizer step
  ``s`` (the step its next take is for, ``t`` rows of it taken), ``r = train.batch_size * num_workers`` rows
  per step and versions ``(step - 1) // sync_every`` at the take, a row of version ``v`` is trained within the
  bound iff taken for a step ``<= T(v) = (v + max_staleness + 1) * sync_every``; rows are taken oldest first,
  so a block of ``b`` prompts (at most ``b`` rows) is admitted iff ``buffered + in flight + b <=
  (T(v_min) - s + 1) * r - t`` with ``v_min`` the lowest version among the block and those in flight (a later
  block may push before them). An empty buffer with nothing in flight admits a block if at least one of its
  rows is within the bound (a block larger than the bound cannot wait forever); a rollout whose policy is
  too old waits for the next publication. Rows that still go stale (that block's surplus, a training
  restart) are dropped and counted as under ``drop``.
* **at most once**: every row handed out is written to the ledger (``ledger.jsonl``, one JSON line per row:
  pair id, sampling version, trainer version, rank) before the take returns; a row goes back into the
  buffer only while it has been handed out fewer than ``online.reuse`` times. A row handed to a worker whose
  step is later rolled back by a restart is not handed out again: its update was undone, so it is simply
  lost (the ledger says so). The ledger is reloaded on start, so a rerun after the driver died never hands
  out an id it already handed out.

:class:`PairBufferState` is the logic (plain Python, unit-tested); :class:`PairBuffer` is the Ray actor
around it.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import pyarrow as pa

from prefopt_core.config import OnStale

logger = logging.getLogger(__name__)

#: Column added to every row: the policy version that sampled it.
VERSION_COLUMN = "policy_version"
#: ``online.on_stale`` values.
ON_STALE: tuple[str, ...] = get_args(OnStale)


@dataclass
class _Row:
    pair_id: str
    version: int
    table: pa.Table  # one row
    uses: int = 0


@dataclass
class RolloutStats:
    """What rollouts report with their pushes (summed over actors)."""

    images: int = 0
    sample_s: float = 0.0
    reward_sum: float = 0.0
    rewards: int = 0
    kept: int = 0
    skipped: int = 0


@dataclass
class PairBufferState:
    capacity: int
    max_staleness: int
    reuse: int = 1
    ledger_path: Path | None = None
    on_stale: OnStale = "drop"
    sync_every: int = 1  # wait: optimizer steps per policy version
    rows_per_step: int = 1  # wait: rows the trainer takes per optimizer step (all ranks)
    rows: deque = field(default_factory=deque)
    handed: dict[str, int] = field(default_factory=dict)  # pair id -> times handed out (ledger)
    counts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("pushed", "taken", "dropped_stale", "dropped_rollback", "rollout_restarts"), 0
        )
    )
    staleness: list[int] = field(default_factory=list)  # of rows taken since the last stats() call
    rollout: RolloutStats = field(default_factory=RolloutStats)
    closed: bool = False
    trainer_step: int = 1  # the step the trainer's latest take was for
    taken_for_step: int = 0  # rows taken for trainer_step so far
    inflight: dict[int, tuple[int, int]] = field(default_factory=dict)  # rollout -> (version, prompts)

    def __post_init__(self) -> None:
        if self.on_stale not in ON_STALE:
            raise ValueError(f"on_stale must be one of {ON_STALE}, got {self.on_stale!r}")
        if self.ledger_path is not None and Path(self.ledger_path).exists():
            for line in Path(self.ledger_path).read_text().splitlines():
                if line.strip():
                    pid = json.loads(line)["pair_id"]
                    self.handed[pid] = self.handed.get(pid, 0) + 1

    # ------------------------------------------------------------------ rollouts
    def push(self, table: pa.Table, version: int, owner: int | None = None) -> str:
        """Add ``table``'s rows sampled by policy ``version`` (the block of rollout ``owner``, which is no
        longer in flight once accepted): ``"ok"``, ``"full"`` (retry later) or ``"closed"``. Ids already in
        the buffer or already handed out ``reuse`` times are refused loudly."""
        if self.closed:
            return "closed"
        if self.rows and len(self.rows) + table.num_rows > self.capacity:
            return "full"
        self.inflight.pop(owner, None)
        ids = table["pair_id"].to_pylist()
        present = {r.pair_id for r in self.rows}
        again = [p for p in ids if p in present or self.handed.get(p, 0) >= self.reuse]
        if again:
            raise ValueError(f"pair ids pushed twice: {again[:5]}")
        tagged = table.append_column(VERSION_COLUMN, pa.array([version] * table.num_rows, pa.int64()))
        for i, pid in enumerate(ids):
            self.rows.append(_Row(pid, version, tagged.slice(i, 1)))
        self.counts["pushed"] += len(ids)
        return "ok"

    def report_rollout(
        self, images: int, sample_s: float, rewards: list[float], kept: int, skipped: int
    ) -> None:
        r = self.rollout
        r.images += images
        r.sample_s += sample_s
        r.reward_sum += float(sum(rewards))
        r.rewards += len(rewards)
        r.kept += kept
        r.skipped += skipped

    # ------------------------------------------------------------------ trainer
    def _evict(self, trainer_version: int) -> None:
        keep: deque = deque()
        for row in self.rows:
            age = trainer_version - row.version
            if age > self.max_staleness:
                self.counts["dropped_stale"] += 1
            elif age < 0:
                self.counts["dropped_rollback"] += 1
            else:
                keep.append(row)
        self.rows = keep

    def take(self, n: int, trainer_version: int, rank: int, step: int | None = None) -> pa.Table | None:
        """``n`` rows (oldest first) within the staleness bound for a trainer at ``trainer_version`` taking
        for optimizer ``step`` (the next step; ``None``: unknown, fine under ``drop``), or ``None`` when fewer
        than ``n`` are available (the worker waits and asks again)."""
        self._evict(trainer_version)
        if step is not None and step != self.trainer_step:
            self.trainer_step, self.taken_for_step = step, 0  # a new step, or a restart went back
        if len(self.rows) < n:
            return None
        self.taken_for_step += n
        rows = [self.rows.popleft() for _ in range(n)]
        lines = []
        for row in rows:
            row.uses += 1
            self.handed[row.pair_id] = self.handed.get(row.pair_id, 0) + 1
            self.staleness.append(trainer_version - row.version)
            lines.append(
                json.dumps(
                    {
                        "pair_id": row.pair_id,
                        "version": row.version,
                        "trainer_version": trainer_version,
                        "rank": rank,
                    }
                )
            )
            if row.uses < self.reuse:
                self.rows.append(row)
        if self.ledger_path is not None:
            with open(self.ledger_path, "a") as f:
                f.write("\n".join(lines) + "\n")
        self.counts["taken"] += n
        return pa.concat_tables([r.table for r in rows])

    def peek(self, n: int) -> pa.Table | None:
        """The first ``n`` rows without taking them (shapes and the divergence probe), or ``None``."""
        if not self.rows:
            return None
        return pa.concat_tables([r.table for r in list(self.rows)[:n]])

    def stats(self) -> dict[str, float]:
        """``online/*`` counters; staleness mean/max over the rows taken since the previous call."""
        r = self.rollout
        out = {
            "online/buffer_pairs": float(len(self.rows)),
            "online/pairs_kept": float(r.kept),
            "online/pairs_skipped": float(r.skipped),
            "online/pairs_dropped_stale": float(self.counts["dropped_stale"]),
            "online/pairs_dropped_rollback": float(self.counts["dropped_rollback"]),
            "online/pairs_taken": float(self.counts["taken"]),
            "online/rollout_restarts": float(self.counts["rollout_restarts"]),
            "online/rollout_held_back": float(self.counts.get("held_back", 0)),
        }
        if self.staleness:
            out["online/staleness_mean"] = sum(self.staleness) / len(self.staleness)
            out["online/staleness_max"] = float(max(self.staleness))
            self.staleness = []
        if r.sample_s > 0:
            out["online/rollout_images_per_s"] = r.images / r.sample_s
        if r.rewards:
            out["online/reward_mean"] = r.reward_sum / r.rewards
        return out

    def trainable_rows(self, version: int) -> int:
        """Rows the trainer still takes before rows of ``version`` exceed the staleness bound (see the module
        docstring: ``(T(v) - s + 1) * r - t``; may be negative)."""
        last_step = (version + self.max_staleness + 1) * self.sync_every  # T(v)
        return (last_step - self.trainer_step + 1) * self.rows_per_step - self.taken_for_step

    def next_block(self, owner: int = 0, version: int = 0, prompts: int = 0) -> int | None:
        """A draw-block number no rollout (or restarted rollout) of this buffer got before, for rollout
        ``owner`` about to sample ``prompts`` prompts with policy ``version``; under ``on_stale=wait``
        ``None`` when the block could not be trained within the bound (the rollout asks again later,
        after swapping in a newer policy if there is one)."""
        self.inflight.pop(owner, None)  # its previous block is finished (pushed, or gave no pair)
        if self.on_stale == "wait":
            ahead = len(self.rows) + sum(p for _, p in self.inflight.values())
            oldest = min([version, *(v for v, _ in self.inflight.values())])
            idle_fits = ahead == 0 and self.trainable_rows(version) > 0  # at least one row in the bound
            if ahead + prompts > self.trainable_rows(oldest) and not idle_fits:
                self.counts["held_back"] = self.counts.get("held_back", 0) + 1
                return None
        self.inflight[owner] = (version, prompts)
        self.counts["blocks"] = self.counts.get("blocks", 0) + 1
        return self.counts["blocks"] - 1

    def forget(self, owner: int) -> None:
        """Rollout ``owner`` died: its block in flight will never be pushed."""
        self.inflight.pop(owner, None)
        self.counts["rollout_restarts"] += 1

    def close(self) -> None:
        self.closed = True


class PairBuffer:
    """The Ray actor around :class:`PairBufferState` (one per streaming run; ``ray.remote(PairBuffer)``)."""

    def __init__(
        self,
        capacity: int,
        max_staleness: int,
        reuse: int,
        ledger_path: str | None,
        on_stale: OnStale = "drop",
        sync_every: int = 1,
        rows_per_step: int = 1,
    ) -> None:
        self.state = PairBufferState(
            capacity,
            max_staleness,
            reuse,
            Path(ledger_path) if ledger_path else None,
            on_stale,
            sync_every,
            rows_per_step,
        )

    def push(self, table: pa.Table, version: int, owner: int | None = None) -> str:
        return self.state.push(table, version, owner)

    def report_rollout(self, *args: Any) -> None:
        self.state.report_rollout(*args)

    def take(self, n: int, trainer_version: int, rank: int, step: int | None = None) -> pa.Table | None:
        return self.state.take(n, trainer_version, rank, step)

    def peek(self, n: int) -> pa.Table | None:
        return self.state.peek(n)

    def stats(self) -> dict[str, float]:
        return self.state.stats()

    def next_block(self, owner: int = 0, version: int = 0, prompts: int = 0) -> int | None:
        return self.state.next_block(owner, version, prompts)

    def forget(self, owner: int) -> None:
        self.state.forget(owner)

    def close(self) -> None:
        self.state.close()

    def is_closed(self) -> bool:
        return self.state.closed
