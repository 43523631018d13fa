"""Read Pick-a-Pic-schema data and turn its rows into validated, canonical preference pairs.

Pure functions over pyarrow / PIL (no Ray): ``pipelines.latent_cache`` calls them inside Ray Data tasks,
one ``Fragment`` (a slice of rows of one input file) at a time::

    fragments = resolve_source("/data/pickapic_v2", split="train", rows_per_fragment=256)
    for fragment in fragments:  # in latent_cache: one Ray task per fragment
        pairs, quarantine = pair_validation.validate_and_canonicalize(fragment.read(), fragment)

Sources (``resolve_source``):

* a ``.parquet`` file, a directory (recursively every ``*.parquet`` and ``*.tar`` file, sorted, hidden
  files skipped, filtered by ``split`` -- see ``source_files.split_matches``), or a glob (``"/d/*.parquet"``, explicit:
  no split filter);
* webdataset ``.tar`` shards (file, directory or glob), see "Webdataset layout" below;
* a hub dataset id ``owner/name`` (anything that is not an existing path and looks like one), loaded with
  ``datasets.load_dataset(id, split=split)``. The Pick-a-Pic hub copy has been offline since 2025: prefer
  a local mirror.

Every required column is checked from metadata (parquet footer, tar member names) before any work; a
missing one raises ``MissingColumnError``. Rows are then checked one by one; a bad row is never fatal, it
goes to the quarantine table with a reason from ``schema.QUARANTINE_REASONS``.

Webdataset layout (one sample = consecutive tar members sharing a key; the key is the member path up to
the first dot of its base name, the rest is the field, as in the webdataset convention)::

    000042.jpg_0                    image bytes of image 0 (any format Pillow reads)      required
    000042.jpg_1                    image bytes of image 1                                required
    000042.caption.txt              UTF-8 caption (also: .caption, .txt)                  required*
    000042.label_0.txt              label text, e.g. "1", "0.5" (also: .label_0)          required*
    000042.label_1.txt              (also: .label_1)                                      required*
    000042.json                     optional JSON object with any Pick-a-Pic column; fields given as
                                    separate members win over the same key in the JSON

    (*) or given in the .json. Other members (.cls, .png, ...) are ignored. Members of one sample must be
    consecutive (webdataset's own rule); a key that reappears later raises.

Tars are read with ``tarfile`` in random-access mode: iterating members reads headers and seeks over the
data of samples before the fragment, so a fragment reads only its own image bytes. Plain ``.tar`` only.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import posixpath
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.schema import (
    PICKAPIC_OPTIONAL,
    PICKAPIC_REQUIRED,
    make_hub_source_key,
    make_pair_id,
    make_source_key,
)
from pipelines.source_files import (  # SourceNotFoundError is part of this module's API
    DATA_SUFFIXES,
    SourceNotFoundError,
    _match_files,
    _suffix,
)
from prefopt_core.storage import Location, is_uri, location

logger = logging.getLogger(__name__)

SourceKind = Literal["parquet", "webdataset", "hub"]
TiePolicy = Literal["drop", "random", "keep"]
SOURCE_KINDS: tuple[str, ...] = get_args(SourceKind)
TIE_POLICIES: tuple[str, ...] = get_args(TiePolicy)

LABEL_SUM_TOL = 1e-6
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096  # 16.8 MP; Pick-a-Pic images are 512-768 px a side
DEFAULT_MAX_CAPTION_CHARS = 2000  # catches garbage; CLIP itself truncates at 77 tokens (~300 chars)
DEFAULT_MIN_IMAGE_SIDE = 8

_ALL_COLUMNS = PICKAPIC_REQUIRED + PICKAPIC_OPTIONAL


class MissingColumnError(ValueError):
    """A required Pick-a-Pic column is absent from an input file (raised before any row is processed)."""

    def __init__(self, missing: list[str], source: str, found: list[str]):
        self.missing, self.source, self.found = missing, source, found
        super().__init__(
            f"{source}: missing required column(s) {missing}; required {list(PICKAPIC_REQUIRED)}, "
            f"found {found}"
        )


# ---------------------------------------------------------------------------------------------------------
# Fragments
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fragment:
    """Rows ``[start, stop)`` of one input: a parquet file, a webdataset tar, or a hub dataset split.

    ``source`` is the absolute file path (or the hub id), ``source_key`` its ``schema.make_source_key``,
    ``split`` the hub split (None for files). Fragments are small, picklable values: Ray ships them to
    the tasks that read them.
    """

    source: str
    kind: SourceKind
    start: int
    stop: int
    source_key: str
    split: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"Fragment.kind must be one of {SOURCE_KINDS}, got {self.kind!r}")
        if not 0 <= self.start <= self.stop:
            raise ValueError(f"Fragment needs 0 <= start <= stop, got [{self.start}, {self.stop})")

    @property
    def num_rows(self) -> int:
        return self.stop - self.start

    def pair_id(self, i: int) -> str:
        """Pair id of the fragment's i-th row (row ``start + i`` of the source)."""
        return make_pair_id(self.source_key, self.start + i)

    def read(self) -> pa.Table:
        """Rows ``[start, stop)`` in Pick-a-Pic column names: the required columns and whichever optional
        ones the source has. Image columns are binary; labels keep the source's type (float, int, or
        string for a webdataset label that is not a number)."""
        if self.kind == "parquet":
            table = _read_parquet_rows(self.source, self.start, self.stop)
        elif self.kind == "webdataset":
            table = _read_tar_rows(self.source, self.start, self.stop)
        else:
            table = _read_hub_rows(self.source, self.split, self.start, self.stop)
        return normalize_image_columns(table)


