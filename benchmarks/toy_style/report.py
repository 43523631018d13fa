"""The testbed's numbers: per-method mean ± std over training seeds, the verdicts on the seed papers' claims,
and the markdown table.

Per evaluated model (one method, one training seed) the row holds: ``adoption`` (fraction of held-out samples
the outline detector flags), ``win_rate`` (its outline score beats the base's on the same prompt and seed, ties
0.5), ``color`` and ``shape`` (fraction of samples showing the colour / shape the prompt names) and ``kl``
(``kl/policy_init`` at the end of training: the divergence of the policy from the base on the probe set).

A claim "X beats Y on metric M" is **reproduced** when ``mean_X - mean_Y > s``, **not reproduced** when
``mean_X - mean_Y < -s`` and **inconclusive** otherwise, with ``s = sqrt((std_X² + std_Y²) / 2)`` (the
difference is within one standard deviation over training seeds). With one seed (``--quick``) ``s = 0``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from benchmarks.toy_style.methods import LAMBDA_VARIANTS, SETTING_LABELS, Method

METRICS: tuple[str, ...] = ("adoption", "win_rate", "color", "shape", "kl")
BASE = "base"


def model_metrics(eval_metrics: dict[str, float], model: str, final: dict | None = None) -> dict[str, float]:
    """One evaluated model's row from ``run_eval``'s metrics (``eval/<model>/<scorer>/<stat>``)."""
    row = {
        "adoption": eval_metrics[f"eval/{model}/outline_style/adoption_rate"],
        "win_rate": eval_metrics.get(f"eval/{model}/outline_style/win_rate", math.nan),
        "color": eval_metrics[f"eval/{model}/color_accuracy/mean"],
        "shape": eval_metrics[f"eval/{model}/shape_accuracy/mean"],
        "kl": float((final or {}).get("kl/policy_init", math.nan)),
    }
    return row


def aggregate(rows: Sequence[dict[str, float]]) -> dict[str, tuple[float, float]]:
    """``{metric: (mean, std)}`` over training seeds (population std, ddof 0; NaNs ignored)."""
    out = {}
    for key in METRICS:
        values = np.array([r[key] for r in rows], dtype=np.float64)
        values = values[np.isfinite(values)]
        out[key] = (float(values.mean()), float(values.std())) if len(values) else (math.nan, math.nan)
    return out


@dataclass(frozen=True)
class Claim:
    """A claim of the seed papers as a comparison ``better`` > ``worse`` on ``metric``."""

    key: str
    text: str
    better: str
    worse: str
    metric: str


CLAIMS: tuple[Claim, ...] = (
    Claim(
        "a",
        "periodic reference + δ + timestep-aware (Rethinking DPO) beats Diffusion-DPO on in-distribution "
        "pairs (setting B, adoption)",
        "B_rethinking",
        "B_dpo",
        "adoption",
    ),
    Claim(
        "b",
        "timestep-aware training alone does not beat Diffusion-DPO (setting B, adoption: DPO ahead)",
        "B_dpo",
        "B_dpo_ta",
        "adoption",
    ),
    Claim(
        "c, drift",
        "reference updates without a limit drift further from the base than with δ (setting B, KL to base: "
        "δ = ∞ higher)",
        "B_dpo_ref_inf",
        "B_dpo_ref_delta",
        "kl",
    ),
    Claim(
        "c",
        "reference updates without a limit lose the base's quality; δ keeps them stable (setting B, "
        "fidelity = mean of colour and shape accuracy)",
        "B_dpo_ref_delta",
        "B_dpo_ref_inf",
        "fidelity",
    ),
    Claim(
        "d",
        "MaPO adopts a style the reference lacks better than Diffusion-DPO (setting A, adoption)",
        "A_mapo",
        "A_dpo",
        "adoption",
    ),
)


def _digits(metric: str) -> int:
    """Decimals a metric is shown with: KL (~0.01) to 4, the rates and accuracies to 3."""
    return 4 if metric == "kl" else 3


def _metric(stats: dict[str, tuple[float, float]], metric: str) -> tuple[float, float]:
    if metric == "fidelity":  # mean of colour and shape accuracy; std of the mean of two per-seed series
        (c, cs), (s, ss) = stats["color"], stats["shape"]
        return (c + s) / 2, math.sqrt(cs**2 + ss**2) / 2
    return stats[metric]


def verdict(claim: Claim, stats: dict[str, dict[str, tuple[float, float]]]) -> tuple[str, str]:
    """``(verdict, numbers)`` of one claim; ``("not run", "")`` if a method is missing."""
    if claim.better not in stats or claim.worse not in stats:
        return "not run", ""
    (mx, sx), (my, sy) = _metric(stats[claim.better], claim.metric), _metric(stats[claim.worse], claim.metric)
    s = math.sqrt((sx**2 + sy**2) / 2)
    diff = mx - my
    result = "reproduced" if diff > s else "not reproduced" if diff < -s else "inconclusive"
    d = _digits(claim.metric)
    numbers = (
        f"{claim.metric}: {claim.better} {mx:.{d}f} ± {sx:.{d}f} vs {claim.worse} {my:.{d}f} ± {sy:.{d}f} "
        f"(difference {diff:+.{d}f}, one std {s:.{d}f})"
    )
    return result, numbers


def _cell(stat: tuple[float, float], digits: int = 3) -> str:
    mean, std = stat
    if not math.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def results_table(
    methods: Sequence[Method],
    stats: dict[str, dict[str, tuple[float, float]]],
    base: dict[str, float],
    hparam_source: dict[str, str],
) -> str:
    """Markdown: one row per method (mean ± std over seeds) under its setting, the base first."""
    lines = [
        "| setting | method | style adoption | win rate vs base | colour acc. | shape acc. | KL to base "
        "(`kl/policy_init`) | lr, β |",
        "|---|---|---|---|---|---|---|---|",
        f"| – | base (no preference training) | {base['adoption']:.3f} | – | {base['color']:.3f} | "
        f"{base['shape']:.3f} | 0 | – |",
    ]
    for m in methods:
        if m.name not in stats:
            continue
        st = stats[m.name]
        cells = " | ".join(_cell(st[k], _digits(k)) for k in METRICS)
        lines.append(
            f"| {m.setting}: {SETTING_LABELS[m.setting]} | {m.label} | {cells} | "
            f"{hparam_source.get(m.name, '–')} |"
        )
    return "\n".join(lines)


def verdict_lines(stats: dict[str, dict[str, tuple[float, float]]]) -> list[str]:
    """One markdown bullet per claim: ``(a) claim: **verdict** — numbers``."""
    lines = []
    for claim in CLAIMS:
        result, numbers = verdict(claim, stats)
        lines.append(f"- ({claim.key}) {claim.text}: **{result}**" + (f" — {numbers}" if numbers else ""))
    return lines


def delta_engagement_lines(
    methods: Sequence[Method], finals: dict[str, dict[str, float]], seeds: Sequence[int], checks: int
) -> list[str]:
    """Whether δ engaged, per method trained with a finite ``reference.delta``: the reference updates each
    seed's run made (``ref/updates`` at the end; fewer than ``checks`` = steps // τ means D passed δ at
    check ``updates + 1`` and the reference froze there). ``finals``: ``{"<method>_s<seed>": final
    metrics}``. Empty when no such method ran."""
    lines = []
    for m in methods:
        delta = next((o.partition("=")[2] for o in m.overrides if o.startswith("reference.delta=")), None)
        if delta is None or math.isinf(float(delta)):
            continue
        updates = [finals.get(f"{m.name}_s{s}", {}).get("ref/updates", math.nan) for s in seeds]
        frozen = sum(1 for u in updates if u < checks)
        made = ", ".join("?" if math.isnan(u) else str(int(u)) for u in updates)
        lines.append(
            f"- {m.name}: δ = {delta} stopped the reference updates in {frozen} of {len(updates)} seeds "
            f"(updates made per seed: {made} of {checks} checks)"
        )
    return lines


def lambda_claims() -> tuple[Claim, ...]:
    """Issue 16's questions per λ(t) variant ``v`` (setting B): does Rethinking DPO with ``v`` beat it with the
    paper's ``inv_sqrt_snr`` on adoption, and does it keep its fidelity."""
    claims = []
    for suffix, weight, _ in LAMBDA_VARIANTS:
        claims += [
            Claim(
                f"λ {weight}",
                f"Rethinking DPO with λ = {weight} beats λ = inv_sqrt_snr (adoption)",
                f"B_rethinking_{suffix}",
                "B_rethinking",
                "adoption",
            ),
            Claim(
                f"λ {weight}",
                f"Rethinking DPO with λ = inv_sqrt_snr keeps more fidelity than with λ = {weight} (the variant "
                "loses fidelity if reproduced)",
                "B_rethinking",
                f"B_rethinking_{suffix}",
                "fidelity",
            ),
        ]
    return tuple(claims)


