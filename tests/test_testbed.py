"""The toy testbed's report (mean ± std, verdicts, table, README section), its sweep's choice and the demo's
evaluation config and last lines: pure functions, checked on hand-made numbers. The testbed itself runs as
``python -m benchmarks.toy_style``."""

from __future__ import annotations

import math

import pytest

from benchmarks.toy_style.methods import METHODS, QUICK_METHODS, hyperparameters, select_methods
from benchmarks.toy_style.report import (
    CLAIMS,
    aggregate,
    delta_engagement_lines,
    lambda_verdict_lines,
    model_metrics,
    results_table,
    sd3_default,
    verdict,
)
from benchmarks.toy_style.sweep import choose
from benchmarks.toy_style.testbed import README_END, README_START, update_readme
from pipelines.toy_prompts import heldout_prompts
from prefopt_core.config import load_config
from ray_jobs.demo import evaluation_config, outcome_lines


def _row(adoption, color=0.9, shape=0.9, kl=0.1, win=0.5):
    return {"adoption": adoption, "win_rate": win, "color": color, "shape": shape, "kl": kl}


def test_aggregate_is_mean_and_population_std_over_seeds():
    """Adoption 0.2, 0.4, 0.6 -> mean 0.4, std sqrt(((-.2)^2 + 0 + .2^2) / 3) = sqrt(0.08 / 3) = 0.1633;
    a NaN KL (a run that logged none) is ignored: KL 0.1, 0.3 -> 0.2 ± 0.1."""
    stats = aggregate([_row(0.2, kl=0.1), _row(0.4, kl=math.nan), _row(0.6, kl=0.3)])
    assert stats["adoption"] == pytest.approx((0.4, math.sqrt(0.08 / 3)))
    assert stats["kl"] == pytest.approx((0.2, 0.1))


def test_model_metrics_reads_the_eval_names():
    m = {
        "eval/x/outline_style/adoption_rate": 0.5,
        "eval/x/outline_style/win_rate": 0.7,
        "eval/x/color_accuracy/mean": 0.95,
        "eval/x/shape_accuracy/mean": 0.9,
    }
    assert model_metrics(m, "x", {"kl/policy_init": 0.02}) == _row(0.5, 0.95, 0.9, 0.02, 0.7)
    assert math.isnan(model_metrics(m, "x")["kl"])


def test_verdicts_by_hand():
    """Claim (d): MaPO 0.60 ± 0.03 vs DPO 0.40 ± 0.04 -> difference 0.20 > s = sqrt((.03² + .04²) / 2) = 0.0354:
    reproduced; MaPO 0.40 vs DPO 0.45 (same stds): -0.05 < -0.0354: not reproduced; 0.42 vs 0.40: inconclusive.
    Claim (c) on fidelity = (colour + shape) / 2: δ run (0.9 + 0.8) / 2 = 0.85 vs δ = ∞ (0.5 + 0.5) / 2 = 0.5
    with zero stds: reproduced. A missing method: not run."""
    d = next(c for c in CLAIMS if c.key == "d")
    stats = {"A_mapo": {"adoption": (0.60, 0.03)}, "A_dpo": {"adoption": (0.40, 0.04)}}
    assert verdict(d, stats)[0] == "reproduced"
    assert "difference +0.200, one std 0.035" in verdict(d, stats)[1]
    stats["A_mapo"] = {"adoption": (0.40, 0.03)}
    stats["A_dpo"] = {"adoption": (0.45, 0.04)}
    assert verdict(d, stats)[0] == "not reproduced"
    stats["A_mapo"] = {"adoption": (0.42, 0.03)}
    stats["A_dpo"] = {"adoption": (0.40, 0.04)}
    assert verdict(d, stats)[0] == "inconclusive"
    c = next(c for c in CLAIMS if c.key == "c")
    fid = {
        "B_dpo_ref_delta": {"color": (0.9, 0.0), "shape": (0.8, 0.0)},
        "B_dpo_ref_inf": {"color": (0.5, 0.0), "shape": (0.5, 0.0)},
    }
    assert verdict(c, fid)[0] == "reproduced"
    assert verdict(c, {})[0] == "not run"


