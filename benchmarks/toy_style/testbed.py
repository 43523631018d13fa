"""The toy alignment testbed: do the seed papers' claims about preference training hold in miniature?

    python -m benchmarks.toy_style [--workdir DIR] [--quick] [--methods B_dpo A_mapo ...] [--base-only]

1. the shipped toy base (``pipelines/assets/toy_base``, hash-checked): a tiny SD3 that draws the coloured shape a
   prompt names and outlines ("cartoon" style) about a quarter of its plain-prompt samples;
2. ``prefopt regenerate`` the two preference settings from the base on the training prompts
   (:mod:`benchmarks.toy_style.methods`): A, Pick-Style (reference mismatch) and B, Pick-a-Pic-like (two seeds
   of a plain prompt, outline-scored, 10 % of labels flipped, ties); 3. ``prefopt cache`` each;
4. ``prefopt train`` every method of every setting with every training seed, the same budget each, with the
   hyperparameters of the committed sweep (:mod:`benchmarks.toy_style.sweep`);
5. ``prefopt eval`` every export against the base on the held-out prompts x fixed seeds: style adoption, win
   rate vs the base (outline detector), colour and shape accuracy (fidelity), and ``kl/policy_init`` from training;
6. mean ± std over training seeds, verdicts on claims (a)-(d) (:mod:`benchmarks.toy_style.report`), a figure
   (adoption vs fidelity) and a sample grid (base and every method, same prompts and seeds), written to
   ``benchmarks/toy_style/`` and the README (full runs) and logged as MLflow artifacts of the eval run.

Everything goes through the functions the ``prefopt`` commands run (Ray Data, Ray Train + DeepSpeed, MLflow in
``<workdir>/mlflow.db``), in one Ray session.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shutil
import time
from pathlib import Path

from benchmarks.toy_style import runs
from benchmarks.toy_style.figures import adoption_vs_fidelity
from benchmarks.toy_style.imbalance import plot_imbalance, run_bin_metrics
from benchmarks.toy_style.methods import (
    CALIBRATION_METHOD,
    QUICK_METHODS,
    SETTING_LABELS,
    TAU,
    Budget,
    Method,
    hyperparameters,
    select_methods,
)
from benchmarks.toy_style.report import (
    aggregate,
    delta_engagement_lines,
    lambda_verdict_lines,
    model_metrics,
    results_table,
    verdict_lines,
)
from pipelines.toy_base_asset import shipped_base
from pipelines.toy_prompts import STYLE_TEMPLATE, heldout_prompts, train_prompts
from pipelines.toy_sampling import EVAL_SETTINGS, measure_base
from prefopt_core.timestep_weights import CALIBRATION_KEY
from ray_jobs.timestep_report import CALIBRATION_FILE

logger = logging.getLogger("benchmarks.toy_style")

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_WORKDIR = HERE / "_work"
README_START = "<!-- toy-style:start -->"
README_END = "<!-- toy-style:end -->"
FIGURE = "adoption_vs_fidelity.png"
GRID = "samples.png"
IMBALANCE = "timestep_imbalance.png"


def train_all(workdir: Path, base_dir: Path, methods: tuple[Method, ...], budget: Budget) -> dict[str, dict]:
    """Every method x training seed; keys ``<method>_s<seed>``. A ``calibrated`` method trains with the
    calibration of the seed-0 ``CALIBRATION_METHOD`` run (trained earlier: ``methods`` is in ``METHODS``
    order)."""
    trained: dict[str, dict] = {}
    for method in methods:
        hp, _ = hyperparameters(method)
        extra = (
            (f"{CALIBRATION_KEY}={calibration_file(workdir, trained, budget)}",)
            if method.needs_calibration
            else ()
        )
        for seed in budget.train_seeds:
            logger.info(
                "testbed: training %s (seed %d, lr %g, beta %s)", method.name, seed, hp["lr"], hp["beta"]
            )
            trained[f"{method.name}_s{seed}"] = runs.train(
                workdir, base_dir, method, seed, budget, hparams=hp, extra=extra
            )
    return trained


def calibration_file(workdir: Path, trained: dict[str, dict], budget: Budget) -> Path:
    """``<workdir>/timestep_calibration.json`` from the seed-0 ``CALIBRATION_METHOD`` run, as
    ``prefopt timesteps CONFIG --calibrate RUN_ID --out PATH`` writes it (once)."""
    from prefopt_core.storage import Location
    from ray_jobs.timestep_report import calibrate_from_run

    path = workdir / CALIBRATION_FILE
    if not path.is_file():
        run = trained[f"{CALIBRATION_METHOD}_s{budget.train_seeds[0]}"]
        calibrate_from_run(runs.tracking_uri(workdir), run["run_id"], Location(str(path)))
    return path


def imbalance_figure(workdir: Path, trained: dict[str, dict], budget: Budget, out_dir: Path) -> Path | None:
    """Rethinking DPO's Fig. 2 on prefopt's runs: the seed-0 ``CALIBRATION_METHOD`` run (flow matching, the toy
    SD3) beside the same method on a tiny SD1.5-family model (DDPM), per metric bin; None if that method did
    not run."""
    key = f"{CALIBRATION_METHOD}_s{budget.train_seeds[0]}"
    if key not in trained:
        return None
    method = select_methods((CALIBRATION_METHOD,))[0]
    ddpm = runs.ddpm_counterpart(workdir, method, budget.train_seeds[0], budget, hyperparameters(method)[0])
    uri = runs.tracking_uri(workdir)
    return plot_imbalance(
        {
            "flow matching (toy SD3)": run_bin_metrics(uri, trained[key]["run_id"]),
            "DDPM (tiny SD1.5, random weights)": run_bin_metrics(uri, ddpm["run_id"]),
        },
        out_dir / IMBALANCE,
    )


def summarise(methods: tuple[Method, ...], budget: Budget, ev: dict, trained: dict[str, dict]):
    """``(base row, {method: {metric: (mean, std)}})`` from the eval metrics and the training summaries."""
    metrics = ev["metrics"]
    base = model_metrics(metrics, "base")
    stats = {}
    for m in methods:
        rows = [
            model_metrics(metrics, f"{m.name}_s{s}", trained[f"{m.name}_s{s}"]["final"])
            for s in budget.train_seeds
        ]
        stats[m.name] = aggregate(rows)
    return base, stats


def results_text(text_parts: dict, pictures_prefix: str = "") -> str:
    """The results markdown: how it was run, the table, the verdicts, the pictures (linked as
    ``<pictures_prefix><file>``: relative to ``results.md``, or to the repository root for the README)."""
    info = text_parts["info"]
    text = "\n".join(
        [
            "# Toy alignment testbed results",
            "",
            f"Produced by `python -m benchmarks.toy_style{' --quick' if info['quick'] else ''}` on {info['date']} "
            f"({info['machine']}); total wall time {info['total_s'] / 60:.1f} min{_reuse_note(info)}.",
            "",
            "Base: the shipped toy base (`pipelines/assets/toy_base`, rebuilt by `python -m pipelines.toy_base build`). "
            f"Preference data, from the base on {len(train_prompts())} training prompts: "
            f"A = {SETTING_LABELS['A']}, {info['pairs'].get('A', 0)} pairs (chosen from `{STYLE_TEMPLATE}`, rejected "
            f"from `{{prompt}}`, same seed); B = {SETTING_LABELS['B']}, {info['pairs'].get('B', 0)} pairs kept by the "
            "cache (preset `pick-a-pic-like`: two seeds of the plain prompt, the more outlined preferred, one label in "
            "ten flipped, ties dropped). Every method: "
            f"{info['max_steps']} steps x {info['pairs_per_step']} pairs (2 Ray Train workers, ZeRO-2), training seeds "
            f"{list(info['train_seeds'])}; lr and β from `benchmarks/toy_style/sweep.json` (sweep on validation "
            "prompts) where the last column says `sweep`. Evaluation: "
            f"{len(heldout_prompts())} held-out prompts (no style word) x {info['eval_seeds']} seeds, "
            f"{EVAL_SETTINGS.num_inference_steps} steps, guidance {EVAL_SETTINGS.guidance_scale}. Cells: mean ± std "
            "over training seeds.",
            "",
            text_parts["table"],
            "",
            "Verdicts (reproduced / not reproduced / inconclusive = the difference is within one std over seeds):",
            "",
            *text_parts["verdicts"],
            "",
            *_delta_section(text_parts),
            *lambda_section(text_parts, pictures_prefix),
            f"![adoption vs fidelity]({pictures_prefix}{FIGURE})",
            "",
            f"Samples (rows: held-out prompts x seeds; columns: the base, then every method's seed-0 run): "
            f"![samples]({pictures_prefix}{GRID})",
            "",
        ]
    )
    return text


def _reuse_note(info: dict) -> str:
    """How many training runs came from an earlier run of the same configs (not counted in the wall time)."""
    reused = info.get("reused", 0)
    if not reused:
        return ""
    return (
        f" ({reused} of the {info['runs']} training runs finished earlier with the same config and were "
        "reused: `runs.RESULT_FILE`)"
    )


def _delta_section(text_parts: dict) -> list[str]:
    """Where the divergence limit δ stopped the reference (claim (c) tests δ only where it engaged)."""
    lines = list(text_parts.get("delta_engagement", []))
    if not lines:
        return []
    return ["Divergence limit δ (claim (c) tests it only where it engaged):", "", *lines, ""]


def lambda_section(text_parts: dict, pictures_prefix: str) -> list[str]:
    """The λ(t)-on-flow-matching lines (issue 16): the variant verdicts, the SD3 default they choose and the
    imbalance figure; empty when no variant ran."""
    lines = list(text_parts.get("lambda_verdicts", []))
    if not lines:
        return []
    out = ["λ(t) on flow matching (setting B; same rule; rows `λ = ...` above):", "", *lines, ""]
    if text_parts["info"].get("imbalance"):
        out += [
            "Timestep imbalance (Rethinking DPO's Fig. 2 on prefopt's runs: per metric bin, bin 0 the least "
            f"noisy; {CALIBRATION_METHOD} seed 0 on the toy SD3 beside the same method on a tiny SD1.5):",
            "",
            f"![timestep imbalance]({pictures_prefix}{IMBALANCE})",
            "",
        ]
    return out


def update_readme(text: str, readme: Path = REPO / "README.md") -> None:
    """Replace the README's results section (between the markers) with ``text`` (less its ``# `` title)."""
    content = readme.read_text()
    body = "\n".join(line for line in text.strip().splitlines() if not line.startswith("# ")).strip()
    block = f"{README_START}\n{body}\n{README_END}"
    if README_START in content:
        content = re.sub(
            re.escape(README_START) + r".*?" + re.escape(README_END), lambda _: block, content, flags=re.S
        )
    else:
        content = content.rstrip() + "\n\n## Does it align? The toy testbed\n\n" + block + "\n"
    readme.write_text(content)


