"""prefopt_core.storage against the session's moto S3 server on 127.0.0.1 (and the local disk)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from prefopt_core.storage import COPY_MARKER, Location, StorageError, is_uri, local_path


def test_remote_write_read_list_unlink(s3_bucket):
    """Objects written under a prefix read back, are listed by name (sorted, fnmatch), and unlink removes one."""
    root = Location(f"{s3_bucket}/storage/basic")
    (root / "b.json").write_json({"x": 1})
    (root / "a.json").write_text("{}")
    (root / "sub" / "c.json").write_text("{}")
    assert (root / "b.json").read_json() == {"x": 1}
    assert [f.name for f in root.glob("*.json")] == ["a.json", "b.json"]
    assert [f.uri for f in root.rglob("c.*")] == [f"{s3_bucket}/storage/basic/sub/c.json"]
    (root / "a.json").unlink()
    assert not (root / "a.json").exists()
    (root / "a.json").unlink(missing_ok=True)  # absent: no error
    assert root.is_dir() and (root / "b.json").is_file()


def test_local_write_leaves_no_temp_file(tmp_path):
    """A local write is temp file + rename: afterwards the directory holds only the target."""
    Location(tmp_path / "d" / "x.bin").write_bytes(b"abc")
    assert sorted(os.listdir(tmp_path / "d")) == ["x.bin"]
    assert (tmp_path / "d" / "x.bin").read_bytes() == b"abc"


def test_location_pickles_as_its_string(s3_bucket):
    """A Location sent to a Ray task arrives as the same URI (the filesystem is resolved again there)."""
    import pickle

    loc = Location(f"{s3_bucket}/storage/p") / "f.parquet"
    assert pickle.loads(pickle.dumps(loc)) == loc
    assert str(pickle.loads(pickle.dumps(loc))) == f"{s3_bucket}/storage/p/f.parquet"


@pytest.mark.parametrize(
    "uri", ["s3://AKIDSECRET:hunter2@bucket/x", "s3://bucket/x?access_key=AKIDSECRET&secret_key=hunter2"]
)
def test_credentials_in_uri_refused_without_echo(uri):
    """A URI carrying credentials is refused, and the message never repeats them."""
    with pytest.raises(StorageError, match="environment") as err:
        Location(uri)
    assert "hunter2" not in str(err.value) and "AKIDSECRET" not in str(err.value)


def test_remote_location_needs_local_path_is_loud(s3_bucket):
    """A bucket location used where a library needs a local path fails naming it (no silent 's3:/b')."""
    with pytest.raises(StorageError, match="s3://prefopt-test/x"):
        os.fspath(Location(f"{s3_bucket}/x"))


def test_is_uri():
    """Schemes with :// are remote, except file://; plain and relative paths are local."""
    assert [is_uri(s) for s in ("s3://b/k", "gs://b", "file:///tmp/x", "/tmp/x", "rel/x")] == [
        True,
        True,
        False,
        False,
        False,
    ]


def test_remote_dir_copied_once_per_fingerprint(s3_bucket, tmp_path, monkeypatch):
    """A remote directory is downloaded into the local scratch dir once; a second call reuses the copy
    (marker untouched); a changed object changes the fingerprint and so the copy."""
    monkeypatch.setenv("PREFOPT_LOCAL_DIR", str(tmp_path / "scratch"))
    model = Location(f"{s3_bucket}/storage/model")
    (model / "config.json").write_json({"a": 1})
    (model / "unet" / "w.bin").write_bytes(b"0123")
    first = local_path(model.uri)
    assert Path(first, "unet", "w.bin").read_bytes() == b"0123"
    marker = os.path.join(first, COPY_MARKER)
    stamp = os.stat(marker).st_mtime_ns
    assert local_path(model.uri) == first and os.stat(marker).st_mtime_ns == stamp
    (model / "unet" / "w.bin").write_bytes(b"012345")
    second = local_path(model.uri)
    assert second != first and Path(second, "unet", "w.bin").read_bytes() == b"012345"