def _present_columns(names: Iterable[str]) -> list[str]:
    """Required + optional Pick-a-Pic columns present in ``names``, in canonical order."""
    present = set(names)
    return [c for c in _ALL_COLUMNS if c in present]


def _read_parquet_rows(path: str, start: int, stop: int) -> pa.Table:
    """Read only the row groups that overlap ``[start, stop)`` and only the Pick-a-Pic columns."""
    pf = pq.ParquetFile(_open_data(path))
    check_columns(pf.schema_arrow, path)
    columns = _present_columns(pf.schema_arrow.names)
    groups, first_row, offset = [], 0, 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if offset < stop and offset + n > start:
            if not groups:
                first_row = offset
            groups.append(g)
        offset += n
    if stop > offset:
        raise ValueError(f"{path}: rows [{start}, {stop}) requested but the file has {offset} rows")
    if not groups:
        return pf.schema_arrow.empty_table().select(columns)
    table = pf.read_row_groups(groups, columns=columns)
    return table.slice(start - first_row, stop - start)


def normalize_image_columns(table: pa.Table) -> pa.Table:
    """HF ``Image`` features are stored as struct<bytes, path>: keep the bytes."""
    for name in ("jpg_0", "jpg_1"):
        if name in table.column_names and pa.types.is_struct(table.schema.field(name).type):
            col = table.column(name).combine_chunks()
            table = table.set_column(table.column_names.index(name), name, col.field("bytes"))
    return table


# --- webdataset ------------------------------------------------------------------------------------------

_WDS_FIELDS = {
    "jpg_0": "jpg_0",
    "jpg_1": "jpg_1",
    "caption": "caption",
    "caption.txt": "caption",
    "txt": "caption",
    "label_0": "label_0",
    "label_0.txt": "label_0",
    "label_1": "label_1",
    "label_1.txt": "label_1",
    "json": "json",
}


def _split_member_name(name: str) -> tuple[str, str]:
    """``"shard/000042.label_0.txt"`` -> (key ``"shard/000042"``, field ext ``"label_0.txt"``)."""
    dirname, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(dirname, stem), ext


def _iter_tar_samples(tf: tarfile.TarFile, path: str) -> Iterator[tuple[int, tarfile.TarInfo, str]]:
    """Yield ``(sample_index, member, field)`` for every recognised member, in tar order."""
    index, current, seen = -1, None, set()
    for member in tf:
        if not member.isfile():
            continue
        key, ext = _split_member_name(member.name)
        field = _WDS_FIELDS.get(ext)
        if field is None:
            continue
        if key != current:
            if key in seen:
                raise ValueError(f"{path}: members of sample {key!r} are not consecutive in the tar")
            seen.add(key)
            index, current = index + 1, key
        yield index, member, field


