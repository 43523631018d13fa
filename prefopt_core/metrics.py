"""Training metrics that :mod:`prefopt_core.losses` does not already return: per-timestep-bin accuracy and
margin, and the error-based divergence estimates of the reference strategies.

Batch-level ``implicit_acc`` and ``reward_margin`` come from the losses themselves (``LossOutput.metrics``);
nothing here recomputes them. What the losses cannot give is *where in the noise schedule* the policy
has learned the preference: :class:`BinAccumulator` collects the per-pair reward margin (the DPO
``inside`` term, or ``r_w - r_l`` for KTO) and loss together with the pair's timestep over many steps, and
reports ``bins/acc_k``, ``bins/margin_k``, ``bins/abs_margin_k`` (the implicit-reward scale) and ``bins/loss_k``
for 10 timestep bins (bin 0 the least noisy, bin 9 the noisiest, see
:func:`prefopt_core.timesteps.timestep_bin`). Its sums and counts form one tensor, so workers merge by an
``all_reduce`` of :meth:`BinAccumulator.to_tensor`.

Divergence estimates (:func:`error_divergence`, :func:`error_shift`) compare two models through their
per-sample denoising errors on the same inputs (noise and timestep included). Diffusion-DPO (Wallace et al.
2023, derivation of Eq. 14) bounds the log-likelihood ratio of a sample under two models by their error difference::

    log p_a(x) - log p_b(x)  ~  -T * w(lambda_t) * (e_a(x) - e_b(x))

so ``mean(e_a - e_b)`` over samples is a KL-type surrogate up to a positive weight (and a sign: a model that
fits the samples *better* has a *negative* shift). See :mod:`prefopt_core.reference` for how the reference
strategies use it.

Usage::

    bins = BinAccumulator(num_train_timesteps=1000)
    bins.update(step_out.t, loss_out.per_sample["reward_margin"], loss_out.losses)   # every micro-batch, (B,)
    vec = bins.to_tensor(); dist.all_reduce(vec); merged = BinAccumulator.from_tensor(vec, 1000)
    log(merged.compute()); bins.reset()
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from prefopt_core.timesteps import METRIC_BINS, timestep_bin

logger = logging.getLogger(__name__)

#: Rows of :meth:`BinAccumulator.to_tensor`: pair count, correct count, sums of margins, of |margins| and of
#: losses, per bin.
_COUNT, _CORRECT, _MARGIN, _ABS_MARGIN, _LOSS = range(5)
_ROWS = 5

#: The per-bin metrics :meth:`BinAccumulator.compute` reports, as ``bins/<name>_<k>``.
BIN_METRICS: tuple[str, ...] = ("acc", "margin", "abs_margin", "loss")


def _check_pair(a: Tensor, b: Tensor, names: tuple[str, str]) -> None:
    """Raise ``ValueError`` unless ``a`` and ``b`` are both ``(N,)`` with the same ``N >= 1``."""
    if a.ndim != 1 or b.ndim != 1 or a.shape != b.shape or a.numel() == 0:
        raise ValueError(
            f"{names[0]} and {names[1]} must both have shape (N,) with N >= 1, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def error_divergence(err_model: Tensor, err_base: Tensor) -> Tensor:
    """``D = mean_p |e_model[p] - e_base[p]|``: ``(P,)`` x2 -> scalar float64, ``>= 0``.

    The divergence the periodic reference strategy compares with ``delta``. The absolute value is taken
    per probe sample, before the mean, so that ``D = 0`` iff the two models have identical errors on
    every probe sample and ``D > 0`` as soon as one differs — whichever direction the model moved.
    Hand example: ``e_model = [1, 3]``, ``e_base = [2, 2]`` -> ``(|1-2| + |3-2|) / 2 = 1`` (whereas the
    signed shift is ``0``).
    """
    _check_pair(err_model, err_base, ("err_model", "err_base"))
    return (err_model.double() - err_base.double()).abs().mean()


def error_shift(err_model: Tensor, err_base: Tensor) -> Tensor:
    """Signed ``mean_p (e_model[p] - e_base[p])``: ``(P,)`` x2 -> scalar float64.

    The Diffusion-DPO surrogate of ``E[log p_base - log p_model]`` on the probe (up to a positive
    weight): negative when the model fits the probe samples better than the base model.
    """
    _check_pair(err_model, err_base, ("err_model", "err_base"))
    return (err_model.double() - err_base.double()).mean()


def divergence_metrics(name: str, err_model: Tensor, err_base: Tensor) -> dict[str, float]:
    """``{"kl/<name>": error_divergence, "kl/<name>_signed": error_shift}`` as Python floats."""
    return {
        f"kl/{name}": float(error_divergence(err_model, err_base)),
        f"kl/{name}_signed": float(error_shift(err_model, err_base)),
    }


class BinAccumulator:
    """Per-timestep-bin implicit accuracy, reward margin, reward scale and loss, accumulated over steps and
    workers: the three panels of Rethinking DPO's Fig. 2 (loss scale, implicit-reward scale, implicit accuracy
    per timestep bin).

    State: one ``(5, num_bins)`` float64 tensor of per-bin pair counts, correct counts and sums of margins,
    of ``|margin|`` and of per-pair losses. A pair is *correct* when its margin is ``> 0`` (a tie counts as
    wrong, as ``implicit_acc`` does in :mod:`prefopt_core.losses`). :meth:`compute` reports, for every
    non-empty bin ``k``, ``bins/acc_k = correct_k / count_k``, ``bins/margin_k = margin_sum_k / count_k``,
    ``bins/abs_margin_k = abs_margin_sum_k / count_k`` and ``bins/loss_k = loss_sum_k / count_k``.
    """

    def __init__(self, num_train_timesteps: int, num_bins: int = METRIC_BINS) -> None:
        if not 1 <= num_bins <= num_train_timesteps:
            raise ValueError(
                f"num_bins must be in [1, num_train_timesteps={num_train_timesteps}], got {num_bins}"
            )
        self.num_train_timesteps = int(num_train_timesteps)
        self.num_bins = int(num_bins)
        self._state = torch.zeros(_ROWS, self.num_bins, dtype=torch.float64)

    def update(self, t: Tensor, margin: Tensor, loss: Tensor) -> None:
        """Add B pairs: integer timesteps ``t (B,)`` in ``[0, T)``, reward margins ``margin (B,)`` and
        per-pair losses ``loss (B,)`` (``LossOutput.losses``; detached here).

        The sums live on the device of the tensors given (moved there on the first update), so a training
        step never waits for the host here. The timestep range is checked on CPU tensors, where it costs no
        sync; on an accelerator an out-of-range timestep fails in ``index_add_`` instead.
        """
        _check_pair(t, margin, ("t", "margin"))
        _check_pair(t, loss, ("t", "loss"))
        if t.dtype.is_floating_point:
            raise ValueError(f"t must hold integer timesteps, got dtype {t.dtype}")
        if t.device.type == "cpu" and (int(t.min()) < 0 or int(t.max()) >= self.num_train_timesteps):
            raise ValueError(
                f"timesteps must lie in [0, {self.num_train_timesteps}), got [{int(t.min())}, {int(t.max())}]"
            )
        if self._state.device != margin.device:
            self._state = self._state.to(margin.device)
        k = timestep_bin(t.detach().to(margin.device), self.num_train_timesteps, self.num_bins)  # (B,) int64
        m = margin.detach().double()  # (B,)
        self._state[_COUNT].index_add_(0, k, torch.ones_like(m))
        self._state[_CORRECT].index_add_(0, k, (m > 0).double())
        self._state[_MARGIN].index_add_(0, k, m)
        self._state[_ABS_MARGIN].index_add_(0, k, m.abs())
        self._state[_LOSS].index_add_(0, k, loss.detach().to(m.device).double())

    def compute(self) -> dict[str, float]:
        """``{"bins/acc_k", "bins/margin_k", "bins/abs_margin_k", "bins/loss_k"}`` for the bins that saw at
        least one pair."""
        out: dict[str, float] = {}
        state = self._state.cpu()  # one host copy
        count = state[_COUNT]
        rows = dict(zip(BIN_METRICS, (_CORRECT, _MARGIN, _ABS_MARGIN, _LOSS), strict=True))
        for k in range(self.num_bins):
            n = float(count[k])
            if n == 0:
                continue
            for name, row in rows.items():
                out[f"bins/{name}_{k}"] = float(state[row, k]) / n
        return out

    def reset(self) -> None:
        self._state.zero_()

    @property
    def count(self) -> int:
        """Pairs accumulated since the last reset, over all bins."""
        return int(self._state[_COUNT].sum())

    def to_tensor(self) -> Tensor:
        """A copy of the ``(5, num_bins)`` float64 sums, on the device of the updates: ``dist.all_reduce`` it
        (SUM) to merge workers."""
        return self._state.clone()

    @classmethod
    def from_tensor(cls, state: Tensor, num_train_timesteps: int) -> BinAccumulator:
        """The accumulator whose sums are ``state`` (e.g. the all-reduced :meth:`to_tensor` of all workers)."""
        if state.ndim != 2 or state.shape[0] != _ROWS:
            raise ValueError(f"state must have shape ({_ROWS}, num_bins), got {tuple(state.shape)}")
        acc = cls(num_train_timesteps, num_bins=state.shape[1])
        acc._state = state.detach().to("cpu", torch.float64).clone()
        return acc

    def merge_(self, other: BinAccumulator) -> BinAccumulator:
        """Add ``other``'s sums into this accumulator (in place) and return it."""
        if (other.num_train_timesteps, other.num_bins) != (self.num_train_timesteps, self.num_bins):
            raise ValueError(
                "cannot merge accumulators of different shapes: "
                f"(T={self.num_train_timesteps}, bins={self.num_bins}) vs "
                f"(T={other.num_train_timesteps}, bins={other.num_bins})"
            )
        self._state += other._state
        return self
