"""Where a run's files live: a local path or an object-store URI, behind one small type.

Every location in a config (``data.source``, ``cache.dir``, ``run.workdir``, ``regenerate.output_dir``,
``model.pretrained``, ``model.init_denoiser``, ...) may be a local path or a URI that pyarrow's filesystems
resolve (``s3://bucket/prefix``, ``gs://bucket/prefix``, ``hdfs://...``), or failing that fsspec.
:class:`Location` wraps one of them and offers the Path-like subset the project uses (``/``, ``name``,
``parent``, ``exists``, ``glob``, ``read_*``/``write_*``, ``unlink``), plus what object stores need:

* :meth:`Location.write_bytes` (and the parquet/JSON/text writers) publish atomically: a local file is
  written to a temp file and renamed; an object is uploaded in one PUT (a store shows an object only once
  its upload completes), so a reader never sees half a file on either;
* :meth:`Location.local_dir` makes a remote directory (a pipeline, a denoiser) readable by libraries that
  need a local path: it is copied once per node into :func:`local_scratch`, keyed and checked by a
  fingerprint of the listing (names, sizes, modification times).

Credentials and endpoints come from the ordinary places (the AWS/GCS environment variables and config
files, ``AWS_ENDPOINT_URL`` for S3-compatible stores): a URI carrying a user, password or query string is
refused, so a secret can never end up in a config, a summary or a log line. Local locations keep the
behaviour of :class:`pathlib.Path` exactly (same files, same temp-file-and-rename writes).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

#: Environment variable naming this node's local scratch directory (downloaded models, spill files).
LOCAL_DIR_ENV = "PREFOPT_LOCAL_DIR"
#: Default local scratch directory.
DEFAULT_LOCAL_DIR = "~/.cache/prefopt"
_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
#: Name of the file that marks a complete local copy of a remote directory (holds its fingerprint).
COPY_MARKER = ".prefopt-copy.json"


class StorageError(ValueError):
    """A location that cannot be used (credentials in the URI, a remote one where a local path is needed)."""


def is_uri(where: str | os.PathLike | Location) -> bool:
    """``True`` for a remote URI (``s3://b/k``); ``file://`` URIs and plain paths are local."""
    if isinstance(where, Location):
        return not where.is_local
    s = os.fspath(where)
    return bool(_URI.match(s)) and not s.startswith("file://")


def local_scratch() -> Path:
    """This node's local scratch directory (``$PREFOPT_LOCAL_DIR``, default ``~/.cache/prefopt``)."""
    return Path(os.environ.get(LOCAL_DIR_ENV) or DEFAULT_LOCAL_DIR).expanduser().resolve()


def _check_uri(uri: str) -> str:
    parts = urlsplit(uri)
    if "@" in parts.netloc or parts.query:
        # never echo the URI itself: it may hold the secret
        raise StorageError(
            f"a {parts.scheme}:// location carries a user, password or query string; give only "
            f"{parts.scheme}://bucket/path and put credentials and endpoints in the environment "
            "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS) "
            "or the provider's config files"
        )
    return uri.rstrip("/") if parts.path not in ("", "/") else f"{parts.scheme}://{parts.netloc}"


def _resolve_filesystem(uri: str):
    """``(filesystem, path inside it)`` of a URI: pyarrow's own filesystems, else fsspec's."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except pa.ArrowInvalid:
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


class Location:
    """A local path or a remote URI. Immutable; pickles as its string (the filesystem is resolved again,
    lazily, in the process that uses it)."""

    __slots__ = ("_fs", "_path", "is_local", "uri")

    def __init__(self, where: str | os.PathLike | Location) -> None:
        if isinstance(where, Location):
            self.uri, self.is_local, self._fs, self._path = where.uri, where.is_local, where._fs, where._path
            return
        s = os.fspath(where)
        if s.startswith("file://"):
            s = s[len("file://") :]
        self.is_local = not is_uri(s)
        self.uri = str(Path(s).expanduser().resolve()) if self.is_local else _check_uri(s)
        self._fs = self._path = None

    # ---- identity and naming
    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        """Equal to a Location of the same URI, and (when local) to a path of the same absolute place."""
        if isinstance(other, Location):
            return other.uri == self.uri
        if self.is_local and isinstance(other, os.PathLike):
            return os.path.abspath(os.fspath(other)) == self.uri
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.uri)

    def __lt__(self, other: Location) -> bool:
        return self.uri < other.uri

    def __reduce__(self):
        return (Location, (self.uri,))

    def __fspath__(self) -> str:
        if not self.is_local:
            raise StorageError(f"{self.uri} is an object-store location; this step needs a local path")
        return self.uri

    def __truediv__(self, name: str) -> Location:
        child = Location.__new__(Location)
        child.uri = str(Path(self.uri) / name) if self.is_local else f"{self.uri}/{name}"
        child.is_local, child._fs = self.is_local, self._fs
        child._path = None if self._path is None else f"{self._path.rstrip('/')}/{name}"
        return child

    @property
    def name(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        if self.is_local:
            return Location(Path(self.uri).parent)
        return Location(self.uri.rsplit("/", 1)[0])

    @property
    def local(self) -> Path:
        """The local path (raises :class:`StorageError` for a remote location)."""
        return Path(self.__fspath__())

    @property
    def fs(self):
        """The pyarrow filesystem holding this location."""
        self._resolve()
        return self._fs

    @property
    def path(self) -> str:
        """This location's path inside :attr:`fs`."""
        self._resolve()
        return self._path

    def _resolve(self) -> None:
        if self._path is not None:
            return
        if self.is_local:
            import pyarrow.fs as pafs

            self._fs, self._path = pafs.LocalFileSystem(), self.uri
        else:
            self._fs, self._path = _resolve_filesystem(self.uri)

    # ---- queries
    def _info(self):
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        if self.is_local:
            return Path(self.uri).exists()
        import pyarrow.fs as pafs

        return self._info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        if self.is_local:
            return Path(self.uri).is_dir()
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.Directory

    def is_file(self) -> bool:
        if self.is_local:
            return Path(self.uri).is_file()
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.File

    def size(self) -> int:
        return Path(self.uri).stat().st_size if self.is_local else self._info().size

    def _listing(self, recursive: bool, files_only: bool = True):
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self.path, allow_not_found=True, recursive=recursive)
        infos = self.fs.get_file_info(selector)
        return [i for i in infos if i.type == pafs.FileType.File or not files_only]

    def glob(self, pattern: str) -> list[Location]:
        """Entries (files and directories) directly in this directory whose names match ``pattern``
        (fnmatch), sorted."""
        if self.is_local:
            return sorted(self / p.name for p in Path(self.uri).glob(pattern))
        entries = self._listing(False, files_only=False)
        return sorted(self / i.base_name for i in entries if fnmatch.fnmatch(i.base_name, pattern))

    def rglob(self, pattern: str) -> list[Location]:
        """Files anywhere below this directory whose names match ``pattern``, sorted."""
        if self.is_local:
            root = Path(self.uri)
            return sorted(self / p.relative_to(root).as_posix() for p in root.rglob(pattern))
        base = self.path.rstrip("/")
        return sorted(
            self / i.path[len(base) + 1 :]
            for i in self._listing(True)
            if fnmatch.fnmatch(i.base_name, pattern)
        )

    # ---- reading
    def read_bytes(self) -> bytes:
        if self.is_local:
            return Path(self.uri).read_bytes()
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def read_json(self) -> Any:
        return json.loads(self.read_bytes())

    def open_input(self):
        """A seekable binary file (for ``pq.ParquetFile``, ``tarfile``)."""
        return open(self.uri, "rb") if self.is_local else self.fs.open_input_file(self.path)

    # ---- writing (atomic publication)
    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> None:
        """Create a local directory; object stores have none (a no-op there)."""
        if self.is_local:
            Path(self.uri).mkdir(parents=parents, exist_ok=exist_ok)

    def _temp(self) -> Path:
        path = Path(self.uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")

    def write_bytes(self, data: bytes) -> None:
        """Publish ``data`` whole: temp file + rename locally, one upload remotely."""
        if self.is_local:
            tmp = self._temp()
            tmp.write_bytes(data)
            os.replace(tmp, self.uri)
            return
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def write_json(self, obj: Any, **dumps: Any) -> None:
        self.write_bytes(json.dumps(obj, **({"indent": 1, "sort_keys": True} | dumps)).encode())

    def write_parquet(self, table) -> None:
        """Publish ``table`` as one parquet file, atomically (see :meth:`write_bytes`)."""
        import pyarrow.parquet as pq

        if self.is_local:
            tmp = self._temp()
            pq.write_table(table, tmp)
            os.replace(tmp, self.uri)
            return
        pq.write_table(table, self.path, filesystem=self.fs)

    def unlink(self, missing_ok: bool = False) -> None:
        if self.is_local:
            Path(self.uri).unlink(missing_ok=missing_ok)
        elif not missing_ok or self.exists():
            self.fs.delete_file(self.path)

    def rmtree(self) -> None:
        """Delete this directory and everything below it (nothing when it does not exist)."""
        if self.is_local:
            shutil.rmtree(self.uri, ignore_errors=True)
        elif self.exists():
            self.fs.delete_dir(self.path)

    def upload_dir(self, local_dir: str | Path) -> None:
        """Copy the local directory ``local_dir`` to this location (a plain copy when both are local)."""
        if self.is_local:
            shutil.copytree(local_dir, self.uri, dirs_exist_ok=True)
            return
        import pyarrow.fs as pafs

        pafs.copy_files(str(local_dir), self.path, pafs.LocalFileSystem(), self.fs)

    # ---- remote directories read through a local copy
    def fingerprint(self) -> str:
        """Hash of the directory listing below this location (relative names, sizes, modification times)."""
        base = self.path.rstrip("/")
        rows = sorted(
            (i.path[len(base) + 1 :], i.size, i.mtime_ns or 0)
            for i in self._listing(True)
            if i.base_name != COPY_MARKER
        )
        return hashlib.sha1(json.dumps([self.uri, rows]).encode()).hexdigest()[:16]

    def local_dir(self, scratch: Path | None = None) -> Path:
        """A local directory holding this location's files: the path itself when local; else a copy in
        ``<scratch>/remote/<name>-<fingerprint>``, downloaded once per node and reused while the remote
        listing keeps its fingerprint (a copy is complete only once its marker holds that fingerprint)."""
        if self.is_local:
            return Path(self.uri)
        fp = self.fingerprint()
        dest = (scratch or local_scratch()) / "remote" / f"{self.name}-{fp}"
        marker = dest / COPY_MARKER
        if marker.exists() and json.loads(marker.read_text()).get("fingerprint") == fp:
            return dest
        import pyarrow.fs as pafs

        if dest.exists() and not marker.exists():  # an unfinished copy: start again
            shutil.rmtree(dest, ignore_errors=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
        pafs.copy_files(self.path, str(tmp), self.fs, pafs.LocalFileSystem())
        (tmp / COPY_MARKER).write_text(json.dumps({"fingerprint": fp, "source": self.uri}))
        try:
            os.replace(tmp, dest)
        except OSError:  # another process on this node finished the same copy first
            shutil.rmtree(tmp, ignore_errors=True)
            if not marker.exists():
                raise
        return dest


def location(where: str | os.PathLike | Location) -> Location:
    """``where`` as a :class:`Location` (an existing one is returned as is)."""
    return where if isinstance(where, Location) else Location(where)


def local_path(where: str | os.PathLike | Location | None) -> str | None:
    """A local path for a file or directory location (a remote directory is copied once per node, see
    :meth:`Location.local_dir`); ``None``, hub ids and other non-location strings pass through unchanged."""
    if where is None or not is_uri(where):
        return None if where is None else os.fspath(where)
    return str(location(where).local_dir())