def sd3_default(stats: dict[str, dict[str, tuple[float, float]]]) -> str:
    """The λ(t) the measured rows support for SD3: the variant whose Rethinking-DPO row beats ``inv_sqrt_snr``
    on adoption (reproduced) without losing fidelity (that comparison not reproduced against it), the highest
    adoption among such; else ``inv_sqrt_snr`` (nothing measured beats the paper's form)."""
    claims = lambda_claims()
    winners = []
    for i, (suffix, weight, _) in enumerate(LAMBDA_VARIANTS):
        adoption, fidelity = claims[2 * i], claims[2 * i + 1]
        if verdict(adoption, stats)[0] == "reproduced" and verdict(fidelity, stats)[0] != "reproduced":
            winners.append((stats[f"B_rethinking_{suffix}"]["adoption"][0], weight))
    return max(winners)[1] if winners else "inv_sqrt_snr"


def lambda_verdict_lines(stats: dict[str, dict[str, tuple[float, float]]]) -> list[str]:
    """One bullet per λ claim, then the SD3 default those verdicts choose (none if no variant ran)."""
    lines = []
    for claim in lambda_claims():
        result, numbers = verdict(claim, stats)
        if result != "not run":
            lines.append(f"- {claim.text}: **{result}** — {numbers}")
    if lines:
        lines.append(f"- SD3 default chosen from these rows: **loss.timestep_weight={sd3_default(stats)}**")
    return lines
