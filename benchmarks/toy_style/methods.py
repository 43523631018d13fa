"""The testbed's methods, its two preference settings and the hyperparameters every run uses.

Settings (how the preference pairs are made; both through ``prefopt regenerate``):

- **A, Pick-Style** (MaPO's reference-mismatch setting): chosen = the base's sample of the prompt with the style
  phrase, rejected = its sample of the plain prompt, same seed (``custom`` preset, ``pipelines.toy_prompts``);
- **B, Pick-a-Pic-like** (Diffusion-DPO's and Rethinking-DPO's setting): two samples of the base for the same
  plain prompt from two seeds, labelled by the outline scorer, one label in ten flipped, near-equal pairs ties
  (``pick-a-pic-like`` preset; the cache drops the ties).

Every method trains with the same budget (``Budget``: optimizer steps x pairs per step); its learning rate
and β come from the committed sweep (``SWEEP_FILE``, written by ``python -m benchmarks.toy_style.sweep``) and
fall back to ``DEFAULT_HPARAMS`` for a method the sweep has not covered (the report says which).

The sweep tunes one row per loss and setting (SFT, DPO, MaPO in A and B). The other setting-B DPO rows -- TA
only, periodic reference with δ = ∞ and with δ, Rethinking DPO and its λ(t) variants -- use ``B_dpo``'s choice
(``Method.hparams_of``), so each differs from Diffusion-DPO in the component under test only. The λ(t) variants
(``LAMBDA_VARIANTS``: the flow-matching forms of ``prefopt_core.timestep_weights`` beside the paper's
``inv_sqrt_snr``) add one Rethinking-DPO row each to setting B. The ``calibrated`` variant reads the per-bin |reward margin| of the seed-0
``CALIBRATION_METHOD`` run (periodic reference + δ, uniform λ: the strategy the paper measures its imbalance
under), written by the testbed as ``prefopt timesteps --calibrate`` does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

HERE = Path(__file__).resolve().parent
#: The sweep's result: ``{"<setting>/<method>": {"lr": ..., "beta": ...}, ...}`` plus the sweep's table.
SWEEP_FILE = HERE / "sweep.json"

Setting = Literal["A", "B"]
SETTING_LABELS: dict[str, str] = {
    "A": "Pick-Style (reference mismatch)",
    "B": "Pick-a-Pic-like (noisy, in-distribution)",
}


def _ta(weight: str = "inv_sqrt_snr") -> tuple[str, ...]:
    """Timestep-aware training: γ-sampling over 10 bins and the reward scale λ(t) = ``weight``."""
    return ("timesteps.sampling=gamma", "timesteps.bins=10", f"loss.timestep_weight={weight}")


#: λ(t) variants beside ``inv_sqrt_snr``: (method-name suffix, ``loss.timestep_weight`` value, table label).
LAMBDA_VARIANTS: tuple[tuple[str, str, str], ...] = (
    ("ddpm", "inv_sqrt_snr_ddpm_range", "1/√SNR within the DDPM range"),
    ("logsnr", "log_snr", "min-max log-SNR"),
    ("cal", "calibrated", "calibrated per bin"),
)
#: The swept method whose lr and β every other setting-B DPO row uses: the rows of claims (a)-(c) and the λ
#: variants then differ in the component under test only.
SWEPT_DPO = "B_dpo"
#: The run whose per-bin |margin| calibrates ``calibrated`` (its seed-0 run; trained before the variants).
CALIBRATION_METHOD = "B_dpo_ref_delta"
#: Optimizer steps between two reference checks of the periodic strategy (4 checks in the 120-step budget).
TAU = 25
_PERIODIC = ("reference.strategy=periodic", f"reference.tau={TAU}")
#: The divergence limit δ of the bounded periodic reference (``kl/policy_init`` units; see
#: ``prefopt_core.reference``): the divergence Diffusion-DPO with a frozen reference reaches at this budget
#: (the ``B_dpo`` row's KL, 0.010), so the periodic reference may move as far as plain DPO moves the policy.
#: Unbounded updates reach D = 0.015-0.03 at the last checks, so δ engages in every seed; the report says at
#: which check (``report.delta_engagement_lines``). A δ above the reached D (0.1 was) makes the δ and δ = ∞
#: rows identical and leaves claim (c) untested.
DELTA = 0.01


@dataclass(frozen=True)
class Method:
    """One table row: name (``<setting>/<key>`` in results), label, loss and the overrides that define it."""

    key: str
    label: str
    setting: Setting
    loss: str
    overrides: tuple[str, ...]
    #: The method whose swept lr and β this one uses (a λ variant of a swept row); None: its own.
    hparams_of: str | None = None

    @property
    def name(self) -> str:
        return f"{self.setting}_{self.key}"

    @property
    def needs_calibration(self) -> bool:
        """Whether the method trains with ``loss.timestep_weight=calibrated`` (needs the calibration file)."""
        return "loss.timestep_weight=calibrated" in self.overrides


def _methods(setting: Setting) -> tuple[Method, ...]:
    sft = Method("sft", "SFT on chosen images", setting, "sft", ("loss.name=sft", "reference.strategy=none"))
    dpo = Method("dpo", "Diffusion-DPO", setting, "dpo", ("loss.name=dpo", "reference.strategy=frozen"))
    mapo = Method("mapo", "MaPO", setting, "mapo", ("loss.name=mapo", "reference.strategy=none"))
    if setting == "A":
        return (sft, dpo, mapo)
    return (
        sft,
        dpo,
        Method(
            "dpo_ta",
            "DPO + timestep-aware only",
            setting,
            "dpo",
            ("loss.name=dpo", "reference.strategy=frozen", *_ta()),
            hparams_of=SWEPT_DPO,
        ),
        Method(
            "dpo_ref_inf",
            "DPO + periodic reference, δ = ∞",
            setting,
            "dpo",
            ("loss.name=dpo", *_PERIODIC, "reference.delta=inf"),
            hparams_of=SWEPT_DPO,
        ),
        Method(
            "dpo_ref_delta",
            f"DPO + periodic reference, δ = {DELTA}",
            setting,
            "dpo",
            ("loss.name=dpo", *_PERIODIC, f"reference.delta={DELTA}"),
            hparams_of=SWEPT_DPO,
        ),
        Method(
            "rethinking",
            f"Rethinking DPO (periodic reference, δ = {DELTA}, timestep-aware)",
            setting,
            "dpo",
            ("loss.name=dpo", *_PERIODIC, f"reference.delta={DELTA}", *_ta()),
            hparams_of=SWEPT_DPO,
        ),
        mapo,
        *_lambda_variants(),
    )


def _lambda_variants() -> tuple[Method, ...]:
    """Setting B rows of issue-16's λ(t) variants: Rethinking DPO with each variant."""
    return tuple(
        Method(
            f"rethinking_{suffix}",
            f"Rethinking DPO, λ = {label}",
            "B",
            "dpo",
            ("loss.name=dpo", *_PERIODIC, f"reference.delta={DELTA}", *_ta(weight)),
            hparams_of=SWEPT_DPO,
        )
        for suffix, weight, label in LAMBDA_VARIANTS
    )


