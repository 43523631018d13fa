"""``prefopt compare``: compare MLflow runs side by side — a table and one plot per metric.

    prefopt compare configs/demo.yaml                          # runs of cfg.tracking.experiment in cfg.tracking_uri
    prefopt compare --tracking-uri sqlite:///w/mlflow.db --experiment prefopt-demo --format markdown
    prefopt compare --tracking-uri URI --runs RUN_ID RUN_ID --metrics loss,implicit_acc --out /tmp/cmp
    prefopt compare configs/demo.yaml --filter "attributes.run_name LIKE 'dpo%'"   # an MLflow filter string
    prefopt compare configs/demo.yaml --command eval           # the evaluation runs; --all: every run

Runs of one command are compared (tag ``prefopt.command``; ``train`` unless ``--command`` says otherwise):
a training run and an evaluation run share no metrics and few params. ``--all`` mixes them; explicit
``--runs`` of different commands need ``--all`` too.

The table has one row per run: run name, the first 8 characters of the run id, status, then for each metric
its *final* value (at the last logged step) and, where the metric has a known direction (``METRIC_DIRECTION``),
its *best* value (max or min over the history); unknown metrics get the final value only. Then come the params
whose values differ among the runs that have them (``params.<key>``; a run without the param shows ``-``).

Plots: one PNG per metric (``<out>/<metric with / -> _>.png``), one line per run, value over step; a run
without the metric is skipped with a note. The table is printed to stdout in ``--format`` (table|markdown|csv;
notes and the paths written go to stderr, so ``prefopt compare ... --format csv > runs.csv`` works) and always
written to ``<out>/compare.md`` and ``<out>/compare.csv``.

Tracking URI: ``--tracking-uri``, else ``cfg.tracking_uri`` of a CONFIG.yaml given (with optional
``dotted.key=value`` overrides), else ``MLFLOW_TRACKING_URI``; else an error saying what to pass.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

logger = logging.getLogger(__name__)

Format = Literal["table", "markdown", "csv"]
FORMATS: tuple[str, ...] = get_args(Format)
Direction = Literal["max", "min"]

#: The metrics compared when ``--metrics`` is not given.
DEFAULT_METRICS: tuple[str, ...] = ("loss", "implicit_acc", "reward_margin", "kl/policy_init", "kl/ref_init")

#: Which way is better for the metrics that have a direction; any other metric is reported by its final
#: value only (a KL estimate or a learning rate has no "best").
METRIC_DIRECTION: dict[str, Direction] = {
    "loss": "min",
    "implicit_acc": "max",
    "reward_margin": "max",
}

#: Characters of the run id shown in the table.
ID_PREFIX = 8
#: The tag naming the prefopt command that made a run (``train``, ``eval``, ``online``, ...).
COMMAND_TAG = "prefopt.command"
#: The command whose runs are compared when neither ``--command`` nor ``--all`` is given.
DEFAULT_COMMAND = "train"


class CompareError(ValueError):
    """A comparison that cannot be made; the message says what to pass instead."""


# ------------------------------------------------------------------------------------------- data model
@dataclass(frozen=True)
class RunInfo:
    """The parts of an MLflow run the comparison uses."""

    run_id: str
    name: str
    status: str
    params: dict[str, str]
    command: str | None = None


@dataclass
class ComparisonTable:
    """Rows of a comparison (one dict per run, keyed by ``columns``) plus notes about skipped data.

    ``histories[run_id][metric]`` is the metric's ``[(step, value), ...]`` in step order (for the plots).
    """

    columns: list[str]
    rows: list[dict[str, Any]]
    metrics: list[str]
    differing_params: list[str]
    histories: dict[str, dict[str, list[tuple[int, float]]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class CompareResult:
    """What :func:`compare` made: the table, its rendering, the files written."""

    table: ComparisonTable
    text: str
    out_dir: Path
    plots: list[Path]
    files: list[Path]


# ------------------------------------------------------------------------------------------- pure logic
def final_and_best(
    history: list[tuple[int, float]], direction: Direction | None
) -> tuple[float, float | None]:
    """``(final, best)`` of a step-ordered history; ``best`` is None without a direction.

    Final is the value at the last entry (largest step); best is the max/min over the non-NaN values (NaN if
    all are NaN). Example: ``[(1, 0.2), (2, 0.9), (3, 0.5)]`` with "max" -> ``(0.5, 0.9)``; with "min" ->
    ``(0.5, 0.2)``; with None -> ``(0.5, None)``.
    """
    if not history:
        raise ValueError("empty metric history")
    final = history[-1][1]
    if direction is None:
        return final, None
    if direction not in ("max", "min"):
        raise ValueError(f"unknown direction {direction!r}; valid: max, min")
    finite = [v for _, v in history if not math.isnan(v)]
    if not finite:
        return final, math.nan
    return final, max(finite) if direction == "max" else min(finite)


def differing_params(runs: list[RunInfo]) -> list[str]:
    """Sorted param keys with at least two different values among the runs that have the param.

    A param only some runs have, with one value among them, does not differ: it says which command or
    version made the run, not how the runs differ. With a single run nothing differs.
    """
    keys = sorted({k for r in runs for k in r.params})
    return [k for k in keys if len({r.params[k] for r in runs if k in r.params}) > 1]


def of_command(runs: list[RunInfo], command: str | None) -> tuple[list[RunInfo], list[str]]:
    """The runs made by ``command`` (all of them for None) and a note per other command left out.

    Example: runs tagged train, eval, train and one untagged, with command "train" -> the two training runs
    and the notes (untagged first, then by command name) ``["left out 1 untagged run (--all to include)",
    "left out 1 eval run (--command eval or --all to include)"]``.
    """
    if command is None:
        return runs, []
    kept = [r for r in runs if r.command == command]
    others: dict[str | None, int] = {}
    for r in runs:
        if r.command != command:
            others[r.command] = others.get(r.command, 0) + 1
    notes = []
    for other, n in sorted(others.items(), key=lambda kv: (kv[0] is not None, kv[0] or "")):
        how = f"--command {other} or --all" if other else "--all"
        notes.append(f"left out {n} {other or 'untagged'} run{'s' * (n > 1)} ({how} to include)")
    return kept, notes


def metric_columns(metric: str) -> list[str]:
    """Column names of one metric: ``"<m> final"`` and, when it has a direction, ``"<m> best(max|min)"``."""
    direction = METRIC_DIRECTION.get(metric)
    cols = [f"{metric} final"]
    if direction is not None:
        cols.append(f"{metric} best({direction})")
    return cols


def build_table(
    runs: list[RunInfo],
    histories: dict[str, dict[str, list[tuple[int, float]]]],
    metrics: list[str],
) -> ComparisonTable:
    """The comparison of ``runs`` on ``metrics`` given each run's step-ordered metric histories."""
    params = differing_params(runs)
    columns = ["run", "id", "status"]
    for m in metrics:
        columns += metric_columns(m)
    columns += [f"params.{p}" for p in params]
    rows, notes = [], []
    for run in runs:
        row: dict[str, Any] = {"run": run.name, "id": run.run_id[:ID_PREFIX], "status": run.status}
        for m in metrics:
            history = histories.get(run.run_id, {}).get(m, [])
            cols = metric_columns(m)
            if not history:
                notes.append(f"run {run.name} ({run.run_id[:ID_PREFIX]}) has no metric {m!r}: skipped")
                row.update(dict.fromkeys(cols))
                continue
            final, best = final_and_best(history, METRIC_DIRECTION.get(m))
            row[cols[0]] = final
            if len(cols) > 1:
                row[cols[1]] = best
        for p in params:
            row[f"params.{p}"] = run.params.get(p)
        rows.append(row)
    return ComparisonTable(columns, rows, list(metrics), params, histories, notes)


