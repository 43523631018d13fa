"""Tests of pipelines.pickapic: source resolution, fragment reading, row validation and canonical pairs."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import ImageFile

from pipelines import pair_validation, pickapic
from pipelines.pair_validation import quarantine_counts, validate_and_canonicalize
from pipelines.pickapic import (
    Fragment,
    MissingColumnError,
    SourceNotFoundError,
    check_columns,
    resolve_source,
)
from pipelines.schema import (
    MAPO_SCHEMA,
    PAIR_SCHEMA,
    QUARANTINE_REASONS,
    QUARANTINE_SCHEMA,
    make_pair_id,
    make_source_key,
)
from tests._corpus import bad_rows, good_row, make_jpeg, write_pickapic_parquet, write_webdataset_tar

SHARD = "data/train-00000-of-00001.parquet"


def run_all(source, **kwargs) -> tuple[pa.Table, pa.Table]:
    """resolve -> read -> validate every fragment; concatenated (pairs, quarantine)."""
    resolve_kw = {k: kwargs.pop(k) for k in ("split", "rows_per_fragment", "max_pairs") if k in kwargs}
    outputs = [validate_and_canonicalize(f.read(), f, **kwargs) for f in resolve_source(source, **resolve_kw)]
    return pa.concat_tables([p for p, _ in outputs]), pa.concat_tables([q for _, q in outputs])


@pytest.fixture(scope="module")
def corpus():
    """(rows, expected reason per row or None for good rows): 6 good rows then the bad rows."""
    good = [good_row(i) for i in range(6)]
    bad = bad_rows()
    return good + [r for r, _ in bad], [None] * len(good) + [reason for _, reason in bad]


# ---------------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------------


def test_bad_rows_quarantined_with_reason_and_original_data(tmp_path, corpus):
    rows, expected = corpus
    path = write_pickapic_parquet(tmp_path / SHARD, rows, row_group_size=4)
    pairs, quarantine = run_all(tmp_path, rows_per_fragment=5)

    assert pairs.schema == PAIR_SCHEMA and quarantine.schema == QUARANTINE_SCHEMA
    assert pairs.num_rows + quarantine.num_rows == len(rows)
    got = {r["row_index"]: r for r in quarantine.to_pylist()}
    assert {i: r["reason"] for i, r in got.items()} == {i: e for i, e in enumerate(expected) if e is not None}
    assert set(QUARANTINE_REASONS) - {"invalid_row", "nonfinite_latents"} <= {e for e in expected if e}
    key = make_source_key(path)
    for i, q in got.items():
        original = rows[i]
        assert q["pair_id"] == make_pair_id(key, i)
        assert q["source"] == str(path.resolve())
        assert q["detail"]
        assert q["caption"] == original["caption"]
        assert q["jpg_0"] == original["jpg_0"] and q["jpg_1"] == original["jpg_1"]
        for name in ("label_0", "label_1"):
            want, have = original[name], q[name]
            assert (have is None and want is None) or have == want or (math.isnan(have) and math.isnan(want))
    counts = quarantine_counts(quarantine)
    assert counts["image_too_large"] == 3 and counts["tie"] == 1 and counts["nonfinite_latents"] == 0


def test_good_rows_canonical_chosen_first(tmp_path):
    rows = [good_row(i) for i in range(4)]
    path = write_pickapic_parquet(tmp_path / "pairs.parquet", rows)
    pairs, quarantine = run_all(path)

    assert quarantine.num_rows == 0
    for i, pair in enumerate(pairs.to_pylist()):
        swapped = rows[i]["label_0"] == 0.0  # odd rows: image 1 chosen
        assert pair["swapped"] is swapped and pair["is_tie"] is False
        assert pair["jpg_w"] == rows[i]["jpg_1" if swapped else "jpg_0"]
        assert pair["jpg_l"] == rows[i]["jpg_0" if swapped else "jpg_1"]
        assert (pair["label_w"], pair["label_l"]) == (1.0, 0.0)
        assert pair["caption"] == rows[i]["caption"] and pair["row_index"] == i
        assert pair["pair_id"] == f"{make_source_key(path)}:{i}"
    assert pairs.column("swapped").to_pylist() == [False, True, False, True]


def _tie_rows(n: int) -> list[dict]:
    return [good_row(i, size=16) | {"label_0": 0.5, "label_1": 0.5} for i in range(n)]


def test_tie_policies(tmp_path):
    rows = _tie_rows(120)
    write_pickapic_parquet(tmp_path / SHARD, rows)

    pairs, quarantine = run_all(tmp_path, tie_policy="drop")
    assert pairs.num_rows == 0 and set(quarantine.column("reason").to_pylist()) == {"tie"}

    kept, quarantine = run_all(tmp_path, tie_policy="keep")
    assert quarantine.num_rows == 0 and all(kept.column("is_tie").to_pylist())
    assert not any(kept.column("swapped").to_pylist())
    assert kept.column("jpg_w").to_pylist() == [r["jpg_0"] for r in rows]
    assert set(kept.column("label_w").to_pylist()) == {0.5}

    a, _ = run_all(tmp_path, tie_policy="random", seed=3, rows_per_fragment=7)
    b, _ = run_all(tmp_path, tie_policy="random", seed=3, rows_per_fragment=50)  # sharding-independent
    c, _ = run_all(tmp_path, tie_policy="random", seed=4)
    swaps = a.column("swapped").to_pylist()
    assert swaps == b.column("swapped").to_pylist()
    assert swaps != c.column("swapped").to_pylist()
    assert 0.3 < sum(swaps) / len(swaps) < 0.7
    for pair, row in zip(a.to_pylist(), rows):
        assert pair["is_tie"] and pair["jpg_w"] == row["jpg_1" if pair["swapped"] else "jpg_0"]


def test_mapo_int_labels_and_string_labels(tmp_path):
    rows = [{k: good_row(i)[k] for k in ("caption", "jpg_0", "jpg_1")} for i in range(4)]
    rows = [r | {"label_0": i % 2, "label_1": 1 - i % 2} for i, r in enumerate(rows)]
    write_pickapic_parquet(tmp_path / "mapo" / SHARD, rows, schema=MAPO_SCHEMA)
    assert pq.read_schema(tmp_path / "mapo" / SHARD).field("label_0").type == pa.int64()
    pairs, quarantine = run_all(tmp_path / "mapo", split="train")
    assert quarantine.num_rows == 0
    assert pairs.column("swapped").to_pylist() == [True, False, True, False]
    assert set(pairs.column("label_w").to_pylist()) == {1.0}

    string_schema = pa.schema([MAPO_SCHEMA.field(n) for n in ("caption", "jpg_0", "jpg_1")])
    string_schema = string_schema.append(pa.field("label_0", pa.string())).append(
        pa.field("label_1", pa.string())
    )
    rows_str = [r | {"label_0": str(r["label_0"]), "label_1": f" {r['label_1']} "} for r in rows]
    rows_str[0] |= {"label_0": "abc"}
    write_pickapic_parquet(tmp_path / "str.parquet", rows_str, schema=string_schema)
    pairs_str, quarantine = run_all(tmp_path / "str.parquet")
    assert pairs_str.column("swapped").to_pylist() == [False, True, False]
    (q,) = quarantine.to_pylist()
    assert q["reason"] == "bad_label" and "'abc'" in q["detail"] and q["label_0"] is None


def test_unexpected_exception_becomes_invalid_row(tmp_path, monkeypatch):
    path = write_pickapic_parquet(tmp_path / "x.parquet", [good_row(i, size=16) for i in range(3)])
    real = pair_validation._check_images

    def flaky(raw_0, raw_1, *args):
        if raw_0 == good_row(1, size=16)["jpg_0"]:
            raise RuntimeError("boom")
        return real(raw_0, raw_1, *args)

    monkeypatch.setattr(pair_validation, "_check_images", flaky)
    pairs, quarantine = run_all(path)
    assert pairs.column("row_index").to_pylist() == [0, 2]
    (q,) = quarantine.to_pylist()
    assert (q["reason"], q["detail"], q["row_index"]) == ("invalid_row", "RuntimeError: boom", 1)


def test_refuses_to_run_with_load_truncated_images(tmp_path, monkeypatch):
    path = write_pickapic_parquet(tmp_path / "x.parquet", [good_row(0, size=16)])
    (fragment,) = resolve_source(path)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        validate_and_canonicalize(fragment.read(), fragment)


def test_bad_options_are_loud(tmp_path):
    path = write_pickapic_parquet(tmp_path / "x.parquet", [good_row(0, size=16)])
    (fragment,) = resolve_source(path)
    with pytest.raises(ValueError, match=r"tie_policy must be one of \('drop', 'random', 'keep'\)"):
        validate_and_canonicalize(fragment.read(), fragment, tie_policy="coin")
    with pytest.raises(ValueError, match="rows_per_fragment"):
        resolve_source(path, rows_per_fragment=0)
    with pytest.raises(ValueError, match="kind must be one of"):
        Fragment("x", "csv", 0, 1, "k")


# ---------------------------------------------------------------------------------------------------------
# resolving and reading
# ---------------------------------------------------------------------------------------------------------


def test_missing_column_fails_before_any_work(tmp_path, monkeypatch):
    write_pickapic_parquet(tmp_path / "d/a.parquet", [good_row(0, size=16)])
    rows = [{k: v for k, v in good_row(i, size=16).items() if k != "label_1"} for i in range(2)]
    bad = write_pickapic_parquet(tmp_path / "d/b.parquet", rows)
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", lambda *a, **k: pytest.fail("read data"))
    with pytest.raises(MissingColumnError, match="label_1") as info:
        resolve_source(tmp_path / "d")
    assert info.value.missing == ["label_1"] and str(bad.resolve()) in str(info.value)
    with pytest.raises(MissingColumnError, match=r"\['caption', 'label_0'\]"):
        check_columns(["jpg_0", "jpg_1", "label_1"], "somewhere")
    tar = write_webdataset_tar(tmp_path / "w.tar", rows)
    with pytest.raises(MissingColumnError, match="label_1"):
        resolve_source(tar)


@pytest.mark.parametrize("rows_per_fragment", [1, 3, 7, 256])
def test_fragments_cover_every_row_once(tmp_path, rows_per_fragment):
    sizes = {"data/train-00000-of-00003.parquet": 10, "data/train-00001-of-00003.parquet": 1,
             "data/train-00002-of-00003.parquet": 17}  # fmt: skip
    jpg = make_jpeg(0, 8)
    for name, n in sizes.items():
        rows = [
            {"caption": f"{name}:{i}", "jpg_0": jpg, "jpg_1": jpg, "label_0": 1.0, "label_1": 0.0}
            for i in range(n)
        ]
        write_pickapic_parquet(tmp_path / name, rows, row_group_size=4)
    fragments = resolve_source(tmp_path, split="train", rows_per_fragment=rows_per_fragment)

    assert all(0 < f.num_rows <= rows_per_fragment for f in fragments)
    assert [f.source for f in fragments] == sorted(f.source for f in fragments)
    seen = []
    for f in fragments:
        captions = f.read().column("caption").to_pylist()
        name = Path(f.source).relative_to(tmp_path.resolve()).as_posix()
        assert captions == [f"{name}:{i}" for i in range(f.start, f.stop)]
        seen += captions
    expected = [f"{name}:{i}" for name, n in sorted(sizes.items()) for i in range(n)]
    assert seen == expected  # every row once, in order


def test_fragment_reads_only_needed_row_groups_and_columns(tmp_path, monkeypatch):
    jpg = make_jpeg(0, 8)
    rows = [
        {"caption": str(i), "jpg_0": jpg, "jpg_1": jpg, "label_0": 1.0, "label_1": 0.0} for i in range(20)
    ]
    path = write_pickapic_parquet(tmp_path / "x.parquet", rows, row_group_size=5)
    table = pq.read_table(path).append_column("extra", pa.array(range(20)))
    pq.write_table(table, path, row_group_size=5)
    calls = []
    real = pq.ParquetFile.read_row_groups

    def spy(self, row_groups, columns=None, **kwargs):
        calls.append((list(row_groups), list(columns)))
        return real(self, row_groups, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", spy)
    fragment = Fragment(str(path), "parquet", 7, 12, "k")
    table = fragment.read()
    assert table.column("caption").to_pylist() == [str(i) for i in range(7, 12)]
    assert calls == [([1, 2], ["caption", "jpg_0", "jpg_1", "label_0", "label_1"])]


def test_max_pairs_truncates_input_rows_deterministically(tmp_path):
    jpg = make_jpeg(0, 8)
    for k in range(3):
        rows = [
            {"caption": f"{k}:{i}", "jpg_0": jpg, "jpg_1": jpg, "label_0": 1.0, "label_1": 0.0}
            for i in range(5)
        ]
        write_pickapic_parquet(tmp_path / f"part-{k}.parquet", rows)
    fragments = resolve_source(tmp_path, rows_per_fragment=2, max_pairs=7)
    captions = [c for f in fragments for c in f.read().column("caption").to_pylist()]
    assert captions == [f"0:{i}" for i in range(5)] + ["1:0", "1:1"]
    assert fragments == resolve_source(tmp_path, rows_per_fragment=2, max_pairs=7)
    assert resolve_source(tmp_path, max_pairs=0) == []


def test_webdataset_gives_same_pairs_as_parquet(tmp_path, corpus):
    rows, _ = corpus
    write_pickapic_parquet(tmp_path / "pq" / SHARD, rows)
    write_webdataset_tar(tmp_path / "wds/train-000000.tar", rows[:10])
    write_webdataset_tar(tmp_path / "wds/train-000001.tar", rows[10:])
    from_pq = run_all(tmp_path / "pq", split="train", tie_policy="keep", rows_per_fragment=6)
    from_tar = run_all(tmp_path / "wds", split="train", tie_policy="keep", rows_per_fragment=4)
    offsets = {"train-000000.tar": 0, "train-000001.tar": 10}

    def comparable(table, tar):
        out = []
        for r in table.to_pylist():
            index = r["row_index"] + (offsets[r["source"].rsplit("/", 1)[1]] if tar else 0)
            r = {k: "NaN" if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()}
            out.append({k: v for k, v in r.items() if k not in ("pair_id", "source")} | {"row_index": index})
        return out

    for a, b in zip(from_pq, from_tar):
        assert comparable(a, False) == comparable(b, True)
    assert from_tar[0].schema == PAIR_SCHEMA


def test_webdataset_reader_accepts_json_and_short_names(tmp_path):
    import io
    import json
    import tarfile

    row = good_row(1, size=16)
    members = {
        "s/a.jpg_0": row["jpg_0"],
        "s/a.jpg_1": row["jpg_1"],
        "s/a.txt": b"from txt\n",
        "s/a.json": json.dumps({"label_0": 0, "label_1": 1, "ranking_id": 5, "unrelated": 1}).encode(),
        "s/a.cls": b"3",
        "s/b.jpg_0": row["jpg_0"],
        "s/b.jpg_1": row["jpg_1"],
        "s/b.caption": b"second",
        "s/b.label_0": b"1",
        "s/b.label_1": b"0",
    }
    path = tmp_path / "x.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (fragment,) = resolve_source(path)
    table = fragment.read()
    assert table.column("caption").to_pylist() == ["from txt", "second"]
    assert table.column("label_0").to_pylist() == [0.0, 1.0]
    assert table.column("ranking_id").to_pylist() == [5, None]
    pairs, _ = validate_and_canonicalize(table, fragment)
    assert pairs.column("swapped").to_pylist() == [True, False]


def test_pair_ids_stable_across_calls_and_moves(tmp_path, corpus):
    rows, _ = corpus
    write_pickapic_parquet(tmp_path / "a" / SHARD, rows)
    first = resolve_source(tmp_path / "a", rows_per_fragment=8)
    assert first == resolve_source(tmp_path / "a", rows_per_fragment=8)
    shutil.copytree(tmp_path / "a", tmp_path / "moved" / "elsewhere")
    moved = resolve_source(tmp_path / "moved/elsewhere", rows_per_fragment=8)
    assert [f.source_key for f in moved] == [f.source_key for f in first]
    ids = [run_all(tmp_path / d)[1].column("pair_id").to_pylist() for d in ("a", "moved/elsewhere")]
    assert ids[0] == ids[1] and len(set(ids[0])) == len(ids[0])


def test_split_filter(tmp_path):
    jpg = make_jpeg(0, 8)
    for name in ("train-00000-of-00001", "validation-00000-of-00001", "validation_unique-00000-of-00001"):
        row = {"caption": name, "jpg_0": jpg, "jpg_1": jpg, "label_0": 1.0, "label_1": 0.0}
        write_pickapic_parquet(tmp_path / "hf/data" / f"{name}.parquet", [row])
    captions = lambda fs: [c for f in fs for c in f.read().column("caption").to_pylist()]  # noqa: E731
    assert captions(resolve_source(tmp_path / "hf", split="validation")) == ["validation-00000-of-00001"]
    assert len(resolve_source(tmp_path / "hf")) == 3
    with pytest.raises(
        SourceNotFoundError, match=r"splits present: \['train', 'validation', 'validation_unique'\]"
    ):
        resolve_source(tmp_path / "hf", split="test")
    # ad-hoc names: no split in any name -> every file is read
    write_pickapic_parquet(tmp_path / "adhoc/pairs.parquet", [row])
    assert len(resolve_source(tmp_path / "adhoc", split="train")) == 1
    # a glob is explicit: no split filter
    assert len(resolve_source(str(tmp_path / "hf/data/*.parquet"), split="train")) == 3


def test_source_errors(tmp_path, monkeypatch):
    missing = tmp_path / "no" / "such.parquet"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        resolve_source(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceNotFoundError, match=r"no \.parquet or \.tar"):
        resolve_source(tmp_path / "empty")
    with pytest.raises(SourceNotFoundError, match="match the glob"):
        resolve_source(str(tmp_path / "empty/*.parquet"))
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        resolve_source(tmp_path / "notes.csv")


def test_hub_id_offline_error(monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    pickapic._load_hub.cache_clear()
    with pytest.raises(SourceNotFoundError, match=r"yuvalkirstain/pickapic_v2.*offline since 2025"):
        resolve_source("yuvalkirstain/pickapic_v2", split="validation_unique")


def test_hub_fragments_read_like_parquet(monkeypatch):
    """The hub path without a network: ``_load_hub`` returns an in-memory ``datasets.Dataset``."""
    datasets = pytest.importorskip("datasets")
    rows = [good_row(i, size=16) for i in range(5)]
    ds = datasets.Dataset.from_list(
        [{k: r[k] for k in ("caption", "jpg_0", "jpg_1", "label_0", "label_1")} for r in rows]
    )
    monkeypatch.setattr(pickapic, "_load_hub", lambda dataset_id, split: ds)
    fragments = resolve_source("someone/mirror", split="validation", rows_per_fragment=2, max_pairs=4)
    assert [(f.kind, f.start, f.stop, f.split) for f in fragments] == [
        ("hub", 0, 2, "validation"),
        ("hub", 2, 4, "validation"),
    ]
    pairs = pa.concat_tables([validate_and_canonicalize(f.read(), f)[0] for f in fragments])
    assert pairs.column("jpg_w").to_pylist() == [rows[i]["jpg_1" if i % 2 else "jpg_0"] for i in range(4)]
    assert pairs.column("source").to_pylist() == ["someone/mirror"] * 4
