"""The benchmark helpers (``benchmarks.common``) and tiny runs of ``benchmarks.run``: table format and
plumbing only -- no timing is asserted (the numbers of the ``smoke`` size mean nothing)."""

from __future__ import annotations

import math
import os
import re
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from benchmarks.common import (
    TABLE_HEADER,
    Row,
    count_flops,
    fmt,
    interleaved,
    markdown_table,
    matmul_peak_flops,
    median,
    memory_baseline,
    memory_report,
    paired_ratio,
    run_isolated,
    wait_until_quiet,
)
from benchmarks.run import (
    SIZES,
    Context,
    bench_gpu,
    main,
    steady_rows_per_s,
    transformer_dpo_case,
)


def test_interleaved_rotates_the_arm_order_per_repeat():
    assert interleaved(["A", "B"], 3) == [(0, "A"), (0, "B"), (1, "B"), (1, "A"), (2, "A"), (2, "B")]
    order = [arm for _, arm in interleaved(["a", "b", "c"], 3)]
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    with pytest.raises(ValueError):
        interleaved([], 2)


def test_paired_ratio_is_the_median_of_per_repeat_ratios():
    # per-repeat ratios 2, 2, 3 -> 2 (the ratio of medians would be 4 / 2 = 2 as well, but not in general)
    assert paired_ratio([2.0, 4.0, 9.0], [1.0, 2.0, 3.0]) == 2.0
    assert paired_ratio([1.0, 10.0], [1.0, 4.0]) == pytest.approx((1.0 + 2.5) / 2)
    with pytest.raises(ValueError):
        paired_ratio([1.0], [1.0, 2.0])


def test_fmt_keeps_significant_digits():
    assert fmt(1234.4) == "1,234"
    assert fmt(12.345) == "12.3"
    assert fmt(0.012345) == "0.0123"
    assert fmt(0.0) == "0"
    assert fmt(None) == "—"


def test_markdown_table_bolds_the_better_arm_and_shows_status():
    rows = [
        Row("speed", "A", "B", 2.0, 1.0, "pairs/s"),
        Row("memory", "A", "B", 200.0, 100.0, "MiB", higher_is_better=False),
        Row("mfu", "achieved", "peak", 10.0, 40.0, "GFLOP/s", ratio=0.25, bold=False),
        Row("gpu", "pairs/s", "—", None, None, "pairs/s", status="skipped (no GPU)"),
    ]
    lines = markdown_table(rows).splitlines()
    assert lines[0] == "| " + " | ".join(TABLE_HEADER) + " |"
    assert lines[1] == "| --- | --- | --- | --- | --- | --- |"
    assert "A: **2.00**" in lines[2] and "B: 1.00" in lines[2] and "| 2.000 |" in lines[2]
    assert "A: 200" in lines[3] and "B: **100**" in lines[3]  # lower is better: B wins
    assert "**" not in lines[4] and "| 0.250 |" in lines[4]
    assert "skipped (no GPU)" in lines[5]
    assert all(line.count(" | ") == len(TABLE_HEADER) - 1 for line in lines)


def test_count_flops_is_exact_for_matmuls_and_cpu_attention():
    linear = torch.nn.Linear(16, 32, bias=False)
    x = torch.randn(4, 16)
    assert count_flops(lambda: linear(x)) == 2 * 4 * 16 * 32
    # scaled_dot_product_attention dispatches to the CPU flash kernel, which torch's counter lacks
    q = torch.randn(1, 2, 8, 4, requires_grad=True)
    forward = 4 * 1 * 2 * 8 * 8 * 4  # QK^T and PV, 2 FLOPs per multiply-add
    assert count_flops(lambda: F.scaled_dot_product_attention(q, q, q)) == forward
    assert count_flops(lambda: F.scaled_dot_product_attention(q, q, q).sum().backward()) == 3.5 * forward


def test_memory_report_and_matmul_peak():
    report = memory_report(memory_baseline())
    assert report["peak_mib"] > 0 and report["delta_mib"] >= 0
    assert matmul_peak_flops(n=64, repeats=1, min_seconds=0.01) > 0


def test_run_isolated_returns_the_result_and_raises_the_error():
    assert run_isolated(median, [3.0, 1.0, 2.0]) == 2.0
    with pytest.raises(ValueError, match="median of no values"):
        run_isolated(median, [])


