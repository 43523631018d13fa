"""``prefopt plan``: the memory estimate against a measured training process, the arithmetic of the
per-worker rows, and the command on each shipped real model config (offline, meta device)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from prefopt_core.config import load_config
from ray_jobs.cli import main
from ray_jobs.memory_plan import DenoiserProfile, plan_row, profile_denoiser

ROOT = Path(__file__).resolve().parents[1]


def _tiny_pipeline(d: Path, hidden: int = 512, layers: int = 2) -> Path:
    """A pipeline directory holding only the configs the planner reads: an SD3 MMDiT (hidden 512, 2 joint
    blocks, patch 1, ~17 M parameters) and a 4-level VAE (x8)."""
    (d / "transformer").mkdir(parents=True)
    (d / "vae").mkdir()
    (d / "model_index.json").write_text(
        json.dumps(
            {"transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
        )
    )
    transformer = {
        "_class_name": "SD3Transformer2DModel",
        "sample_size": 16,
        "patch_size": 1,
        "in_channels": 16,
        "num_layers": layers,
        "attention_head_dim": 64,
        "num_attention_heads": hidden // 64,
        "joint_attention_dim": 128,
        "caption_projection_dim": hidden,
        "pooled_projection_dim": 128,
        "out_channels": 16,
        "pos_embed_max_size": 32,
    }
    (d / "transformer/config.json").write_text(json.dumps(transformer))
    (d / "vae/config.json").write_text(json.dumps({"block_out_channels": [32, 64, 64, 64]}))
    return d


def _cfg(pipeline: Path):
    return load_config(
        None,
        [
            f"model.pretrained={pipeline}",
            "loss.name=sft",
            "reference.strategy=none",
            "train.batch_size=1",
            "model.resolution=128",
            "model.max_sequence_length=32",
        ],
    )


def test_estimate_within_25_percent_of_measured_peak(tmp_path):
    """Plain data parallel (ZeRO 0), fp32 AdamW, no reference, 1 pair (2 rows) at 128 px: the planner's
    weights + gradients + optimizer state + activations vs the peak resident memory that 3 training steps
    add in a fresh process (weights, gradients, AdamW moments, activations, temporaries)."""
    pipeline = _tiny_pipeline(tmp_path / "m")
    cfg = _cfg(pipeline)
    row = plan_row(cfg, profile_denoiser(cfg), stage=0, lora=False, offload="none", world=1, gpu_gib=80)
    estimate_mib = (row.static + row.activations) / 2**20
    tokens = 77 + 32
    out = subprocess.run(
        [sys.executable, "-m", "tests._plan_measure", str(pipeline), "2", "3", "128", str(tokens)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    measured_mib = json.loads(out.stdout.strip().splitlines()[-1])["delta_mib"]
    assert 0.75 <= estimate_mib / measured_mib <= 1.25, (estimate_mib, measured_mib)


def _profile() -> DenoiserProfile:
    return DenoiserProfile(
        params=1000,
        lora_params=10,
        hidden=10,
        fwd_flops_per_row=1.0,
        bwd_flops_per_row=2.0,
        act_bytes_per_row=100.0,
        act_gc_bytes_per_row=10.0,
    )


def test_zero_stages_partition_what_they_shard(tmp_path):
    """P = 1000 fp32 parameters, 4 workers, frozen reference in fp32: ZeRO-2 keeps weights 4000 B and the
    reference 4000 B whole, splits gradients 4000/4 = 1000 B and AdamW moments 8000/4 = 2000 B; ZeRO-3
    also splits the weights and the reference: 1000 B each."""
    cfg = load_config(None, [f"model.pretrained={tmp_path}"])
    z2 = plan_row(cfg, _profile(), stage=2, lora=False, offload="none", world=4, gpu_gib=80)
    assert (z2.weights, z2.grads, z2.optimizer, z2.reference) == (4000, 1000, 2000, 4000)
    z3 = plan_row(cfg, _profile(), stage=3, lora=False, offload="none", world=4, gpu_gib=80)
    assert (z3.weights, z3.grads, z3.optimizer, z3.reference) == (1000, 1000, 2000, 1000)


def test_lora_trains_only_the_adapters(tmp_path):
    """LoRA, 10 trainable of 1000 fp32 parameters, 1 worker: gradients 40 B, moments 80 B, no reference copy."""
    cfg = load_config(None, [f"model.pretrained={tmp_path}"])
    r = plan_row(cfg, _profile(), stage=0, lora=True, offload="none", world=1, gpu_gib=80)
    assert (r.weights, r.grads, r.optimizer, r.reference) == (4000, 40, 80, 0)


@pytest.mark.parametrize("model", ["sd3-medium", "sdxl-base", "sd15"])
def test_plan_runs_offline_on_each_shipped_config(model, capsys):
    """The shipped configs hold the published architectures: SD3-medium ~2.03 B, SDXL's UNet ~2.57 B,
    SD1.5's UNet ~0.86 B parameters (model cards: 2 B, 2.6 B, 860 M)."""
    family = {"sd3-medium": "sd3", "sdxl-base": "sdxl", "sd15": "sd15"}[model]
    rc = main(
        [
            "plan",
            str(ROOT / "configs/demo.yaml"),
            f"model.pretrained={ROOT / 'configs/models' / model}",
            f"model.family={family}",
            "model.resolution=256",
            "train.batch_size=1",
            "--gpu",
            "H100",
        ]
    )
    assert rc == 0
    first = capsys.readouterr().out.splitlines()[0]
    billions = float(first.split("denoiser: ")[1].split(" B")[0])
    assert billions == pytest.approx({"sd3-medium": 2.03, "sdxl-base": 2.57, "sd15": 0.86}[model], abs=0.02)


def test_unknown_gpu_fails_in_one_sentence(capsys):
    assert main(["plan", str(ROOT / "configs/demo.yaml"), "--gpu", "Z80"]) == 2
    assert "valid: H200, H100" in capsys.readouterr().err
