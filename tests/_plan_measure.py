"""Measured side of the planner check, run as
``python -m tests._plan_measure PIPELINE_DIR ROWS STEPS RESOLUTION TEXT_TOKENS`` in a
fresh process: plain PyTorch training steps (fp32, AdamW, no reference) of the pipeline's denoiser built
from its config with random weights; prints JSON with the peak resident memory the steps add (MiB).

The high-water mark is reset (``/proc/self/clear_refs``) after imports and a first kernel call, so the
number holds weights, gradients, optimizer state, activations and temporaries, not the libraries."""

from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path

import torch


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def main(pipeline_dir: str, rows: int, steps: int, resolution: int, tokens: int) -> None:
    import diffusers

    from ray_jobs.memory_plan import denoiser_inputs, vae_factor
    from ray_jobs.training.deepspeed_config import denoiser_config

    torch.manual_seed(0)
    root = Path(pipeline_dir)
    config = denoiser_config(root)
    cls = getattr(diffusers, config["_class_name"])
    latent = resolution // vae_factor(root)
    torch.mm(torch.ones(64, 64), torch.ones(64, 64))
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_mib("VmRSS")
    model = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")}).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    shapes = denoiser_inputs(config, rows, latent, tokens, torch.float32)
    inputs = {k: torch.randn(v.shape) if isinstance(v, torch.Tensor) else v for k, v in shapes.items()}
    for _ in range(steps):
        out = model(**inputs)[0]
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    print(json.dumps({"delta_mib": _status_mib("VmHWM") - base}))


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:6]))
