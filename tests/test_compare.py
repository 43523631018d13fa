"""Tests for ``prefopt compare`` (ray_jobs.compare) on a real sqlite MLflow store with hand-made runs.

The store (built once per module) holds experiment ``cmp`` with three runs created in this order and
experiment ``other`` with one run. Histories are (step, value); the expected table values follow by hand:

=========  =============================  =====================  ====================  =============================
run        loss (min is best)             implicit_acc (max)     reward_margin (max)   kl/policy_init, kl/ref_init
=========  =============================  =====================  ====================  =============================
alpha      (1,.69) (2,.5) (3,.6)          (1,.25) (2,.75) (3,.5)  (1,-.1) (2,.3) (3,.2)  (1,0) (2,.01) (3,.02); —
           final .6, best .5              final .5, best .75     final .2, best .3     final .02; missing
beta       logged as (2,.4) (1,.7) (3,.45) (1,.5) (2,1.0)          (1,.1) (2,-.2)         (1,.05); (1,.03) (2,.04)
           -> by step: final .45, best .4 final 1.0, best 1.0     final -.2, best .1    final .05; final .04
gamma      (5,.3): final .3, best .3       —                      —                     —; —
=========  =============================  =====================  ====================  =============================

Params: alpha {loss.beta 500, train.lr 1e-4, model.family sd3}; beta = alpha but loss.beta 2000 plus extra=1;
gamma = alpha but train.lr 2e-4. Across all three: model.family is the same everywhere (dropped), extra has
one value among the runs that have it (dropped); loss.beta (500, 2000, 500) and train.lr (1e-4, 1e-4, 2e-4)
differ. Across alpha and gamma only train.lr differs.

All four are training runs (tag ``prefopt.command=train``). Experiment ``cmp`` also holds ``judge``, an
evaluation run (``prefopt.command=eval``, started last) with params model.family sd3 and eval.seeds "[0, 1]"
and one metric ``eval/base/outline_style/adoption_rate`` (1, 0.25): left out unless ``--all``/``command=None``;
with it, eval.seeds (only judge has it) still does not differ, and judge has none of the default metrics.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import pytest
from PIL import Image

from ray_jobs import cli
from ray_jobs import compare as cmp
from ray_jobs.compare import CompareError, build_table, compare, final_and_best, plot_filename


@pytest.fixture(autouse=True)
def _console_untouched(monkeypatch):
    """``cli.main`` runs in this process here: leave the test process's logging and environment alone."""
    monkeypatch.setattr(cli.console, "configure_console", lambda options: None)


def main(args: list[str]) -> int:
    """``prefopt compare ARGS`` in this process."""
    return cli.main(["compare", *args])


HISTORIES = {
    "alpha": {
        "loss": [(1, 0.69), (2, 0.5), (3, 0.6)],
        "implicit_acc": [(1, 0.25), (2, 0.75), (3, 0.5)],
        "reward_margin": [(1, -0.1), (2, 0.3), (3, 0.2)],
        "kl/policy_init": [(1, 0.0), (2, 0.01), (3, 0.02)],
    },
    "beta": {
        "loss": [(2, 0.4), (1, 0.7), (3, 0.45)],  # logged out of step order on purpose
        "implicit_acc": [(1, 0.5), (2, 1.0)],
        "reward_margin": [(1, 0.1), (2, -0.2)],
        "kl/policy_init": [(1, 0.05)],
        "kl/ref_init": [(1, 0.03), (2, 0.04)],
    },
    "gamma": {"loss": [(5, 0.3)]},
}
PARAMS = {
    "alpha": {"loss.beta": "500", "train.lr": "1e-4", "model.family": "sd3"},
    "beta": {"loss.beta": "2000", "train.lr": "1e-4", "model.family": "sd3", "extra": "1"},
    "gamma": {"loss.beta": "500", "train.lr": "2e-4", "model.family": "sd3"},
}
STATUS = {"alpha": "FINISHED", "beta": "FINISHED", "gamma": "FAILED"}
TRAIN_TAGS = {"prefopt.command": "train"}

