"""The timestep imbalance figure: loss scale, implicit-reward scale and implicit accuracy per timestep bin, for
a flow-matching run beside a DDPM run (Rethinking DPO's Fig. 2 measured on prefopt's own runs).

    python -m benchmarks.toy_style.imbalance --tracking-uri sqlite:///W/mlflow.db \\
        --run flow=RUN_ID --run ddpm=RUN_ID --out imbalance.png [--log-to RUN_ID]

Training logs, at every eval, per metric bin ``k`` (bin 0 the least noisy, :data:`METRIC_BINS` bins over the
training timesteps) ``bins/loss_k`` (mean per-pair loss), ``bins/abs_margin_k`` (mean |implicit reward
margin|) and ``bins/acc_k`` (implicit accuracy) since the previous eval (:class:`prefopt_core.metrics.
BinAccumulator`). A run's value per bin is the mean over its logged history, so the figure describes the
whole run, not its last window. One PNG, three panels, one bar per run in each bin.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from prefopt_core.timesteps import METRIC_BINS

logger = logging.getLogger(__name__)

#: The panels, left to right: (metric name in ``bins/<name>_k``, panel title).
PANELS: tuple[tuple[str, str], ...] = (
    ("loss", "loss scale (mean per-pair loss)"),
    ("abs_margin", "implicit-reward scale (mean |margin|)"),
    ("acc", "implicit accuracy"),
)


def bin_table(metrics: dict[str, float], num_bins: int = METRIC_BINS) -> dict[str, list[float | None]]:
    """``{"bins/acc_3": v, ...}`` -> ``{"acc": [v_0, ..., v_{K-1}], ...}`` for each panel; ``None`` where a
    bin was not logged."""
    return {name: [metrics.get(f"bins/{name}_{k}") for k in range(num_bins)] for name, _ in PANELS}


def run_bin_metrics(uri: str, run_id: str, num_bins: int = METRIC_BINS) -> dict[str, float]:
    """The per-bin metrics of MLflow run ``run_id``, each the mean over its logged history."""
    from ray_jobs.compare import fetch_histories, select_runs

    runs = select_runs(uri, None, [run_id])
    keys = [f"bins/{name}_{k}" for name, _ in PANELS for k in range(num_bins)]
    histories = fetch_histories(uri, runs, keys)[runs[0].run_id]
    return {key: sum(v for _, v in h) / len(h) for key, h in histories.items()}


def plot_imbalance(runs: dict[str, dict[str, float]], out: str | Path, num_bins: int = METRIC_BINS) -> Path:
    """Draw the three panels for ``runs`` (``{label: bin metrics}``, e.g. ``{"flow (SD3 toy)": ...,
    "ddpm (SD1.5 tiny)": ...}``) into the PNG ``out``; returns its path. A bin a run did not log is left
    empty. Uses matplotlib's object API with the Agg canvas (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not runs:
        raise ValueError("plot_imbalance needs at least one run")
    fig = Figure(figsize=(15, 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(PANELS))
    width = 0.8 / len(runs)
    for i, (label, metrics) in enumerate(runs.items()):
        table = bin_table(metrics, num_bins)
        for ax, (name, _) in zip(axes, PANELS, strict=True):
            points = [(k, v) for k, v in enumerate(table[name]) if v is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.bar([x + (i - (len(runs) - 1) / 2) * width for x in xs], ys, width=width, label=label)
    for ax, (name, title) in zip(axes, PANELS, strict=True):
        ax.set_title(title)
        ax.set_xlabel(f"timestep bin (0 least noisy -> {num_bins - 1} noisiest)")
        ax.set_xticks(range(num_bins))
        if name == "acc":
            ax.set_ylim(0, 1)
            ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    axes[0].legend()
    fig.tight_layout()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=RUN_ID", help="repeatable")
    parser.add_argument("--out", default="imbalance.png")
    parser.add_argument("--log-to", metavar="RUN_ID", help="also log the PNG as an artifact of this run")
    ns = parser.parse_args(argv)
    pairs = [r.split("=", 1) for r in ns.run]
    if any(len(p) != 2 for p in pairs):
        parser.error("--run takes LABEL=RUN_ID")
    path = plot_imbalance({label: run_bin_metrics(ns.tracking_uri, rid) for label, rid in pairs}, ns.out)
    if ns.log_to:
        from ray_jobs.tracking import log_artifact

        log_artifact(ns.tracking_uri, ns.log_to, path, "figures")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