def _scan_tar(path: str) -> tuple[int, list[str]]:
    """Number of samples and the Pick-a-Pic fields found (member names + the keys of the first .json)."""
    fields: set[str] = set()
    num_samples, json_seen = 0, False
    with (
        tarfile.open(fileobj=_open_data(path), mode="r:") if is_uri(path) else tarfile.open(path, "r:") as tf
    ):
        for index, member, field in _iter_tar_samples(tf, path):
            num_samples = index + 1
            if field == "json" and not json_seen:
                json_seen = True
                fields.update(k for k in json.loads(tf.extractfile(member).read()) if k in _ALL_COLUMNS)
            elif field != "json":
                fields.add(field)
    return num_samples, sorted(fields)


def _read_tar_rows(path: str, start: int, stop: int) -> pa.Table:
    records: list[dict[str, Any]] = []
    with (
        tarfile.open(fileobj=_open_data(path), mode="r:") if is_uri(path) else tarfile.open(path, "r:") as tf
    ):
        for index, member, field in _iter_tar_samples(tf, path):
            if index >= stop:
                break
            if index < start:
                continue  # only the header was read; tarfile seeks over the data
            if index - start == len(records):
                records.append({})
            record, data = records[-1], tf.extractfile(member).read()
            if field == "json":
                for k, v in json.loads(data).items():
                    if k in _ALL_COLUMNS:
                        record.setdefault(k, v)  # a separate member wins over the JSON
            elif field in ("jpg_0", "jpg_1"):
                record[field] = data
            else:
                text = data.decode("utf-8", errors="replace")
                record[field] = text.rstrip("\r\n") if field == "caption" else text.strip()
    if len(records) != stop - start:
        raise ValueError(f"{path}: rows [{start}, {stop}) requested but the tar has fewer samples")
    return _records_to_table(records)


def _records_to_table(records: list[dict[str, Any]]) -> pa.Table:
    """Required columns always (null where a sample lacks a field), optional ones when any sample has them."""
    data: dict[str, pa.Array] = {
        "caption": pa.array([r.get("caption") for r in records], pa.string()),
        "jpg_0": pa.array([r.get("jpg_0") for r in records], pa.binary()),
        "jpg_1": pa.array([r.get("jpg_1") for r in records], pa.binary()),
        "label_0": _label_array([r.get("label_0") for r in records]),
        "label_1": _label_array([r.get("label_1") for r in records]),
    }
    for name in PICKAPIC_OPTIONAL:
        if any(name in r for r in records):
            values = [r.get(name) for r in records]
            try:
                data[name] = pa.array(values)
            except (pa.ArrowException, TypeError, ValueError):
                data[name] = pa.array([None if v is None else str(v) for v in values], pa.string())
    return pa.table(data)


def label_value(value: Any) -> float | None:
    """A label cell as float (NaN kept); None when null or not a number ("abc", [1])."""
    if value is None:
        return None
    try:
        return float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        return None


def _label_array(values: list[Any]) -> pa.Array:
    """float64 when every non-null value parses as a number, else the raw values as strings."""
    parsed = [label_value(v) for v in values]
    if all(p is not None or v is None for p, v in zip(parsed, values)):
        return pa.array(parsed, pa.float64())
    return pa.array([None if v is None else str(v) for v in values], pa.string())


# --- hub -------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _load_hub(dataset_id: str, split: str) -> Any:
    """``datasets.load_dataset(dataset_id, split=split)``, memoised per process (the data is on disk)."""
    try:
        import datasets

        return datasets.load_dataset(dataset_id, split=split, streaming=False)
    except Exception as e:
        raise SourceNotFoundError(
            f"{dataset_id!r} is not a local path, and loading it as a hub dataset (split={split!r}) failed: "
            f"{type(e).__name__}: {e}. The Pick-a-Pic hub copy has been offline since 2025: pass a local "
            "parquet file, directory or glob, or webdataset .tar shards."
        ) from e


def _read_hub_rows(dataset_id: str, split: str | None, start: int, stop: int) -> pa.Table:
    ds = _load_hub(dataset_id, split or "train")
    table = ds.with_format("arrow")[start:stop]
    return table.select(_present_columns(table.column_names))


# ---------------------------------------------------------------------------------------------------------
# Resolving a source into fragments
# ---------------------------------------------------------------------------------------------------------