def pictures(workdir: Path, base_dir: Path, methods, budget, stats, base, trained, ev, out_dir: Path) -> dict:
    """The figures and the sample grid under ``out_dir``, each logged as an artifact of the eval run:
    adoption vs fidelity, the samples, and the timestep imbalance (when ``CALIBRATION_METHOD`` ran)."""
    from ray_jobs import tracking

    figure = adoption_vs_fidelity(methods, stats, base, out_dir / FIGURE)
    seed0 = {m.name: trained[f"{m.name}_s{budget.train_seeds[0]}"]["export"] for m in methods}
    grid_eval = runs.evaluate(workdir, base_dir, seed0, heldout_prompts()[:4], 2, name="grid")
    grid = out_dir / GRID
    shutil.copyfile(grid_eval["grid"], grid)
    imbalance = imbalance_figure(workdir, trained, budget, out_dir)
    uri = runs.tracking_uri(workdir)
    for path in (figure, grid, imbalance):
        if path is not None:
            tracking.log_artifact(uri, ev["mlflow_run_id"], path, "testbed")
    return {"figure": str(figure), "grid": str(grid), "imbalance": str(imbalance) if imbalance else None}


def run_testbed(
    workdir: Path, *, quick: bool = False, methods: tuple[str, ...] | None = None, write_readme: bool = True
) -> dict:
    from ray_jobs.cluster import ensure_ray

    workdir = workdir.resolve()  # run fingerprints hold its paths: the same directory, however it is named
    budget = Budget.quick() if quick else Budget()
    chosen = select_methods(methods or (QUICK_METHODS if quick else None))
    t0 = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    base_dir = shipped_base()
    ensure_ray(runs.run_config(workdir, "ray", base_dir))
    data = {}
    for setting in sorted({m.setting for m in chosen}):
        data[setting] = {
            "regenerate": runs.regenerate(workdir, base_dir, setting, budget),
            "cache": runs.cache(workdir, base_dir, setting),
        }
    trained = train_all(workdir, base_dir, chosen, budget)
    ev = runs.evaluate(
        workdir, base_dir, {k: v["export"] for k, v in trained.items()}, heldout_prompts(), budget.eval_seeds
    )
    base, stats = summarise(chosen, budget, ev, trained)
    full = not quick and methods is None
    out_dir = HERE if full else workdir
    pics = pictures(workdir, base_dir, chosen, budget, stats, base, trained, ev, out_dir)
    info = {
        "quick": quick,
        "date": time.strftime("%Y-%m-%d"),
        "total_s": time.perf_counter() - t0,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "pairs": {s: d["cache"]["num_pairs"] for s, d in data.items()},
        "max_steps": budget.max_steps,
        "pairs_per_step": budget.pairs_per_step,
        "train_seeds": budget.train_seeds,
        "eval_seeds": budget.eval_seeds,
        "imbalance": pics["imbalance"] is not None,
        "runs": len(trained),
        "reused": sum(1 for r in trained.values() if r.get("reused")),
    }
    sources = {m.name: hyperparameters(m)[1] for m in chosen}
    parts = {
        "info": info,
        "table": results_table(chosen, stats, base, sources),
        "verdicts": verdict_lines(stats),
        "lambda_verdicts": lambda_verdict_lines(stats),
        "delta_engagement": delta_engagement_lines(
            chosen,
            {k: v["final"] for k, v in trained.items()},
            budget.train_seeds,
            budget.max_steps // TAU,
        ),
    }
    text = results_text(parts)
    (out_dir / "results.md").write_text(text)
    if write_readme and full:
        update_readme(results_text(parts, "benchmarks/toy_style/"))
    print(text, flush=True)  # the benchmark's report
    out = {
        **parts,
        "base": base,
        "stats": stats,
        "data": data,
        "trained": trained,
        "pictures": pics,
        "eval_run_id": ev["mlflow_run_id"],
    }
    (workdir / "testbed_summary.json").write_text(json.dumps(out, indent=1, default=str))
    return out