# final, best for metrics with a direction; final only for the KL metrics (None = missing)
EXPECTED = {
    "alpha": {
        "loss final": 0.6, "loss best(min)": 0.5,
        "implicit_acc final": 0.5, "implicit_acc best(max)": 0.75,
        "reward_margin final": 0.2, "reward_margin best(max)": 0.3,
        "kl/policy_init final": 0.02, "kl/ref_init final": None,
    },
    "beta": {
        "loss final": 0.45, "loss best(min)": 0.4,
        "implicit_acc final": 1.0, "implicit_acc best(max)": 1.0,
        "reward_margin final": -0.2, "reward_margin best(max)": 0.1,
        "kl/policy_init final": 0.05, "kl/ref_init final": 0.04,
    },
    "gamma": {
        "loss final": 0.3, "loss best(min)": 0.3,
        "implicit_acc final": None, "implicit_acc best(max)": None,
        "reward_margin final": None, "reward_margin best(max)": None,
        "kl/policy_init final": None, "kl/ref_init final": None,
    },
}  # fmt: skip
METRIC_COLUMNS = list(EXPECTED["alpha"])


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """A sqlite MLflow store with the runs of the module docstring; returns uri and run ids by name."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("cmp")
    ids = {}
    for i, name in enumerate(["alpha", "beta", "gamma"]):
        run = client.create_run(exp, run_name=name, start_time=1_000 + i, tags=TRAIN_TAGS)
        ids[name] = run.info.run_id
        for key, value in PARAMS[name].items():
            client.log_param(run.info.run_id, key, value)
        for metric, history in HISTORIES[name].items():
            for j, (step, value) in enumerate(history):
                client.log_metric(run.info.run_id, metric, value, timestamp=10_000 + j, step=step)
        client.set_terminated(run.info.run_id, status=STATUS[name])
    judge = client.create_run(exp, run_name="judge", start_time=2_000, tags={"prefopt.command": "eval"})
    ids["judge"] = judge.info.run_id
    client.log_param(ids["judge"], "model.family", "sd3")
    client.log_param(ids["judge"], "eval.seeds", "[0, 1]")
    client.log_metric(ids["judge"], "eval/base/outline_style/adoption_rate", 0.25, step=1)
    client.set_terminated(ids["judge"])
    other = client.create_experiment("other")
    ids["delta"] = client.create_run(other, run_name="delta", tags=TRAIN_TAGS).info.run_id
    return {"uri": uri, "ids": ids, "root": root}


def _row_by_name(table) -> dict[str, dict]:
    return {r["run"]: r for r in table.rows}


# ------------------------------------------------------------------------------------------- pure helpers
def test_final_and_best_hand_examples():
    """``[(1, .2), (2, .9), (3, .5)]``: final .5; max .9; min .2; no direction -> best None; NaN is skipped."""
    h = [(1, 0.2), (2, 0.9), (3, 0.5)]
    assert final_and_best(h, "max") == (0.5, 0.9)
    assert final_and_best(h, "min") == (0.5, 0.2)
    assert final_and_best(h, None) == (0.5, None)
    assert final_and_best([(1, math.nan), (2, 0.4)], "max") == (0.4, 0.4)
    with pytest.raises(ValueError, match="valid: max, min"):
        final_and_best(h, "median")  # type: ignore[arg-type]


def test_plot_filename_replaces_slashes():
    assert plot_filename("kl/policy_init") == "kl_policy_init.png"
    assert plot_filename("eval/base/clip score/mean") == "eval_base_clip_score_mean.png"


def test_build_table_single_run_has_no_differing_params():
    """One run: every param trivially agrees with itself, so no params.* column appears."""
    run = cmp.RunInfo("abcdef0123456789", "solo", "FINISHED", {"a": "1"})
    table = build_table([run], {run.run_id: {"loss": [(0, 1.0)]}}, ["loss"])
    assert table.columns == ["run", "id", "status", "loss final", "loss best(min)"]
    assert table.rows == [
        {"run": "solo", "id": "abcdef01", "status": "FINISHED", "loss final": 1.0, "loss best(min)": 1.0}
    ]


# ------------------------------------------------------------------------------------------- against MLflow
def test_table_values_exact(store, tmp_path):
    result = compare(store["uri"], experiment="cmp", out_dir=tmp_path)
    table = result.table
    assert [r["run"] for r in table.rows] == ["alpha", "beta", "gamma"]  # start-time order
    assert table.columns == [
        "run", "id", "status", *METRIC_COLUMNS, "params.loss.beta", "params.train.lr"
    ]  # fmt: skip
    rows = _row_by_name(table)
    for name, expected in EXPECTED.items():
        assert {c: rows[name][c] for c in METRIC_COLUMNS} == expected, name
        assert rows[name]["id"] == store["ids"][name][:8]
        assert rows[name]["status"] == STATUS[name]
    assert any("alpha" in n and "'kl/ref_init'" in n for n in table.notes)
    assert sum("gamma" in n for n in table.notes) == 4  # implicit_acc, reward_margin, both KLs
    assert table.notes[0] == "left out 1 eval run (--command eval or --all to include)"


def test_differing_params_selection(store, tmp_path):
    table = compare(store["uri"], experiment="cmp", out_dir=tmp_path).table
    assert table.differing_params == ["loss.beta", "train.lr"]  # model.family the same, extra only in beta
    rows = _row_by_name(table)
    assert [rows[n]["params.loss.beta"] for n in ("alpha", "beta", "gamma")] == ["500", "2000", "500"]
    assert [rows[n]["params.train.lr"] for n in ("alpha", "beta", "gamma")] == ["1e-4", "1e-4", "2e-4"]


def test_markdown_and_csv_parse_back(store, tmp_path):
    result = compare(store["uri"], experiment="cmp", fmt="markdown", out_dir=tmp_path)
    md_lines = (tmp_path / "compare.md").read_text().strip().splitlines()
    assert result.text == "\n".join(md_lines)
    header = [c.strip() for c in md_lines[0].strip("|").split("|")]
    assert header == result.table.columns
    assert set(md_lines[1].strip("|").split("|")) == {"---"}
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in md_lines[2:]]
    beta = dict(zip(header, cells[1]))
    assert beta["loss final"] == "0.45" and beta["reward_margin final"] == "-0.2"
    assert dict(zip(header, cells[0]))["kl/ref_init final"] == "-"  # missing -> dash

    parsed = list(csv.DictReader(io.StringIO((tmp_path / "compare.csv").read_text())))
    assert [r["run"] for r in parsed] == ["alpha", "beta", "gamma"]
    for row in parsed:
        for col, value in EXPECTED[row["run"]].items():
            assert (None if row[col] == "" else float(row[col])) == value, (row["run"], col)
    assert [r["params.loss.beta"] for r in parsed] == ["500", "2000", "500"]


def test_pngs_are_valid_images(store, tmp_path):
    result = compare(store["uri"], experiment="cmp", metrics=["reward_margin", "kl/ref_init", "nope"],
                     out_dir=tmp_path)  # fmt: skip
    assert sorted(p.name for p in result.plots) == ["kl_ref_init.png", "reward_margin.png"]
    for path in result.plots:
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (640, 400)
            im.verify()
    assert not (tmp_path / "nope.png").exists()
    assert "no run has metric 'nope': no plot" in result.table.notes


def test_unknown_format_lists_valid_ones(store, tmp_path, capsys):
    with pytest.raises(CompareError, match="valid formats: table, markdown, csv"):
        compare(store["uri"], experiment="cmp", fmt="html", out_dir=tmp_path)
    assert main(["--tracking-uri", store["uri"], "--experiment", "cmp", "--format", "html"]) == 2
    assert "unknown format 'html'; valid formats: table, markdown, csv" in capsys.readouterr().err


def test_explicit_run_ids_via_cli(store, tmp_path, capsys):
    """alpha and gamma only, in the order given: only train.lr differs between them."""
    ids = store["ids"]
    argv = ["--tracking-uri", store["uri"], "--runs", ids["gamma"], ids["alpha"], "--format", "csv",
            "--metrics", "loss", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    rows = list(csv.DictReader(io.StringIO(captured.out)))  # stdout is exactly the CSV
    assert "compare.csv" in captured.err
    assert [r["run"] for r in rows] == ["gamma", "alpha"]
    assert list(rows[0]) == ["run", "id", "status", "loss final", "loss best(min)", "params.train.lr"]
    assert [float(r["loss final"]) for r in rows] == [0.3, 0.6]
    assert (tmp_path / "loss.png").is_file() and (tmp_path / "compare.csv").is_file()


def test_missing_experiment_is_a_clear_error(store, capsys):
    assert main(["--tracking-uri", store["uri"], "--experiment", "nope"]) == 2
    err = capsys.readouterr().err
    assert "experiment 'nope' does not exist" in err and "'cmp'" in err and "'other'" in err


def test_unknown_run_id_and_run_outside_experiment(store):
    with pytest.raises(CompareError, match="run id 'deadbeef' not found"):
        compare(store["uri"], run_ids=["deadbeef"])
    with pytest.raises(CompareError, match="is not in experiment 'cmp'"):
        compare(store["uri"], experiment="cmp", run_ids=[store["ids"]["delta"]])


def test_no_tracking_uri_says_what_to_pass(monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["--experiment", "cmp"]) == 2
    err = capsys.readouterr().err
    assert "--tracking-uri" in err and "CONFIG.yaml" in err and "MLFLOW_TRACKING_URI" in err


def test_uri_and_experiment_from_config_default_out_dir(store, tmp_path, monkeypatch, capsys):
    """A config supplies tracking.uri and tracking.experiment; without --out, <cwd>/compare_cmp is used."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = tmp_path / "c.yaml"
    config.write_text(f"tracking:\n  uri: {store['uri']}\n  experiment: other\n")
    monkeypatch.chdir(tmp_path)
    assert main([str(config), "tracking.experiment=cmp", "--format", "table"]) == 0  # override wins
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["run", "id", "status"]
    assert (tmp_path / "compare_cmp" / "compare.md").is_file()
    assert (tmp_path / "compare_cmp" / "reward_margin.png").is_file()


