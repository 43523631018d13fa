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
from typing import Any

import pyarrow as pa

logger = logging.getLogger(__name__)

#: Column added to every row: the policy version that sampled it.
VERSION_COLUMN = "policy_version"


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

    def __post_init__(self) -> None:
        if self.ledger_path is not None and Path(self.ledger_path).exists():
            for line in Path(self.ledger_path).read_text().splitlines():
                if line.strip():
                    pid = json.loads(line)["pair_id"]
                    self.handed[pid] = self.handed.get(pid, 0) + 1

    # ------------------------------------------------------------------ rollouts
    def push(self, table: pa.Table, version: int) -> str:
        """Add ``table``'s rows sampled by policy ``version``: ``"ok"``, ``"full"`` (retry later) or
        ``"closed"``. Ids already in the buffer or already handed out ``reuse`` times are refused loudly."""
        if self.closed:
            return "closed"
        if self.rows and len(self.rows) + table.num_rows > self.capacity:
            return "full"
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

    def take(self, n: int, trainer_version: int, rank: int) -> pa.Table | None:
        """``n`` rows (oldest first) within the staleness bound for a trainer at ``trainer_version``, or
        ``None`` when fewer than ``n`` are available (the worker waits and asks again)."""
        self._evict(trainer_version)
        if len(self.rows) < n:
            return None
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

    def next_block(self) -> int:
        """A draw-block number no rollout (or restarted rollout) of this buffer got before."""
        self.counts["blocks"] = self.counts.get("blocks", 0) + 1
        return self.counts["blocks"] - 1

    def close(self) -> None:
        self.closed = True


class PairBuffer:
    """The Ray actor around :class:`PairBufferState` (one per streaming run; ``ray.remote(PairBuffer)``)."""

    def __init__(self, capacity: int, max_staleness: int, reuse: int, ledger_path: str | None) -> None:
        self.state = PairBufferState(
            capacity, max_staleness, reuse, Path(ledger_path) if ledger_path else None
        )

    def push(self, table: pa.Table, version: int) -> str:
        return self.state.push(table, version)

    def report_rollout(self, *args: Any) -> None:
        self.state.report_rollout(*args)

    def take(self, n: int, trainer_version: int, rank: int) -> pa.Table | None:
        return self.state.take(n, trainer_version, rank)

    def peek(self, n: int) -> pa.Table | None:
        return self.state.peek(n)

    def stats(self) -> dict[str, float]:
        return self.state.stats()

    def next_block(self) -> int:
        return self.state.next_block()

    def count_restart(self) -> None:
        self.state.counts["rollout_restarts"] += 1

    def close(self) -> None:
        self.state.close()

    def is_closed(self) -> bool:
        return self.state.closed