def check_columns(schema_or_names: pa.Schema | pa.Table | Iterable[str], source: str) -> None:
    """Raise ``MissingColumnError`` naming every missing required column and the ``source``."""
    if isinstance(schema_or_names, pa.Table):
        schema_or_names = schema_or_names.schema
    names = list(schema_or_names.names if isinstance(schema_or_names, pa.Schema) else schema_or_names)
    missing = [c for c in PICKAPIC_REQUIRED if c not in names]
    if missing:
        raise MissingColumnError(missing, str(source), sorted(names))


def _open_data(path: str | Path | Location):
    """What pyarrow and tarfile read: the local path itself, or a seekable stream of a remote object."""
    return location(path).open_input() if is_uri(path) else path


def _inspect_file(path: Path | Location) -> tuple[SourceKind, int]:
    """Kind and row count of one file, checking its columns from metadata only."""
    kind = DATA_SUFFIXES[_suffix(path)]
    if kind == "parquet":
        pf = pq.ParquetFile(_open_data(path))
        check_columns(pf.schema_arrow, str(path))
        return "parquet", pf.metadata.num_rows
    num_samples, fields = _scan_tar(str(path))
    if num_samples:
        check_columns(fields, str(path))
    return "webdataset", num_samples


def _fragments_of(
    source: str, kind: SourceKind, key: str, num_rows: int, rows_per_fragment: int, split: str | None = None
) -> list[Fragment]:
    return [
        Fragment(source, kind, start, min(start + rows_per_fragment, num_rows), key, split)
        for start in range(0, num_rows, rows_per_fragment)
    ]


def resolve_source(
    source: str | os.PathLike[str],
    *,
    split: str | None = None,
    rows_per_fragment: int = 256,
    max_pairs: int | None = None,
) -> list[Fragment]:
    """Deterministic list of fragments covering every input row exactly once.

    Files are taken in sorted path order, each cut into ``[0, r), [r, 2r), ...`` with ``r =
    rows_per_fragment`` (the last fragment of a file may be shorter). ``max_pairs`` keeps only the first
    ``max_pairs`` *input* rows in that order (before validation, so fewer valid pairs may come out).
    Required columns of every file that will be read are checked first (``MissingColumnError``).
    ``split`` filters directories (``split_matches``) and names the hub split (default ``"train"``);
    it is ignored for an explicit file or glob.
    """
    if rows_per_fragment < 1:
        raise ValueError(f"rows_per_fragment must be >= 1, got {rows_per_fragment}")
    if max_pairs is not None and max_pairs < 0:
        raise ValueError(f"max_pairs must be >= 0 or None, got {max_pairs}")
    source = os.fspath(source)
    files = _match_files(source, split)
    if files is None:
        return _hub_fragments(source, split or "train", rows_per_fragment, max_pairs)

    fragments: list[Fragment] = []
    keys: dict[str, Path | Location] = {}
    remaining = math.inf if max_pairs is None else max_pairs
    for path in files:
        if remaining <= 0:
            break
        kind, num_rows = _inspect_file(path)
        key = make_source_key(path)
        if key in keys:
            raise ValueError(
                f"source key collision: {keys[key]} and {path} have the same base name and size; "
                "pair ids would clash (see schema.make_source_key). Rename one of them."
            )
        keys[key] = path
        num_rows = int(min(num_rows, remaining))
        remaining -= num_rows
        fragments += _fragments_of(str(path), kind, key, num_rows, rows_per_fragment)
    logger.info(
        "resolved %s: %d file(s), %d row(s), %d fragment(s)",
        source,
        len(keys),
        sum(f.num_rows for f in fragments),
        len(fragments),
    )
    return fragments


def _hub_fragments(
    dataset_id: str, split: str, rows_per_fragment: int, max_pairs: int | None
) -> list[Fragment]:
    ds = _load_hub(dataset_id, split)
    check_columns(list(ds.column_names), f"hub:{dataset_id}[{split}]")
    num_rows = len(ds) if max_pairs is None else min(len(ds), max_pairs)
    key = make_hub_source_key(dataset_id, split)
    return _fragments_of(dataset_id, "hub", key, num_rows, rows_per_fragment, split)


# ---------------------------------------------------------------------------------------------------------
# Row validation
# ---------------------------------------------------------------------------------------------------------
