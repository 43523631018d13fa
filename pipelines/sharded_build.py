"""Resumable sharded builds: a directory of per-unit files made under one ``plan.json``.

The latent cache, the online rounds and the regenerated datasets all split their work into *units* (a
fragment of input rows, a chunk of prompts). Every row of a unit ends up in one of the unit's files (a
shard, a quarantine or skipped file), each published atomically (temp file + rename on a local disk, one
upload under a write-once object name on an object store: :mod:`prefopt_core.storage`), so a build killed at
any point ends, after a rerun, with exactly the rows of an uninterrupted one. The rules, the same for
every build (:class:`ShardedBuild`):

* ``plan.json`` (the build's fingerprint) is written first; a directory holding another fingerprint is
  refused with :class:`PlanMismatchError` naming the keys that differ, and so is a directory whose unit
  folders hold parquet files but no ``plan.json`` (not ours: never mixed with, never overwritten);
* temp files (``.*.tmp``) anywhere below the directory are left by killed writers and deleted;
* a unit is complete when its files together hold exactly its row ids (``row_column``); an unreadable
  file makes its unit incomplete;
* files of incomplete units, and unit files of units outside the plan, are deleted; the rest is kept;
* the marker that describes a finished build (``manifest.json``, ``README.md``) is deleted while any unit
  is pending, so it only ever describes a complete directory.

    build = ShardedBuild(out, build="cache", dir_key="cache.dir", kinds=("shards", "quarantine"),
                         row_column="row_index", marker="manifest.json")
    build.open(fingerprint, source=source)
    pending, progress = build.start(units, unit_name="rows")
    ...  # write the files of the pending units, progress.update(n) as rows land
    build.finish(units)
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.progress import Progress
from prefopt_core.storage import Location, location

logger = logging.getLogger(__name__)

PLAN = "plan.json"


class PlanMismatchError(RuntimeError):
    """The directory was built with another plan (or is not a build directory of ours)."""


def fingerprint_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Sorted top-level keys whose values differ (a key missing on one side differs), followed by
    ``"key.sub"`` for the differing entries of every key whose values are dicts on both sides.

    >>> fingerprint_diff({"a": 1, "s": {"x": 1, "y": 2}}, {"a": 1, "s": {"x": 1, "y": 3}, "b": 0})
    ['b', 's', 's.y']
    """
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    nested = [
        f"{k}.{sub}"
        for k in keys
        if isinstance(old.get(k), dict) and isinstance(new.get(k), dict)
        for sub in sorted(set(old[k]) | set(new[k]))
        if old[k].get(sub) != new[k].get(sub)
    ]
    return keys + nested


# ---------------------------------------------------------------------------------------------- atomic writes
def atomic_write_bytes(data: bytes, path: str | Path | Location) -> None:
    """Publish ``data`` at ``path`` whole (temp file + rename locally, one upload to an object store)."""
    location(path).write_bytes(data)


def atomic_write_table(table: pa.Table, path: str | Path | Location) -> None:
    """Publish ``table`` as parquet at ``path`` whole (see :func:`atomic_write_bytes`)."""
    location(path).write_parquet(table)


def atomic_write_json(obj: Any, path: str | Path | Location) -> None:
    """Publish ``obj`` as JSON (sorted keys) at ``path`` whole."""
    location(path).write_json(obj)


def read_parquet(path: Location, columns: list[str] | None = None) -> pa.Table:
    """The parquet file at ``path`` (local or remote)."""
    return pq.read_table(path.path, columns=columns, filesystem=path.fs)


def parquet_metadata(path: Location):
    """The parquet footer of the file at ``path`` (rows, schema; the data is not read)."""
    with path.open_input() as f:
        return pq.ParquetFile(f).metadata


# ---------------------------------------------------------------------------------------------- naming
@dataclass(frozen=True)
class ShardNaming:
    """How unit files are named: ``{prefix}{unit:0{digits}d}`` [``-r{first_row:09d}``] [suffix] ``.parquet``."""

    prefix: str
    digits: int
    with_first_row: bool

    def name(self, unit: int, first_row: int = 0, suffix: str = "") -> str:
        row = f"-r{first_row:09d}" if self.with_first_row else ""
        return f"{self.prefix}{unit:0{self.digits}d}{row}{suffix}.parquet"

    def unit_of(self, name: str) -> int | None:
        """The unit a file name belongs to, ``None`` for a name this naming does not produce."""
        tail = r"-r\d{9}[\w-]*" if self.with_first_row else ""
        m = re.fullmatch(rf"{re.escape(self.prefix)}(\d{{{self.digits}}}){tail}\.parquet", name)
        return int(m.group(1)) if m else None


#: ``shards/f000002-r000000064.parquet``: unit 2, whose first row is 64 (latent cache, online rounds).
FRAGMENT_NAMING = ShardNaming("f", 6, True)
#: ``data/part-00002.parquet``: unit 2 (Hugging Face-style dataset shards).
PART_NAMING = ShardNaming("part-", 5, False)


