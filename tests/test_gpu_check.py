"""The GPU check (``benchmarks/gpu_check.sh``): its dry run end to end on the CPU, and the pieces it
computes its numbers from."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import TABLE_HEADER
from benchmarks.gpu_check import MODEL_DIR, component_configs, plan_estimate, window_pairs_per_s

ROOT = Path(__file__).resolve().parent.parent


def test_pairs_per_s_spans_the_steps_between_two_flushes():
    """Flushes at steps 5 and 15 logged at 1.000 s and 5.000 s: steps 6..15 (10 steps of 2 pairs) took
    4 s, so 20 / 4 = 5 pairs/s."""
    stamps = {5: 1000, 10: 3000, 15: 5000}
    assert window_pairs_per_s(stamps, 5, 15, pairs_per_step=2) == pytest.approx(5.0)


def test_pairs_per_s_refuses_a_window_without_time():
    with pytest.raises(RuntimeError, match=r"steps 6\.\.10"):
        window_pairs_per_s({5: 1000, 10: 1000}, 5, 10, pairs_per_step=1)


def test_dry_run_sizes_keep_the_sd3_conditioning_widths_consistent():
    """As in the real SD3-medium configs (joint 4096 = T5 d_model; pooled 2048 = 768 + 1280), the tiny
    transformer's joint_attention_dim is the tiny T5's d_model (64) and its pooled_projection_dim the two
    tiny CLIP projections (32 + 32 = 64)."""
    for dry_run in (False, True):
        c = component_configs(MODEL_DIR, dry_run)
        assert c["transformer"]["joint_attention_dim"] == c["text_encoder_3"]["d_model"]
        pooled = c["text_encoder"]["projection_dim"] + c["text_encoder_2"]["projection_dim"]
        assert c["transformer"]["pooled_projection_dim"] == pooled


def test_plan_estimate_sums_the_row_of_the_stage_with_checkpointed_activations():
    """ZeRO-2 full fine-tuning without offload: 1 + 2 + 3 + 4 + 5 + 6 = 21 bytes (``activations`` 100,
    without checkpointing, is not part of it; the LoRA and offload rows of stage 2 are not chosen)."""
    parts = {"weights": 1, "grads": 2, "optimizer": 3, "reference": 4, "buffers": 5, "activations_gc": 6}
    row = {"stage": 2, "lora": False, "offload": "none", "activations": 100, **parts}
    other = [{**row, "lora": True, "weights": 50}, {**row, "offload": "optimizer", "optimizer": 0}]
    plan = {"rows": [{**row, "stage": 0}, *other, row]}
    assert plan_estimate(plan, zero_stage=2) == 21


@pytest.mark.slow
def test_dry_run_prints_the_four_gpu_rows_with_measured_numbers(tmp_path):
    """``gpu_check.sh --dry-run``: tiny SD3 from the shipped configs through plan, cache and train; the
    block it appends holds the table with throughput, MFU, memory vs plan and cache rate, all measured."""
    out = tmp_path / "results.md"
    env = {**os.environ, "PYTHON": sys.executable}
    argv = ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--workdir", str(tmp_path / "w")]
    proc = subprocess.run([*argv, "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("\n## GPU check (dry-run)")
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0] == "| " + " | ".join(TABLE_HEADER) + " |"
    rows = [[c.strip() for c in line.strip("|").split(" | ")] for line in table[2:]]
    assert [r[4] for r in rows] == ["pairs/s", "TFLOP/s", "GiB", "rows/s"]
    for cells in rows:
        value = re.search(r": ([\d,.]+)", cells[1])
        assert value and float(value.group(1).replace(",", "")) > 0, cells