def test_steady_rate_comes_from_the_shard_write_times(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    t0 = time.time() - 100
    for i in range(4):  # 8 rows each, written 1 s apart
        path = shards / f"f{i:06d}-r{8 * i:09d}.parquet"
        pq.write_table(pa.table({"pair_id": [f"p{8 * i + j}" for j in range(8)]}), path)
        os.utime(path, (t0 + i, t0 + i))
    assert steady_rows_per_s(tmp_path, parallel=1) == (pytest.approx(24 / 3), 32)  # start-up shard excluded
    assert steady_rows_per_s(tmp_path, parallel=2) == (pytest.approx(16 / 2), 32)
    with pytest.raises(RuntimeError, match="too few"):
        steady_rows_per_s(tmp_path, parallel=4)


def test_gpu_case_runs_on_cpu_with_a_tiny_transformer(tiny_sd3):
    """The SD3-medium GPU path with a tiny config on CPU: same code, other sizes and device."""
    config = {
        "sample_size": 8,
        "patch_size": 2,
        "in_channels": 4,
        "num_layers": 1,
        "attention_head_dim": 8,
        "num_attention_heads": 2,
        "joint_attention_dim": 16,
        "caption_projection_dim": 16,
        "pooled_projection_dim": 8,
        "out_channels": 4,
        "pos_embed_max_size": 16,
    }
    job = {
        "config": config,
        "device": "cpu",
        "dtype": "float32",
        "batch_pairs": 2,
        "text_tokens": 6,
        "warmup": 1,
        "steps": 2,
        "threads": 1,
        "scheduler_dir": str(tiny_sd3),
        "peak_n": 128,
    }
    result = transformer_dpo_case(job)
    assert len(result["step_s"]) == 2
    assert result["flops_per_step"] > 0 and result["pairs_per_s"] > 0 and result["mfu"] > 0
    assert result["params"] > 0 and result["device_name"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only table rows")
def test_gpu_rows_say_skipped_without_a_gpu(tmp_path):
    rows = bench_gpu(Context(SIZES["smoke"], tmp_path, threads=1))
    assert [r.status for r in rows] == ["skipped (no GPU)"] * 2
    assert "skipped (no GPU)" in markdown_table(rows)


@pytest.fixture(scope="module")
def smoke_workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


@pytest.mark.slow
def test_smoke_run_prints_and_writes_the_table(smoke_workdir, ray_cluster, capsys):
    out = smoke_workdir / "results.md"
    argv = ["--size", "smoke", "--only", "single_process", "--threads", "1"]
    argv += ["--workdir", str(smoke_workdir / "work"), "--out", str(out)]
    assert main(argv) == 0
    text = out.read_text()
    assert text in capsys.readouterr().out
    assert "python -m benchmarks.run --size smoke --only single_process" in text
    assert "M transformer parameters" in text and "GFLOP" in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0] == "| " + " | ".join(TABLE_HEADER) + " |"
    rows = table[2:]
    assert len(rows) == 5  # cache vs on the fly; precomputed (pairs/s, memory); MaPO vs DPO (time, memory)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert len(cells) == len(TABLE_HEADER)
        assert float(cells[3]) > 0  # ratio
        assert re.search(r"\d", cells[1]) and re.search(r"\d", cells[2])


def test_wait_until_quiet_returns_when_the_children_are_idle():
    assert wait_until_quiet(below_cores=1000.0, window=0.05, timeout=5.0) < 5.0


def test_online_reward_noise_is_the_larger_of_repeat_spread_and_sampling_error():
    """Streaming 0.20, 0.24 (sd 0.02828), rounds 0.25, 0.25 (sd 0): pooled sqrt((0.02828² + 0) / 2) = 0.02;
    with sampling error 0.01 the noise is 0.02, with 0.05 it is 0.05. One repeat each: sd 0, the sampling
    error alone."""
    from benchmarks.online_stream import reward_noise

    assert reward_noise([0.20, 0.24], [0.25, 0.25], 0.01) == pytest.approx(0.02)
    assert reward_noise([0.20, 0.24], [0.25, 0.25], 0.05) == pytest.approx(0.05)
    assert reward_noise([0.20], [0.30], 0.03) == pytest.approx(0.03)


def test_online_reward_verdict_by_hand():
    """Means 0.22 vs 0.25: difference -0.03; noise 0.05 -> within (not lower beyond noise); noise 0.02 ->
    lower beyond noise."""
    from benchmarks.online_stream import reward_verdict

    assert reward_verdict([0.20, 0.24], [0.25, 0.25], 0.05) == "not lower beyond noise"
    assert reward_verdict([0.20, 0.24], [0.25, 0.25], 0.02) == "lower beyond noise"


def test_online_sampling_error_by_hand():
    """Streaming exports with std 0.4 and 0.6 over 100 samples: se 0.04 and 0.06, mean 0.05; rounds std 0.5
    over 25: se 0.1. The difference's error: sqrt(0.05² + 0.1²) = 0.1118."""
    from benchmarks.online_stream import sampling_error

    scores = {"streaming-r0": (0.5, 0.4, 100), "streaming-r1": (0.5, 0.6, 100), "rounds-r0": (0.5, 0.5, 25)}
    assert sampling_error(scores, ["streaming", "rounds"]) == pytest.approx(math.sqrt(0.05**2 + 0.1**2))
