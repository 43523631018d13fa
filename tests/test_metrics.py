"""Per-timestep-bin metrics and the error-based divergence estimates, against hand-derived values."""

from __future__ import annotations

import pytest
import torch

from prefopt_core.metrics import BinAccumulator, divergence_metrics, error_divergence, error_shift

T = 1000


def test_error_divergence_is_mean_absolute_and_shift_is_signed() -> None:
    """e_model = [1, 3, 5], e_base = [2, 2, 2]: differences [-1, 1, 3];
    D = (1 + 1 + 3) / 3 = 5/3 (no cancellation), shift = (-1 + 1 + 3) / 3 = 1."""
    e_model, e_base = torch.tensor([1.0, 3.0, 5.0]), torch.tensor([2.0, 2.0, 2.0])
    assert error_divergence(e_model, e_base).item() == pytest.approx(5 / 3)
    assert error_shift(e_model, e_base).item() == pytest.approx(1.0)
    # A model that fits every sample better: shift < 0 but D > 0 (differences [-1, -1]).
    better = torch.tensor([1.0, 1.0])
    assert error_shift(better, torch.tensor([2.0, 2.0])).item() == pytest.approx(-1.0)
    assert error_divergence(better, torch.tensor([2.0, 2.0])).item() == pytest.approx(1.0)
    assert divergence_metrics("policy_init", e_model, e_base) == pytest.approx(
        {"kl/policy_init": 5 / 3, "kl/policy_init_signed": 1.0}
    )
    assert error_divergence(e_base, e_base).item() == 0.0


def test_error_divergence_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"shape \(N,\)"):
        error_divergence(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match=r"shape \(N,\)"):
        error_shift(torch.zeros(2, 1), torch.zeros(2, 1))


def test_bin_accumulator_hand_example() -> None:
    """T = 1000, 10 bins of 100 timesteps, bin = t // 100 (bin 9 the noisiest).
    t      = [0,   99,  100, 950, 999]  -> bins [0, 0, 1, 9, 9]
    margin = [1.0, -2.0, 0.0, 3.0, 0.5]
    loss   = [0.3, 2.1, 0.7, 0.05, 0.45]
    bin 0: acc = 1/2 (1.0 > 0, -2.0 not), margin = (1 - 2)/2 = -0.5, |margin| = (1 + 2)/2 = 1.5,
           loss = (0.3 + 2.1)/2 = 1.2
    bin 1: acc = 0 (a zero margin is a tie, counted wrong as implicit_acc does), margin = |margin| = 0,
           loss = 0.7
    bin 9: acc = 2/2, margin = |margin| = (3 + 0.5)/2 = 1.75, loss = (0.05 + 0.45)/2 = 0.25;
    bins 2..8 are empty and not reported."""
    acc = BinAccumulator(T)
    acc.update(
        torch.tensor([0, 99, 100, 950, 999]),
        torch.tensor([1.0, -2.0, 0.0, 3.0, 0.5]),
        torch.tensor([0.3, 2.1, 0.7, 0.05, 0.45]),
    )
    assert acc.compute() == pytest.approx(
        {
            "bins/acc_0": 0.5,
            "bins/margin_0": -0.5,
            "bins/abs_margin_0": 1.5,
            "bins/loss_0": 1.2,
            "bins/acc_1": 0.0,
            "bins/margin_1": 0.0,
            "bins/abs_margin_1": 0.0,
            "bins/loss_1": 0.7,
            "bins/acc_9": 1.0,
            "bins/margin_9": 1.75,
            "bins/abs_margin_9": 1.75,
            "bins/loss_9": 0.25,
        }
    )
    assert acc.count == 5
    # A second update accumulates: t = 150 (bin 1), margin -2, loss 1.3 -> bin 1: acc 0/2, margin (0 - 2)/2
    # = -1, |margin| (0 + 2)/2 = 1, loss (0.7 + 1.3)/2 = 1.
    acc.update(torch.tensor([150]), torch.tensor([-2.0]), torch.tensor([1.3]))
    out = acc.compute()
    assert [out[f"bins/{m}_1"] for m in ("acc", "margin", "abs_margin", "loss")] == pytest.approx(
        [0, -1, 1, 1]
    )
    acc.reset()
    assert acc.compute() == {} and acc.count == 0


def test_bin_accumulator_takes_a_loss_with_grad() -> None:
    """The recipe passes LossOutput.losses, which carries gradients: it is detached, not kept in a graph."""
    loss = torch.tensor([0.5, 1.5], requires_grad=True) * 1.0
    acc = BinAccumulator(T)
    acc.update(torch.tensor([10, 20]), torch.tensor([1.0, -1.0]), loss)
    assert acc.compute()["bins/loss_0"] == pytest.approx(1.0)
    assert not acc.to_tensor().requires_grad


def test_bin_accumulator_merge_equals_union() -> None:
    """Two workers' accumulators merged (in place, or via the summed to_tensor of an all_reduce) report
    exactly what one accumulator over the union of their pairs reports."""
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, T, (64,), generator=g)
    margin = torch.randn(64, generator=g)
    loss = torch.rand(64, generator=g)
    union = BinAccumulator(T)
    union.update(t, margin, loss)
    a, b = BinAccumulator(T), BinAccumulator(T)
    a.update(t[:20], margin[:20], loss[:20])
    b.update(t[20:50], margin[20:50], loss[20:50])
    b.update(t[50:], margin[50:], loss[50:])
    reduced = BinAccumulator.from_tensor(a.to_tensor() + b.to_tensor(), T)  # what all_reduce(SUM) yields
    assert reduced.compute() == pytest.approx(union.compute())
    assert a.merge_(b).compute() == pytest.approx(union.compute())
    assert len(union.compute()) > 0


def test_bin_accumulator_rejects_bad_input() -> None:
    acc = BinAccumulator(T)
    one = torch.tensor([1.0])
    with pytest.raises(ValueError, match="integer timesteps"):
        acc.update(torch.tensor([0.5]), one, one)
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        acc.update(torch.tensor([1000]), one, one)
    with pytest.raises(ValueError, match=r"shape \(N,\)"):
        acc.update(torch.tensor([1, 2]), one, torch.ones(2))
    with pytest.raises(ValueError, match=r"t and loss must both have shape \(N,\)"):
        acc.update(torch.tensor([1, 2]), torch.ones(2), one)
    with pytest.raises(ValueError, match="num_bins"):
        BinAccumulator(5, num_bins=10)
    with pytest.raises(ValueError, match="different shapes"):
        acc.merge_(BinAccumulator(T, num_bins=5))
    with pytest.raises(ValueError, match=r"\(5, num_bins\)"):
        BinAccumulator.from_tensor(torch.zeros(3, 10), T)
