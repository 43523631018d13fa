"""The toy testbed's report (table, results file, README section) and the demo's evaluation config: pure
functions, checked on hand-made numbers. The testbed itself runs as ``python -m benchmarks.toy_style``."""

from __future__ import annotations

from benchmarks.toy_style.testbed import README_END, README_START, results_table, update_readme
from pipelines.toy_prompts import heldout_prompts
from prefopt_core.config import load_config
from ray_jobs.demo import evaluation_config


def _summary(base: float, dpo: float, win: float) -> dict:
    p = "eval/dpo/outline_style"
    return {
        "metrics": {
            "eval/base/outline_style/adoption_rate": base,
            f"{p}/adoption_rate": dpo,
            f"{p}/win_rate": win,
            f"{p}/win_rate_seed_mean": win,
            f"{p}/win_rate_seed_std": 0.1,
        }
    }


def test_results_table_rows_by_hand():
    """Base adoption 0.25 and DPO 0.625: ratio 0.625 / 0.25 = 2.50; only trained methods get a row, in METHODS
    order; the wall time is rounded to whole seconds."""
    trained = {"dpo": {"seconds": 81.6, "steps": 150, "beta": 1000.0, "lr": 5e-5}}
    table = results_table(_summary(0.25, 0.625, 0.75), trained)
    lines = table.splitlines()
    assert lines[0].startswith("| method | style adoption rate | × base | win rate vs base")
    assert lines[2] == "| base (no preference training) | 0.250 | 1.00 | – | – | – | – |"
    assert lines[3] == (
        "| Diffusion-DPO (frozen reference) | 0.625 | 2.50 | 0.750 (0.750 ± 0.100) | 82 s | 150 | 1000, 5e-05 |"
    )
    assert len(lines) == 4


def test_update_readme_replaces_only_the_marked_section(tmp_path):
    """A README without markers gets a new section at the end; with markers, only what lies between them is
    replaced (the text before and after is kept byte for byte)."""
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\nintro\n")
    update_readme("first table", readme)
    text = readme.read_text()
    assert text.startswith("# title\n\nintro\n") and f"{README_START}\nfirst table\n{README_END}" in text
    readme.write_text(text + "\n## after\nkept\n")
    update_readme("second table", readme)
    new = readme.read_text()
    assert "first table" not in new and f"{README_START}\nsecond table\n{README_END}" in new
    assert new.startswith("# title\n\nintro\n") and new.endswith("## after\nkept\n")


def test_demo_evaluates_its_export_on_the_heldout_prompts(tmp_path):
    """The demo's eval: the trained export named ``trained`` vs the base, the outline scorer present once,
    and the 8 held-out prompts of the testbed written to ``<workdir>/eval_prompts.txt``."""
    cfg = load_config("configs/demo.yaml", [f"run.workdir={tmp_path}"])
    ev = evaluation_config(cfg, "/x/export/transformer")
    assert ev.eval.models == ["trained=/x/export/transformer"]
    assert [s["name"] for s in ev.eval.scorers].count("outline_style") == 1
    assert (tmp_path / "eval_prompts.txt").read_text().splitlines() == heldout_prompts()
    assert ev.eval.prompts == str(tmp_path / "eval_prompts.txt")


def test_update_readme_drops_the_results_title(tmp_path):
    """``results.md`` starts with its own ``# `` title; inside the README section it would be a second H1."""
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n{README_START}\nold\n{README_END}\n")
    update_readme("# Toy alignment testbed results\n\nline\n", readme)
    assert readme.read_text() == f"# title\n{README_START}\nline\n{README_END}\n"