def test_env_uri_used_without_config(store, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    assert main(["--experiment", "other", "--out", str(tmp_path)]) == 0
    assert Path(tmp_path / "compare.csv").read_text().splitlines()[1].startswith("delta,")


def test_filter_string_selects_runs(store, tmp_path):
    """``params.`loss.beta` = '500'`` keeps alpha and gamma (beta has 2000); between them only train.lr differs."""
    result = compare(
        store["uri"], experiment="cmp", filter_string="params.`loss.beta` = '500'", out_dir=tmp_path
    )
    assert [r["run"] for r in result.table.rows] == ["alpha", "gamma"]
    assert result.table.differing_params == ["train.lr"]
    with pytest.raises(CompareError, match="has no runs matching"):
        compare(store["uri"], experiment="cmp", filter_string="params.`loss.beta` = '1'", out_dir=tmp_path)


# ------------------------------------------------------------------------------------------- one command
def test_all_mixes_commands_and_params_differ_only_among_runs_that_have_them(store, tmp_path):
    """With judge (eval) in: eval.seeds is judge's alone and model.family is sd3 in all four, so the
    differing params stay loss.beta and train.lr; judge's loss cells are empty."""
    table = compare(store["uri"], experiment="cmp", out_dir=tmp_path, command=None).table
    assert [r["run"] for r in table.rows] == ["alpha", "beta", "gamma", "judge"]
    assert table.differing_params == ["loss.beta", "train.lr"]
    judge = _row_by_name(table)["judge"]
    assert judge["loss final"] is None and judge["params.loss.beta"] is None


def test_command_selects_the_evaluation_runs(store, tmp_path):
    result = compare(store["uri"], experiment="cmp", out_dir=tmp_path, command="eval",
                     metrics=["eval/base/outline_style/adoption_rate"])  # fmt: skip
    assert [r["run"] for r in result.table.rows] == ["judge"]
    assert result.table.rows[0]["eval/base/outline_style/adoption_rate final"] == 0.25
    assert result.table.notes[0] == "left out 3 train runs (--command train or --all to include)"


def test_no_runs_of_the_command_says_what_is_there(store, tmp_path):
    with pytest.raises(CompareError, match=r"no online runs; left out 1 eval run .*; left out 3 train runs"):
        compare(store["uri"], experiment="cmp", out_dir=tmp_path, command="online")


def test_explicit_runs_of_two_commands_need_all(store, tmp_path, capsys):
    ids = [store["ids"]["alpha"], store["ids"]["judge"]]
    args = ["--tracking-uri", store["uri"], "--runs", *ids, "--out", str(tmp_path), "--format", "csv"]
    assert main(args) == 2
    assert "made by different commands (eval, train); pass --all" in capsys.readouterr().err
    assert main([*args, "--all"]) == 0
    assert [r["run"] for r in csv.DictReader(io.StringIO(capsys.readouterr().out))] == ["alpha", "judge"]
