"""Which data files a ``data.source`` names: a local file, directory or glob, or the same in object storage.

A directory (or object-store prefix) yields every ``*.parquet`` and ``*.tar`` below it, sorted, hidden files
skipped, filtered by ``split`` (:func:`split_matches`); a glob yields its matches with no split filter; a
string that is no existing path but looks like ``owner/name`` is a hub id (``None``).
"""

from __future__ import annotations

import fnmatch
import glob
import logging
import os
import re
from pathlib import Path, PurePosixPath

from prefopt_core.storage import Location, is_uri, location

logger = logging.getLogger(__name__)

DATA_SUFFIXES = {".parquet": "parquet", ".tar": "webdataset"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_GLOB_CHARS = re.compile(r"[*?\[]")
_HF_SHARD = re.compile(r"^(?P<split>\w+?)-\d{5}-of-\d{5}")  # "train-00000-of-00645.parquet"


class SourceNotFoundError(FileNotFoundError):
    """No data could be found for a source (empty directory, glob without matches, hub unreachable)."""


def split_matches(path: Path, root: Path, split: str) -> bool:
    """Whether a file under ``root`` belongs to ``split``.

    True when its name starts with ``<split>`` + one of ``-_.`` + a digit (HF shards
    ``train-00000-of-00645.parquet``, webdataset ``train-000001.tar``), its stem is ``<split>``
    (``train.parquet``), or a directory between ``root`` and the file is named ``<split>``
    (``train/part-0.parquet``). ``validation`` does not match ``validation_unique-00000-of-00001``.
    """
    rel = path.relative_to(root)
    if re.match(rf"{re.escape(split)}[-_.]\d", rel.name) or path.stem == split:
        return True
    return split in rel.parts[:-1]


def _filter_split(files: list[Path], root: Path, split: str) -> list[Path]:
    """Files of ``split``. When none match: an error if the files are HF-style split shards (the split is
    simply absent), else (ad-hoc names like ``pairs.parquet``) every file, with a warning."""
    selected = [f for f in files if split_matches(f, root, split)]
    if selected:
        return selected
    splits = sorted({m["split"] for f in files if (m := _HF_SHARD.match(f.name))})
    if splits:
        raise SourceNotFoundError(f"{root}: no files of split {split!r}; splits present: {splits}")
    logger.warning("%s: no file name mentions split %r; reading all %d files", root, split, len(files))
    return files


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _match_remote_files(source: str, split: str | None) -> list[Location]:
    """Sorted data files of an object-store source: one object, a prefix (directory) or a glob."""
    if _GLOB_CHARS.search(source):
        root = location(_GLOB_CHARS.split(source, 1)[0].rsplit("/", 1)[0])
        matches = [
            f for f in root.rglob("*") if fnmatch.fnmatch(f.uri, source) and _suffix(f) in DATA_SUFFIXES
        ]
        if not matches:
            raise SourceNotFoundError(f"no .parquet or .tar files match the glob {source!r}")
        return matches
    loc = location(source)
    if loc.is_file():
        if _suffix(loc) not in DATA_SUFFIXES:
            raise ValueError(
                f"{loc}: unsupported file type {_suffix(loc)!r}; expected one of {list(DATA_SUFFIXES)}"
            )
        return [loc]
    root = PurePosixPath(loc.path)
    found = {PurePosixPath(f.path): f for f in loc.rglob("*") if _suffix(f) in DATA_SUFFIXES}
    files = [p for p in sorted(found) if not _is_hidden(p, root)]
    if not files:
        raise SourceNotFoundError(f"{loc}: holds no .parquet or .tar files (or cannot be listed)")
    return [found[p] for p in (_filter_split(files, root, split) if split else files)]


def _suffix(path: Path | Location) -> str:
    return PurePosixPath(path.name).suffix


def _match_files(source: str, split: str | None) -> list[Path] | list[Location] | None:
    """Sorted absolute data files of a local or object-store source; None when ``source`` is a hub id."""
    if is_uri(source):
        return _match_remote_files(source, split)
    if _GLOB_CHARS.search(source):
        matches = sorted(
            Path(p).resolve()
            for p in glob.glob(os.path.expanduser(source), recursive=True)
            if Path(p).is_file() and Path(p).suffix in DATA_SUFFIXES
        )
        if not matches:
            raise SourceNotFoundError(f"no .parquet or .tar files match the glob {source!r}")
        return matches
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix not in DATA_SUFFIXES:
            raise ValueError(
                f"{path}: unsupported file type {path.suffix!r}; expected one of {list(DATA_SUFFIXES)}"
            )
        return [path.resolve()]
    if path.is_dir():
        root = path.resolve()
        files = sorted(
            f
            for f in root.rglob("*")
            if f.suffix in DATA_SUFFIXES and f.is_file() and not _is_hidden(f, root)
        )
        if not files:
            raise SourceNotFoundError(f"{root}: directory holds no .parquet or .tar files")
        return _filter_split(files, root, split) if split else files
    if _HUB_ID.fullmatch(source):
        return None
    raise FileNotFoundError(
        f"data source not found: {source!r} is not an existing file, directory or glob, nor a hub id 'owner/name'"
    )