def base_only(workdir: Path) -> dict[str, float]:
    """Measure the shipped base on the held-out prompts x 32 seeds (plain and style prompts): the quality bar;
    writes ``<workdir>/base_metrics.json`` and a contact sheet ``<workdir>/base_samples.png``."""
    t0 = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    metrics = measure_base(shipped_base(), sheet_path=workdir / "base_samples.png")
    metrics["wall_s"] = time.perf_counter() - t0
    logger.info(
        "shipped base: plain-prompt style rate %.3f (target 0.15-0.35), style-prompt rate %.3f, colour accuracy "
        "%.3f (target >= 0.90), shape accuracy %.3f (target >= 0.85)",
        metrics["plain_style_rate"],
        metrics["style_style_rate"],
        metrics["plain_color_acc"],
        metrics["plain_shape_acc"],
    )
    (workdir / "base_metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.toy_style", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"one training seed of {', '.join(QUICK_METHODS)}, small budget (README untouched)",
    )
    parser.add_argument("--methods", nargs="*", help="subset of the methods (README untouched)")
    parser.add_argument(
        "--base-only", action="store_true", help="only measure the shipped base (<workdir>/base_metrics.json)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.base_only:
        return base_only(args.workdir)
    try:
        select_methods(tuple(args.methods) if args.methods else None)
    except ValueError as err:
        parser.exit(2, f"{err}\n")
    return run_testbed(args.workdir, quick=args.quick, methods=tuple(args.methods) if args.methods else None)


__all__ = ["main", "measure_base", "run_testbed"]
