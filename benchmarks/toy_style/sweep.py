"""The testbed's hyperparameter sweep: lr and β per method, chosen on the validation prompts.

    python -m benchmarks.toy_style.sweep [--workdir DIR] [--methods B_dpo ...]

For every method that takes no other row's choice (``Method.hparams_of`` unset: SFT, DPO and MaPO of each
setting), every (lr, β) of its loss's grid (``methods.SWEEP_GRID``) is trained once (training seed 0,
the testbed's budget, the testbed's preference data from the training prompts) and evaluated on the
*validation* prompts (``pipelines.toy_prompts.validation_prompts``: neither training nor held-out) x 16 seeds.
Choice: the highest style adoption among the candidates whose fidelity (mean of colour and shape accuracy) is
at least ``FIDELITY_FLOOR`` of the base's; if none is, the most faithful one. The held-out prompts are never
looked at. Writes ``benchmarks/toy_style/sweep.json`` (``chosen`` + every candidate's numbers) and
``sweep.md``; the testbed reads ``chosen`` and never reruns the sweep.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

from benchmarks.toy_style import runs
from benchmarks.toy_style.methods import SWEEP_FILE, SWEEP_GRID, Budget, Method, select_methods
from benchmarks.toy_style.report import model_metrics
from pipelines.toy_base_asset import shipped_base
from pipelines.toy_prompts import validation_prompts

logger = logging.getLogger("benchmarks.toy_style.sweep")

FIDELITY_FLOOR = 0.9
VALIDATION_SEEDS = 16


def _fidelity(row: dict[str, float]) -> float:
    return (row["color"] + row["shape"]) / 2


def choose(candidates: list[dict], base: dict[str, float]) -> dict:
    """The candidate with the highest adoption whose fidelity >= ``FIDELITY_FLOOR`` x the base's; else the most
    faithful one. ``candidates``: dicts with ``lr``, ``beta`` and the metrics of ``report.model_metrics``."""
    floor = FIDELITY_FLOOR * _fidelity(base)
    ok = [c for c in candidates if _fidelity(c) >= floor]
    if ok:
        return max(ok, key=lambda c: c["adoption"])
    return max(candidates, key=_fidelity)


def sweep(workdir: Path, methods: tuple[Method, ...], budget: Budget) -> dict:
    """Train and validate every candidate of every method; returns the ``sweep.json`` content."""
    from ray_jobs.cluster import ensure_ray

    base_dir = shipped_base()
    ensure_ray(runs.run_config(workdir, "ray", base_dir))
    for setting in sorted({m.setting for m in methods}):
        runs.regenerate(workdir, base_dir, setting, budget)
        runs.cache(workdir, base_dir, setting)
    trained: dict[str, dict] = {}
    methods = tuple(m for m in methods if m.hparams_of is None)  # λ variants take their row's choice
    for m in methods:
        for lr, beta in SWEEP_GRID[m.loss]:
            key = f"{m.name}_lr{lr:g}_b{beta if beta is not None else 0:g}"
            trained[key] = runs.train(
                workdir, base_dir, m, 0, budget, hparams={"lr": lr, "beta": beta}, run_name=key
            )
            trained[key].update(lr=lr, beta=beta, method_name=m.name)
    ev = runs.evaluate(
        workdir,
        base_dir,
        {k: v["export"] for k, v in trained.items()},
        validation_prompts(),
        VALIDATION_SEEDS,
        name="sweep_eval",
    )
    base = model_metrics(ev["metrics"], "base")
    table, chosen = [], {}
    for m in methods:
        cands = [
            {"lr": t["lr"], "beta": t["beta"], **model_metrics(ev["metrics"], k, t["final"])}
            for k, t in trained.items()
            if t["method_name"] == m.name
        ]
        best = choose(cands, base)
        chosen[m.name] = {"lr": best["lr"], "beta": best["beta"]}
        table += [{"method": m.name, **c, "chosen": c is best} for c in cands]
    return {
        "chosen": chosen,
        "base": base,
        "candidates": table,
        "validation_prompts": validation_prompts(),
        "validation_seeds": VALIDATION_SEEDS,
        "max_steps": budget.max_steps,
        "fidelity_floor": FIDELITY_FLOOR,
    }


def sweep_markdown(result: dict) -> str:
    lines = [
        "| method | lr | β | adoption | win rate | colour | shape | chosen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in result["candidates"]:
        beta = "–" if c["beta"] is None else f"{c['beta']:g}"
        win = "–" if not math.isfinite(c["win_rate"]) else f"{c['win_rate']:.3f}"
        lines.append(
            f"| {c['method']} | {c['lr']:g} | {beta} | {c['adoption']:.3f} | {win} | {c['color']:.3f} | "
            f"{c['shape']:.3f} | {'yes' if c['chosen'] else ''} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.toy_style.sweep", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / "_sweep")
    parser.add_argument("--methods", nargs="*", help="subset of the testbed's methods")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        methods = select_methods(tuple(args.methods) if args.methods else None)
    except ValueError as err:
        parser.exit(2, f"{err}\n")
    result = sweep(args.workdir, methods, Budget())
    if SWEEP_FILE.is_file() and args.methods:  # a partial sweep keeps the other methods' choices
        old = json.loads(SWEEP_FILE.read_text())
        result["chosen"] = {**old.get("chosen", {}), **result["chosen"]}
        result["candidates"] = [
            c
            for c in old.get("candidates", [])
            if c["method"] not in result["chosen"] or c["method"] not in args.methods
        ] + result["candidates"]
    SWEEP_FILE.write_text(json.dumps(result, indent=1) + "\n")
    SWEEP_FILE.with_suffix(".md").write_text(sweep_markdown(result))
    print(sweep_markdown(result), flush=True)
    return result


if __name__ == "__main__":
    main()