def test_drift_claim_compares_kl_with_four_digits():
    """Claim (c, drift): δ = ∞ ends at KL 0.0300 ± 0.0040, the δ run at 0.0200 ± 0.0030: difference +0.0100 >
    s = sqrt((.004² + .003²) / 2) = 0.003536: reproduced, its numbers to 4 digits (KL is ~0.01)."""
    c = next(c for c in CLAIMS if c.key == "c, drift")
    stats = {"B_dpo_ref_inf": {"kl": (0.03, 0.004)}, "B_dpo_ref_delta": {"kl": (0.02, 0.003)}}
    result, numbers = verdict(c, stats)
    assert result == "reproduced"
    assert "difference +0.0100, one std 0.0035" in numbers


def test_delta_engagement_counts_the_seeds_whose_reference_froze():
    """4 checks (120 steps, τ = 25 -> 120 // 25). B_dpo_ref_delta made 2, 3 and 4 updates: the first two
    froze (fewer than 4), the third never passed δ: "2 of 3 seeds". δ = ∞ and frozen-reference rows get no
    line; a seed without the metric shows "?"."""
    methods = select_methods(("B_dpo", "B_dpo_ref_inf", "B_dpo_ref_delta"))
    finals = {
        "B_dpo_ref_delta_s0": {"ref/updates": 2.0},
        "B_dpo_ref_delta_s1": {"ref/updates": 3.0},
        "B_dpo_ref_delta_s2": {"ref/updates": 4.0},
        "B_dpo_ref_inf_s0": {"ref/updates": 4.0},
    }
    lines = delta_engagement_lines(methods, finals, (0, 1, 2), 4)
    assert len(lines) == 1
    assert (
        "stopped the reference updates in 2 of 3 seeds (updates made per seed: 2, 3, 4 of 4 checks)"
        in lines[0]
    )
    assert (
        "1 of 2 seeds (updates made per seed: 2, ? of 4 checks)"
        in delta_engagement_lines(methods, {"B_dpo_ref_delta_s0": {"ref/updates": 2.0}}, (0, 3), 4)[0]
    )


def test_results_table_rows_by_hand():
    """The base row first, then one row per method with stats, ``mean ± std`` to 3 digits (KL to 4)."""
    methods = select_methods(("A_dpo",))
    stats = {"A_dpo": aggregate([_row(0.5, kl=0.01), _row(0.7, kl=0.03)])}
    table = results_table(methods, stats, _row(0.25, 0.95, 0.9, 0.0, math.nan), {"A_dpo": "sweep"})
    lines = table.splitlines()
    assert lines[2] == "| – | base (no preference training) | 0.250 | – | 0.950 | 0.900 | 0 | – |"
    assert lines[3] == (
        "| A: Pick-Style (reference mismatch) | Diffusion-DPO | 0.600 ± 0.100 | 0.500 ± 0.000 | 0.900 ± 0.000 "
        "| 0.900 ± 0.000 | 0.0200 ± 0.0100 | sweep |"
    )
    assert len(lines) == 4


def test_methods_cover_both_settings_and_unknown_names_fail():
    """Setting B: 7 methods (SFT, DPO, TA only, δ = ∞, δ, Rethinking, MaPO) and a Rethinking row per λ(t)
    variant; setting A: SFT, DPO, MaPO."""
    assert [m.name for m in METHODS] == [
        "B_sft",
        "B_dpo",
        "B_dpo_ta",
        "B_dpo_ref_inf",
        "B_dpo_ref_delta",
        "B_rethinking",
        "B_mapo",
        "B_rethinking_ddpm",
        "B_rethinking_logsnr",
        "B_rethinking_cal",
        "A_sft",
        "A_dpo",
        "A_mapo",
    ]
    assert set(QUICK_METHODS) <= {m.name for m in METHODS}
    ta = next(m for m in METHODS if m.name == "B_dpo_ta").overrides
    assert "loss.timestep_weight=inv_sqrt_snr" in ta and "timesteps.sampling=gamma" in ta
    with pytest.raises(ValueError, match="valid: B_sft, B_dpo"):
        select_methods(("B_ppo",))