# ---------------------------------------------------------------------------------------------- the build
class ShardedBuild:
    """One build directory: ``kinds`` are the folders holding unit files, ``row_column`` the column of
    those files that names each row, ``marker`` the file written last for a complete build. ``build``
    (the command, e.g. ``"cache"``) and ``dir_key`` (the setting naming the directory) go into messages.
    """

    def __init__(
        self,
        root: str | Path | Location,
        *,
        build: str,
        dir_key: str,
        kinds: Sequence[str],
        row_column: str,
        marker: str,
        naming: ShardNaming = FRAGMENT_NAMING,
        unit_name: str = "rows",
    ) -> None:
        self.root = location(root)
        self.build, self.dir_key, self.kinds = build, dir_key, tuple(kinds)
        self.row_column, self.marker, self.naming, self.unit_name = row_column, marker, naming, unit_name

    def file(self, kind: str, unit: int, first_row: int = 0, suffix: str = "") -> Location:
        """Where a file of ``unit`` goes (``suffix`` tells several files of one unit and kind apart)."""
        return self.root / kind / self.naming.name(unit, first_row, suffix)

    def files(self, kind: str) -> list[Location]:
        """The unit files of ``kind`` now in the directory, sorted."""
        folder = self.root / kind
        return [f for f in folder.glob("*.parquet") if self.naming.unit_of(f.name) is not None]

    def open(self, fingerprint: dict[str, Any], **plan_extra: Any) -> None:
        """Create the directory, delete temp files, then write ``plan.json`` (fingerprint + ``plan_extra``)
        on a fresh directory or refuse one made with another plan."""
        self.root.mkdir(parents=True, exist_ok=True)
        for tmp in self.root.rglob(".*.tmp"):  # left by a killed writer
            tmp.unlink()
        plan_path = self.root / PLAN
        if plan_path.exists():
            old = plan_path.read_json()["fingerprint"]
            if old != fingerprint:
                raise PlanMismatchError(
                    f"{self.root} holds a {self.build} build made with other settings (differs in: "
                    f"{', '.join(fingerprint_diff(old, fingerprint))}); use another {self.dir_key} or "
                    "delete this one to rebuild"
                )
            return
        foreign = [f for kind in self.kinds for f in (self.root / kind).glob("*.parquet")]
        if foreign:
            raise PlanMismatchError(
                f"{foreign[0].parent} holds parquet files but no {PLAN}: not a prefopt {self.build} "
                f"output; use an empty {self.dir_key}"
            )
        atomic_write_json({"fingerprint": fingerprint, **plan_extra}, plan_path)

    def _rows_by_unit(self) -> tuple[dict[int, list[int]], dict[int, list[Location]], set[int]]:
        """Row ids and files per unit from the files on disk, and the units with an unreadable file."""
        rows: dict[int, list[int]] = {}
        files: dict[int, list[Location]] = {}
        broken: set[int] = set()
        for kind in self.kinds:
            for f in self.files(kind):
                unit = self.naming.unit_of(f.name)
                files.setdefault(unit, []).append(f)
                try:
                    ids = read_parquet(f, [self.row_column])[self.row_column].to_pylist()
                except (OSError, pa.ArrowException) as e:
                    logger.warning("%s is unreadable (%s): building its unit again", f, e)
                    broken.add(unit)
                    continue
                rows.setdefault(unit, []).extend(ids)
        return rows, files, broken

    def pending(self, units: Sequence[Iterable[int]]) -> list[int]:
        """Indices of the ``units`` (each the row ids it must hold) not complete on disk; the files of
        incomplete units and of units outside the plan are deleted."""
        rows, files, broken = self._rows_by_unit()
        pending = [u for u, ids in enumerate(units) if u in broken or sorted(rows.get(u, [])) != sorted(ids)]
        stale = set(pending) | {u for u in files if u >= len(units)}
        for unit in sorted(stale & set(files)):
            for f in files[unit]:
                if unit >= len(units):
                    logger.warning("deleting %s: not part of this plan", f)
                f.unlink()
        return pending

    def start(self, units: Sequence[Sequence[int]], *, every_s: float = 5.0) -> tuple[list[int], Progress]:
        """The pending units (see :meth:`pending`) and a :class:`Progress` over all rows that counts
        the rows of the complete units as already done; deletes the marker while anything is pending."""
        pending = self.pending(units)
        if pending:
            (self.root / self.marker).unlink(missing_ok=True)
        todo = set(pending)
        done = sum(len(ids) for u, ids in enumerate(units) if u not in todo)
        logger.info(
            "%s %s: %d unit(s), %d done, %d to build",
            self.build,
            self.root,
            len(units),
            len(units) - len(pending),
            len(pending),
        )
        total = sum(len(ids) for ids in units)
        return pending, Progress(self.build, total, unit=self.unit_name, every_s=every_s, start_done=done)

    def finish(self, units: Sequence[Iterable[int]]) -> None:
        """Raise unless every unit is complete on disk (then the caller writes the marker)."""
        missing = self.pending(units)
        if missing:
            raise RuntimeError(
                f"{self.build} build ended with {len(missing)} incomplete unit(s) {missing[:5]}; "
                "rerun the same command to finish"
            )


# ---------------------------------------------------------------------------------------------- Ray Data
def run_actor_pool(
    specs: list[dict[str, Any]],
    actor: type,
    constructor_kwargs: dict[str, Any],
    *,
    num_actors: int,
    cpus_per_actor: float,
    batch_size: int = 1,
    before: Callable[[Any], Any] | None = None,
):
    """``specs`` (one item per unit) as a Ray Data dataset, optionally through ``before`` (more stages),
    then through an actor pool of ``actor`` (``num_actors`` actors, a GPU each where the cluster has
    GPUs); returns the dataset (its rows are whatever the actor returns). Ray must be initialised."""
    import ray

    ds = ray.data.from_items(specs, override_num_blocks=len(specs))
    if before is not None:
        ds = before(ds)
    return ds.map_batches(
        actor,
        fn_constructor_kwargs=constructor_kwargs,
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=cpus_per_actor,
        num_gpus=1 if ray.cluster_resources().get("GPU", 0) > 0 else 0,
    )