def _cell(value: Any) -> str:
    """Human-readable cell: floats with 6 significant digits, missing values as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def render_text(table: ComparisonTable) -> str:
    """A fixed-width text table (columns padded to their widest cell)."""
    cells = [table.columns] + [[_cell(r[c]) for c in table.columns] for r in table.rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(table.columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_markdown(table: ComparisonTable) -> str:
    """A GitHub-flavoured markdown table (``|`` inside cells escaped)."""

    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    head = "| " + " | ".join(esc(c) for c in table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(esc(_cell(r[c])) for c in table.columns) + " |" for r in table.rows]
    return "\n".join([head, rule, *body])


def render_csv(table: ComparisonTable) -> str:
    """CSV with a header row; floats at full precision (``repr``), missing values empty."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(table.columns)
    for r in table.rows:
        writer.writerow(
            ["" if r[c] is None else repr(r[c]) if isinstance(r[c], float) else r[c] for c in table.columns]
        )
    return buf.getvalue()


RENDERERS = {"table": render_text, "markdown": render_markdown, "csv": render_csv}


def render(table: ComparisonTable, fmt: str) -> str:
    """Render ``table`` as ``fmt`` (one of ``FORMATS``)."""
    if fmt not in RENDERERS:
        raise CompareError(f"unknown format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    return RENDERERS[fmt](table)


def plot_filename(metric: str) -> str:
    """``"kl/policy_init"`` -> ``"kl_policy_init.png"`` (anything but letters, digits, ``.-_`` becomes ``_``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", metric) + ".png"


def plot_metrics(table: ComparisonTable, runs: list[RunInfo], out_dir: Path) -> list[Path]:
    """One PNG per metric with a line per run that logged it; returns the paths written.

    Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend switch). A metric no run
    logged gets no PNG and a note in ``table.notes``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for metric in table.metrics:
        lines = [(r, table.histories.get(r.run_id, {}).get(metric, [])) for r in runs]
        lines = [(r, h) for r, h in lines if h]
        if not lines:
            table.notes.append(f"no run has metric {metric!r}: no plot")
            continue
        fig = Figure(figsize=(6.4, 4.0), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for run, history in lines:
            steps = [s for s, _ in history]
            values = [v for _, v in history]
            ax.plot(
                steps,
                values,
                marker="o" if len(history) < 30 else None,
                markersize=3,
                label=f"{run.name} ({run.run_id[:ID_PREFIX]})",
            )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are integers
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.set_title(metric)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = out_dir / plot_filename(metric)
        fig.savefig(path, format="png")
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------- MLflow
def _run_info(run) -> RunInfo:
    return RunInfo(
        run_id=run.info.run_id,
        name=run.info.run_name or run.data.tags.get("mlflow.runName") or run.info.run_id[:ID_PREFIX],
        status=run.info.status,
        params=dict(run.data.params),
        command=run.data.tags.get(COMMAND_TAG),
    )


def select_runs(
    uri: str, experiment: str | None, run_ids: list[str] | None, filter_string: str = ""
) -> list[RunInfo]:
    """Runs of ``experiment`` (oldest first, optionally filtered), or exactly ``run_ids`` in the given order.

    With both, every run must belong to the experiment. Raises :class:`CompareError` for an experiment that
    does not exist (listing the ones that do), an unknown run id, or an empty selection.
    """
    from mlflow.exceptions import MlflowException

    from ray_jobs.tracking import mlflow_client

    client = mlflow_client(uri)
    exp_id = None
    if experiment is not None:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = sorted(e.name for e in client.search_experiments())
            raise CompareError(
                f"experiment {experiment!r} does not exist in {uri}; experiments there: {names or 'none'}"
            )
        exp_id = exp.experiment_id
    if run_ids:
        runs = []
        for rid in run_ids:
            try:
                run = client.get_run(rid)
            except MlflowException:
                raise CompareError(f"run id {rid!r} not found in {uri} (pass full run ids)") from None
            if exp_id is not None and run.info.experiment_id != exp_id:
                raise CompareError(f"run {rid} is not in experiment {experiment!r}")
            runs.append(_run_info(run))
        return runs
    if exp_id is None:
        raise CompareError("nothing to compare: pass --experiment NAME, --runs ID ..., or a CONFIG.yaml")
    found = client.search_runs(
        [exp_id], filter_string=filter_string, order_by=["attributes.start_time ASC"], max_results=1000
    )
    if not found:
        extra = f" matching {filter_string!r}" if filter_string else ""
        raise CompareError(f"experiment {experiment!r} has no runs{extra}")
    return [_run_info(r) for r in found]


def fetch_histories(
    uri: str, runs: list[RunInfo], metrics: list[str]
) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """``{run_id: {metric: [(step, value), ...]}}`` ordered by (step, timestamp); absent metrics omitted."""
    from ray_jobs.tracking import mlflow_client

    client = mlflow_client(uri)
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for run in runs:
        per_metric = {}
        for m in metrics:
            history = sorted(client.get_metric_history(run.run_id, m), key=lambda x: (x.step, x.timestamp))
            if history:
                per_metric[m] = [(int(x.step), float(x.value)) for x in history]
        out[run.run_id] = per_metric
    return out


# ------------------------------------------------------------------------------------------- entry points
def _same_command(runs: list[RunInfo], command: str | None) -> list[RunInfo]:
    """Explicit runs are compared as given, but only when one command made them all (unless ``command``
    is None: ``--all``)."""
    made_by = sorted({str(r.command) for r in runs})
    if command is not None and len(made_by) > 1:
        raise CompareError(
            f"the runs were made by different commands ({', '.join(made_by)}); pass --all to compare them anyway"
        )
    return runs


def compare(
    uri: str,
    *,
    experiment: str | None = None,
    run_ids: list[str] | None = None,
    metrics: list[str] | None = None,
    fmt: str = "table",
    out_dir: str | Path | None = None,
    filter_string: str = "",
    command: str | None = DEFAULT_COMMAND,
) -> CompareResult:
    """Compare runs and write ``compare.md``, ``compare.csv`` and one PNG per metric into ``out_dir``.

    Runs of an experiment are those of ``command`` (``None``: every run); explicit ``run_ids`` must share
    one command unless ``command`` is None. ``out_dir`` defaults to ``<cwd>/compare_<experiment>``
    (``compare_runs`` for explicit run ids without an experiment). Returns the table rendered as ``fmt``
    plus the paths written.
    """
    if fmt not in FORMATS:
        raise CompareError(f"unknown format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    metrics = list(metrics or DEFAULT_METRICS)
    runs = select_runs(uri, experiment, run_ids, filter_string)
    left_out: list[str] = []
    if run_ids:
        runs = _same_command(runs, command)
    else:
        runs, left_out = of_command(runs, command)
        if not runs:
            raise CompareError(f"experiment {experiment!r} has no {command} runs; {'; '.join(left_out)}")
    table = build_table(runs, fetch_histories(uri, runs, metrics), metrics)
    table.notes[:0] = left_out
    label = re.sub(r"[^A-Za-z0-9._-]", "_", experiment) if experiment else "runs"
    out = Path(out_dir) if out_dir is not None else Path.cwd() / f"compare_{label}"
    out.mkdir(parents=True, exist_ok=True)
    plots = plot_metrics(table, runs, out)
    files = [out / "compare.md", out / "compare.csv"]
    files[0].write_text(render_markdown(table) + "\n")
    files[1].write_text(render_csv(table))
    logger.debug("compared %d runs on %s; notes: %s", len(runs), metrics, table.notes)
    return CompareResult(table=table, text=render(table, fmt), out_dir=out, plots=plots, files=files)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``prefopt compare`` (the CLI builds the parser)."""
    p.add_argument(
        "config", nargs="*", help="[CONFIG.yaml] [dotted.key=value ...] (tracking URI, experiment)"
    )
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (wins over the config and MLFLOW_TRACKING_URI)"
    )
    p.add_argument("--experiment", help="experiment name (default: the config's tracking.experiment)")
    p.add_argument("--runs", nargs="+", metavar="ID", help="explicit run ids (full ids)")
    p.add_argument("--metrics", help=f"comma-separated metric names (default: {','.join(DEFAULT_METRICS)})")
    p.add_argument("--format", default="table", help=f"output format: {'|'.join(FORMATS)} (default table)")
    p.add_argument("--out", help="output directory (default: <cwd>/compare_<experiment>)")
    p.add_argument("--filter", default="", help="MLflow filter string for the experiment's runs")
    p.add_argument(
        "--command",
        default=DEFAULT_COMMAND,
        help=f"compare the runs this prefopt command made (tag {COMMAND_TAG}; default {DEFAULT_COMMAND})",
    )
    p.add_argument("--all", action="store_true", help="compare runs of every command together")


def _config_from_args(positional: list[str]):
    """``[CONFIG.yaml] [dotted.key=value ...]`` -> RunConfig, or None when neither is given."""
    from ray_jobs.preflight import load_user_config

    config, overrides = None, []
    for a in positional:
        if "=" in a:
            overrides.append(a)
        elif config is None:
            config = a
        else:
            raise CompareError(f"unexpected argument {a!r}: expected one CONFIG.yaml and dotted.key=value")
    if config is None and not overrides:
        return None
    return load_user_config(config, overrides)


def run(ns: argparse.Namespace) -> int:
    """Run ``prefopt compare`` for parsed arguments: print the table (stdout) and notes (stderr); raise
    :class:`CompareError` (or a config error) for what the user must change."""
    if ns.format not in FORMATS:
        raise CompareError(f"unknown format {ns.format!r}; valid formats: {', '.join(FORMATS)}")
    cfg = _config_from_args(ns.config)
    uri = ns.tracking_uri or (cfg.tracking_uri if cfg else None) or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise CompareError(
            "no MLflow tracking URI: pass --tracking-uri URI (e.g. sqlite:///prefopt_work/demo/mlflow.db), "
            "a CONFIG.yaml, or set MLFLOW_TRACKING_URI"
        )
    experiment = ns.experiment or (cfg.tracking.experiment if cfg and not ns.runs else None)
    metrics = [m.strip() for m in ns.metrics.split(",") if m.strip()] if ns.metrics else None
    result = compare(
        uri,
        experiment=experiment,
        run_ids=ns.runs,
        metrics=metrics,
        fmt=ns.format,
        out_dir=ns.out,
        filter_string=ns.filter,
        command=None if ns.all else ns.command,
    )
    # the CLI's own output; notes go to stderr so that stdout pipes cleanly
    print(result.text.rstrip("\n"), flush=True)
    for note in result.table.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {', '.join(str(p) for p in [*result.files, *result.plots])}", file=sys.stderr)
    return 0