def test_lambda_variants_differ_from_their_row_in_lambda_only():
    """``B_rethinking_logsnr`` = ``B_rethinking`` with ``loss.timestep_weight=log_snr`` in place of
    ``inv_sqrt_snr``, and both take ``B_dpo``'s swept lr and β."""
    by_name = {m.name: m for m in METHODS}
    variant, row = by_name["B_rethinking_logsnr"], by_name["B_rethinking"]
    swapped = tuple(
        "loss.timestep_weight=log_snr" if o == "loss.timestep_weight=inv_sqrt_snr" else o
        for o in row.overrides
    )
    assert variant.overrides == swapped
    assert variant.hparams_of == row.hparams_of == "B_dpo"


def test_setting_b_dpo_rows_take_the_swept_dpo_hyperparameters(tmp_path):
    """A sweep file choosing lr 3e-5, β 2000 for B_dpo gives B_rethinking_ddpm the same, labelled as borrowed;
    the sweep itself tunes only the rows without ``hparams_of``: SFT, DPO, MaPO per setting."""
    sweep = tmp_path / "sweep.json"
    sweep.write_text('{"chosen": {"B_dpo": {"lr": 3e-5, "beta": 2000.0}}}')
    variant = select_methods(("B_rethinking_ddpm",))[0]
    assert hyperparameters(variant, sweep) == ({"lr": 3e-5, "beta": 2000.0}, "sweep (as B_dpo)")
    swept = [m.name for m in METHODS if m.hparams_of is None]
    assert swept == ["B_sft", "B_dpo", "B_mapo", "A_sft", "A_dpo", "A_mapo"]


def test_calibrated_method_without_its_calibration_run_fails():
    with pytest.raises(ValueError, match=r"B_rethinking_cal need.* B_dpo_ref_delta"):
        select_methods(("B_rethinking_cal",))


def test_selection_trains_the_calibration_run_first():
    """Asked in any order, methods come back in ``METHODS`` order: the calibration run before its readers."""
    chosen = select_methods(("B_rethinking_cal", "B_dpo_ref_delta"))
    assert [m.name for m in chosen] == ["B_dpo_ref_delta", "B_rethinking_cal"]


def test_lambda_verdicts_and_sd3_default_by_hand():
    """Rethinking 0.40 ± 0.02 adoption, fidelity (0.9 + 0.8) / 2 = 0.85 (stds 0). log_snr: 0.50 ± 0.02 ->
    +0.10 > s = 0.02: beats it; fidelity (0.9 + 0.78) / 2 = 0.84, inv_sqrt_snr ahead by 0.01 > s = 0: the
    variant loses fidelity, so it is not chosen. ddpm range: 0.45 ± 0.02 (beats, +0.05) at fidelity 0.85
    (tie, not reproduced): chosen. With only the ddpm-range row losing (0.35), the default stays inv_sqrt_snr."""

    def st(adoption, color, shape):
        return {"adoption": (adoption, 0.02), "color": (color, 0.0), "shape": (shape, 0.0)}

    stats = {
        "B_rethinking": st(0.40, 0.9, 0.8),
        "B_rethinking_logsnr": st(0.50, 0.9, 0.78),
        "B_rethinking_ddpm": st(0.45, 0.9, 0.8),
    }
    assert sd3_default(stats) == "inv_sqrt_snr_ddpm_range"
    lines = lambda_verdict_lines(stats)
    assert (
        lines[-1] == "- SD3 default chosen from these rows: **loss.timestep_weight=inv_sqrt_snr_ddpm_range**"
    )
    assert (
        sum("**reproduced**" in line for line in lines) == 3
    )  # ddpm beats, logsnr beats, logsnr loses fidelity
    stats = {"B_rethinking": st(0.40, 0.9, 0.8), "B_rethinking_ddpm": st(0.35, 0.9, 0.8)}
    assert sd3_default(stats) == "inv_sqrt_snr"


