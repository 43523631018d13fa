"""The testbed's picture of its table: style adoption against fidelity, one point per method, both settings."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from benchmarks.toy_style.methods import SETTING_LABELS, Method
from benchmarks.toy_style.report import _metric

_MARKERS = {"A": "s", "B": "o"}


def colour_slots(methods: Sequence[Method]) -> dict[str, int]:
    """``{method name: palette index}``: one colour per method key (SFT, DPO, MaPO, ...), shared by its rows in
    both settings, so that two different methods never share a colour (the marker tells the settings apart)."""
    keys = list(dict.fromkeys(m.key for m in methods))
    return {m.name: keys.index(m.key) for m in methods}


def adoption_vs_fidelity(
    methods: Sequence[Method],
    stats: dict[str, dict[str, tuple[float, float]]],
    base: dict[str, float],
    out: Path,
) -> Path:
    """Write a PNG: x = fidelity (mean of colour and shape accuracy), y = style adoption, error bars = one std
    over training seeds; the base as a star. Returns ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=120)
    ax.scatter(
        [(base["color"] + base["shape"]) / 2],
        [base["adoption"]],
        marker="*",
        s=220,
        color="black",
        label="base",
        zorder=3,
    )
    slots = colour_slots(methods)
    palette = plt.get_cmap("tab10" if max(slots.values(), default=0) < 10 else "tab20")
    for setting in ("B", "A"):
        shown = [m for m in methods if m.setting == setting and m.name in stats]
        for m in shown:
            fx, fs = _metric(stats[m.name], "fidelity")
            ay, as_ = stats[m.name]["adoption"]
            color = palette(slots[m.name])
            ax.errorbar(
                fx,
                ay,
                xerr=fs,
                yerr=as_,
                fmt=_MARKERS[setting],
                color=color,
                capsize=3,
                label=f"{setting}: {m.label}",
            )
    ax.set_xlabel("fidelity: mean of colour and shape accuracy (held-out prompts)")
    ax.set_ylabel("style adoption rate (held-out prompts without the style word)")
    ax.set_title(
        "Adoption vs fidelity (mean ± std over training seeds)\n"
        f"o = B, {SETTING_LABELS['B']}; s = A, {SETTING_LABELS['A']}",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="best")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
