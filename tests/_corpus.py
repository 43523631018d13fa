"""Deterministic Pick-a-Pic-schema test corpora: good rows, one bad row per quarantine reason, writers.

Reused by the pipeline tests and the demo to build small inputs without any download::

    from tests._corpus import bad_rows, good_row, write_pickapic_parquet, write_webdataset_tar

    rows = [good_row(i) for i in range(8)] + [row for row, _reason in bad_rows()]
    write_pickapic_parquet(tmp_path / "data/train-00000-of-00001.parquet", rows)

Images are small JPEGs (a noisy background and a coloured shape), a pure function of their seed.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from pipelines.schema import PICKAPIC_OPTIONAL, PICKAPIC_SCHEMA

_EPOCH = dt.datetime(2023, 5, 1, 12, 0, 0)


def make_image(seed: int, size: int | tuple[int, int] = 48) -> Image.Image:
    """RGB image (width, height) = ``size``: noisy background plus one filled ellipse or rectangle."""
    width, height = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=3)
    noise = rng.integers(-24, 25, size=(height, width, 3))
    image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))  # (H, W, 3)
    x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
    x1, y1 = x0 + int(rng.integers(width // 4, width // 2)), y0 + int(rng.integers(height // 4, height // 2))
    fill = tuple(int(c) for c in rng.integers(0, 256, size=3))
    draw = ImageDraw.Draw(image)
    (draw.ellipse if seed % 2 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    return image


def encode(image: Image.Image, fmt: str = "JPEG", **options: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}) | options)
    return buf.getvalue()


def make_jpeg(seed: int, size: int | tuple[int, int] = 48) -> bytes:
    return encode(make_image(seed, size), "JPEG")


def png_with_header_size(width: int, height: int) -> bytes:
    """A valid 16x16 PNG whose IHDR claims ``width`` x ``height`` (CRC fixed): a decompression bomb's
    header without its data. Pillow reports the claimed size from ``Image.open``."""
    data = bytearray(encode(make_image(7, 16), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def jpeg_with_header_size(width: int, height: int) -> bytes:
    """A small baseline JPEG whose SOF0 segment claims ``width`` x ``height``."""
    data = bytearray(make_jpeg(11, 16))
    sof = data.index(b"\xff\xc0")  # marker, length(2), precision(1), height(2), width(2)
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def truncated_jpeg(seed: int, size: int = 64) -> bytes:
    """A JPEG cut two thirds of the way through its entropy-coded data (header intact)."""
    data = make_jpeg(seed, size)
    return data[: len(data) * 2 // 3]


def good_row(i: int, size: int = 48, rng: np.random.Generator | None = None) -> dict[str, Any]:
    """A valid Pick-a-Pic v2 row. Even ``i``: image 0 chosen (1.0/0.0); odd ``i``: image 1 chosen.

    Images are seeded from ``rng`` (default ``np.random.default_rng(i)``), so the row is a pure
    function of ``i`` (and ``size``) unless a generator is passed.
    """
    rng = np.random.default_rng(i) if rng is None else rng
    seed_0, seed_1 = (int(s) for s in rng.integers(0, 2**31, size=2))
    chosen_0 = i % 2 == 0
    return {
        "caption": f"a photo of object number {i}",
        "jpg_0": make_jpeg(seed_0, size),
        "jpg_1": make_jpeg(seed_1, size),
        "label_0": 1.0 if chosen_0 else 0.0,
        "label_1": 0.0 if chosen_0 else 1.0,
        "has_label": True,
        "are_different": True,
        "best_image_uid": f"img-{i}-{0 if chosen_0 else 1}",
        "image_0_uid": f"img-{i}-0",
        "image_1_uid": f"img-{i}-1",
        "image_0_url": f"https://example.invalid/{i}/0.jpg",
        "image_1_url": f"https://example.invalid/{i}/1.jpg",
        "model_0": "sdxl",
        "model_1": "sd-2.1",
        "ranking_id": 10_000 + i,
        "user_id": 7 + i % 5,
        "created_at": _EPOCH + dt.timedelta(minutes=i),
        "num_example_per_prompt": 1,
    }


def bad_rows(size: int = 48) -> list[tuple[dict[str, Any], str]]:
    """``(row, expected_reason)`` covering every reason ``validate_and_canonicalize`` produces (with
    tie_policy="drop"), some twice (different ways to fail). Each row is otherwise valid."""
    same_pixels = make_image(501, size)

    def row(k: int, **changes: Any) -> dict[str, Any]:
        out = good_row(1000 + k, size)
        out.update(changes)
        return out

    return [
        (row(0, caption="   \n\t"), "empty_caption"),
        (row(1, caption=None), "empty_caption"),
        (row(2, caption="x" * 5000), "caption_too_long"),
        (row(3, label_0=float("nan"), label_1=1.0), "nan_label"),
        (row(4, label_0=2.0, label_1=-1.0), "bad_label"),
        (row(5, label_0=None, label_1=1.0), "bad_label"),
        (row(6, label_0=0.3, label_1=0.3), "labels_not_sum_to_one"),
        (row(7, jpg_1=b""), "empty_image"),
        (row(8, jpg_0=png_with_header_size(5000, 5000)), "image_too_large"),  # > our 16.8 MP limit
        (row(9, jpg_1=png_with_header_size(30000, 30000)), "image_too_large"),  # > 2x Pillow's limit
        (row(10, jpg_0=jpeg_with_header_size(6000, 6000)), "image_too_large"),
        (row(11, jpg_1=make_jpeg(11, 4)), "image_too_small"),
        (row(12, jpg_0=b"definitely not an image " * 8), "undecodable_image"),
        (row(13, jpg_1=truncated_jpeg(13)), "truncated_image"),
        (row(14, jpg_1=make_jpeg(514, size), jpg_0=make_jpeg(514, size)), "identical_images"),
        (
            row(
                15,
                jpg_0=encode(same_pixels, "PNG", compress_level=1),
                jpg_1=encode(same_pixels, "PNG", compress_level=9),
            ),
            "identical_images",
        ),
        (row(16, label_0=0.5, label_1=0.5), "tie"),
    ]


def _schema_for(rows: list[dict[str, Any]]) -> pa.Schema:
    """PICKAPIC_SCHEMA restricted to the columns that appear in ``rows`` (in schema order)."""
    names = set().union(*(r.keys() for r in rows)) if rows else set(PICKAPIC_SCHEMA.names)
    return pa.schema([f for f in PICKAPIC_SCHEMA if f.name in names])


def write_pickapic_parquet(
    path: str | Path,
    rows: list[dict[str, Any]],
    *,
    schema: pa.Schema | None = None,
    row_group_size: int | None = None,
) -> Path:
    """Write ``rows`` as parquet. ``schema`` defaults to the PICKAPIC_SCHEMA columns present in the rows
    (drop a key from every row to drop the column; pass ``schema.MAPO_SCHEMA`` for int labels)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=schema or _schema_for(rows))
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def _json_value(value: Any) -> Any:
    return value.isoformat() if isinstance(value, dt.datetime) else value


def write_webdataset_tar(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Write ``rows`` as one webdataset shard in the layout ``pipelines.pickapic`` documents: per sample
    ``<key>.jpg_0``, ``<key>.jpg_1``, ``<key>.caption.txt``, ``<key>.label_0.txt``, ``<key>.label_1.txt``
    and a ``<key>.json`` with the optional metadata; keys ``000000``, ``000001``, ... A None field is left
    out (so the reader sees it as null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, row in enumerate(rows):
            key = f"{i:06d}"
            for field in ("jpg_0", "jpg_1"):
                if row.get(field) is not None:
                    _add_member(tar, f"{key}.{field}", row[field])
            if row.get("caption") is not None:
                _add_member(tar, f"{key}.caption.txt", row["caption"].encode())
            for field in ("label_0", "label_1"):
                if row.get(field) is not None:
                    _add_member(tar, f"{key}.{field}.txt", repr(row[field]).encode())
            meta = {k: _json_value(row[k]) for k in PICKAPIC_OPTIONAL if row.get(k) is not None}
            if meta:
                _add_member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
    return path