def test_no_lambda_rows_no_lambda_lines():
    assert lambda_verdict_lines({"B_rethinking": {"adoption": (0.4, 0.0)}}) == []


def test_sweep_choice_by_hand():
    """Base fidelity (0.9 + 0.9) / 2 = 0.9, floor 0.9 x 0.9 = 0.81. Candidate 1: adoption 0.7 but fidelity 0.6
    (excluded); 2: 0.5 at 0.85; 3: 0.4 at 0.9 -> 2. If none clears the floor, the most faithful one."""
    base = _row(0.25)
    c1, c2, c3 = _row(0.7, 0.6, 0.6), _row(0.5, 0.85, 0.85), _row(0.4)
    assert choose([c1, c2, c3], base) is c2
    assert choose([c1, _row(0.9, 0.7, 0.7)], base)["color"] == 0.7


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


def test_update_readme_drops_the_results_title(tmp_path):
    """``results.md`` starts with its own ``# `` title; inside the README section it would be a second H1."""
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n{README_START}\nold\n{README_END}\n")
    update_readme("# Toy alignment testbed results\n\nline\n", readme)
    assert readme.read_text() == f"# title\n{README_START}\nline\n{README_END}\n"


def test_demo_evaluates_its_export_on_the_heldout_prompts(tmp_path):
    """The demo's eval: the trained export named ``trained`` vs the base, the outline and both fidelity scorers
    present once each, and the 8 held-out prompts of the testbed written to ``<workdir>/eval_prompts.txt``."""
    cfg = load_config("configs/demo.yaml", [f"run.workdir={tmp_path}"])
    ev = evaluation_config(cfg, "/x/export/transformer")
    assert ev.eval.models == ["trained=/x/export/transformer"]
    names = [s["name"] for s in ev.eval.scorers]
    assert {n: names.count(n) for n in ("outline_style", "color_accuracy", "shape_accuracy")} == {
        "outline_style": 1,
        "color_accuracy": 1,
        "shape_accuracy": 1,
    }
    assert (tmp_path / "eval_prompts.txt").read_text().splitlines() == heldout_prompts()
    assert ev.eval.prompts == str(tmp_path / "eval_prompts.txt")


def test_demo_last_lines_show_adoption_and_fidelity_before_and_after():
    summary = {
        "adoption_rate_before": 0.25,
        "adoption_rate_after": 0.5,
        "fidelity": {
            "color_accuracy": {"before": 0.95, "after": 0.9},
            "shape_accuracy": {"before": 0.9, "after": 0.875},
        },
    }
    assert outcome_lines(summary) == [
        "style adoption rate (held-out prompts without the style word): base 0.250 -> trained 0.500",
        "fidelity, color accuracy (same samples): base 0.950 -> trained 0.900",
        "fidelity, shape accuracy (same samples): base 0.900 -> trained 0.875",
    ]


def test_figure_colours_one_per_method_key_across_settings():
    """B_sft and A_sft share a colour (same method), A_mapo takes B_mapo's, and no two different keys share
    one: as many colours as distinct keys (10 with the λ rows)."""
    from benchmarks.toy_style.figures import colour_slots

    slots = colour_slots(METHODS)
    assert slots["A_sft"] == slots["B_sft"] and slots["A_mapo"] == slots["B_mapo"]
    assert slots["A_mapo"] != slots["B_dpo_ta"]
    assert len(set(slots.values())) == len({m.key for m in METHODS}) == 10