METHODS: tuple[Method, ...] = (*_methods("B"), *_methods("A"))
#: ``--quick``: one seed of the methods the claims need most.
QUICK_METHODS: tuple[str, ...] = ("B_dpo", "B_rethinking", "A_dpo", "A_mapo")

#: Learning rate and β per loss when the sweep has not covered a method.
DEFAULT_HPARAMS: dict[str, dict[str, float | None]] = {
    "dpo": {"lr": 5e-5, "beta": 1000.0},
    "mapo": {"lr": 2e-4, "beta": 0.1},
    "sft": {"lr": 2e-4, "beta": None},
}
#: The sweep's grid per loss: (lr, beta) candidates.
SWEEP_GRID: dict[str, tuple[tuple[float, float | None], ...]] = {
    "dpo": ((2e-5, 1000.0), (5e-5, 1000.0), (5e-5, 2500.0)),
    "mapo": ((1e-4, 0.1), (2e-4, 0.1), (2e-4, 0.5)),
    "sft": ((1e-4, None), (2e-4, None)),
}


@dataclass(frozen=True)
class Budget:
    """Sizes of a testbed run (``--quick`` shrinks them); every method gets ``max_steps`` x ``pairs_per_step``."""

    pairs_per_prompt: int = 8  # setting A: pairs per training prompt
    samples_per_prompt_b: int = 32  # setting B: pairs drawn per training prompt (~25 % are not ties)
    max_steps: int = 120
    batch_size: int = 4  # pairs per worker per step (2 workers)
    eval_seeds: int = 16
    train_seeds: tuple[int, ...] = (0, 1, 2)

    @property
    def pairs_per_step(self) -> int:
        return 2 * self.batch_size

    @classmethod
    def quick(cls) -> Budget:
        return cls(pairs_per_prompt=2, samples_per_prompt_b=6, max_steps=20, eval_seeds=4, train_seeds=(0,))


def hyperparameters(method: Method, sweep_file: Path = SWEEP_FILE) -> tuple[dict[str, float | None], str]:
    """``({"lr", "beta"}, source)`` of a method: the sweep's choice for it (source ``"sweep"``) or for the
    method it takes them from (``"sweep (as B_rethinking)"``), else the loss default (``"default"``)."""
    name = method.hparams_of or method.name
    if sweep_file.is_file():
        chosen = json.loads(sweep_file.read_text()).get("chosen", {})
        if name in chosen:
            return dict(chosen[name]), "sweep" if method.hparams_of is None else f"sweep (as {name})"
    return dict(DEFAULT_HPARAMS[method.loss]), "default"


def select_methods(names: tuple[str, ...] | None) -> tuple[Method, ...]:
    """The methods named (all if None), in ``METHODS`` order (so a calibration run trains before the methods
    that read it); ValueError listing the valid names for an unknown one, or naming the calibration run a
    ``calibrated`` method needs when it is left out."""
    if names is None:
        return METHODS
    valid = {m.name for m in METHODS}
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(f"unknown testbed method(s) {unknown}; valid: {', '.join(m.name for m in METHODS)}")
    chosen = tuple(m for m in METHODS if m.name in names)
    calibrated = [m.name for m in chosen if m.needs_calibration]
    if calibrated and CALIBRATION_METHOD not in names:
        raise ValueError(
            f"{', '.join(calibrated)} need(s) {CALIBRATION_METHOD} in the same run: its seed-0 run is the "
            "calibration run of loss.timestep_weight=calibrated"
        )
    return chosen
