"""``share_fp32_master``: under fp32 ZeRO-2/3 DeepSpeed's fp32 master partition becomes the weights' own
partition instead of a copy (4 bytes per partitioned parameter less), and training is unchanged.

One rank (gloo) in this process, a 3-layer MLP, two engines from the same initial weights and the same
batches, one shared and one not: same process, same kernels, so their weights after 3 AdamW steps are
compared exactly.
"""

from __future__ import annotations

import pytest
import torch

from ray_jobs.training.deepspeed_config import patch_deepspeed_for_cpu, share_fp32_master


def _engine(stage: int, share: bool):
    import deepspeed

    patch_deepspeed_for_cpu()
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 1),
    )
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    shared = share_fp32_master(engine) if share else 0
    return engine, shared


def _train(engine, steps: int = 3) -> dict[str, torch.Tensor]:
    """3 steps of MSE on fixed random batches; returns the full (gathered) weights."""
    import deepspeed

    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(4, 16, generator=g), torch.randn(4, 1, generator=g)
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


@pytest.mark.parametrize("stage", [2, 3])
def test_shared_master_trains_exactly_like_the_copied_one(stage, process_group):
    """After 3 steps the weights of the shared-master engine equal those of DeepSpeed's own, bit for bit,
    and every parameter moved (the comparison is not of two untrained models)."""
    copied, _ = _engine(stage, share=False)
    start = _train(copied, steps=0)
    after_copied = _train(copied)
    shared, n = _engine(stage, share=True)
    after_shared = _train(shared)
    assert n > 0
    for name, value in after_copied.items():
        assert torch.equal(after_shared[name], value), name
        assert not torch.equal(value, start[name]), name


def test_zero2_master_is_the_weight_partition_itself(process_group):
    """ZeRO-2: every fp32 master partition shares storage with the rank's weight partition, and the count
    returned is its size: the model's 16*32+32 + 32*32+32 + 32+1 = 1633 parameters (one rank: the whole
    model) in a flat buffer that DeepSpeed pads to an even number of elements, 1634."""
    engine, n = _engine(2, share=True)
    opt = engine.optimizer
    for master, weights in zip(
        opt.single_partition_of_fp32_groups,
        (g[0] for g in opt.parallel_partitioned_bit16_groups),
        strict=True,
    ):
        assert master.data_ptr() == weights.data_ptr()
    assert n == 1634


def test_bf16_weights_share_nothing(process_group):
    """A master that is not the weights' dtype (bf16 weights, fp32 master) cannot be shared: 0 elements."""
    import deepspeed

    patch_deepspeed_for_cpu()
    model = torch.nn.Linear(16, 8)
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
    }
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), config=config
    )
    assert share_fp32_master(engine) == 0
