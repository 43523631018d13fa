"""``prefopt`` as a user runs it (subprocesses): help from the schema, one-line user errors with exit
status 2, ``config show``. None of these start Ray: every error is caught before anything starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from prefopt_core.config import RunConfig
from ray_jobs.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]


def prefopt(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m ray_jobs ARGS`` with this checkout's code, output captured."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, "-m", "ray_jobs", *args],
        cwd=cwd or ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def keys_of(section: str) -> list[str]:
    """Dotted keys of a config section, nested sections flattened (``data.synthetic.num_pairs``)."""
    model = RunConfig.model_fields[section].annotation
    out = []
    for name, field in model.model_fields.items():
        nested = getattr(field.annotation, "model_fields", None)
        out += (
            [f"{section}.{name}.{k}" for k in nested] if isinstance(nested, dict) else [f"{section}.{name}"]
        )
    return out


def assert_user_error(done: subprocess.CompletedProcess, *fragments: str, one_line: bool = True) -> None:
    """Exit status 2, no traceback, one line on stderr (the schema's validation errors: one line per
    invalid key) naming every fragment."""
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 or not one_line, done.stderr
    for fragment in fragments:
        assert fragment in done.stderr, (fragment, done.stderr)


# ------------------------------------------------------------------------------------------- help
def test_top_level_help_says_what_each_command_does():
    done = prefopt("--help")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())  # argparse wraps the summaries
    for cmd in COMMANDS.values():
        assert f"{cmd.name} {' '.join(cmd.summary.split())}" in text, cmd.name


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_command_help_lists_the_keys_it_reads(command):
    """Every key of every section the command reads is listed as ``key: type = default``; keys of the
    sections it does not read are not."""
    done = prefopt(command, "--help")
    assert done.returncode == 0, done.stderr
    lines = {line.split(":")[0].strip() for line in done.stdout.splitlines() if ": " in line}
    sections = COMMANDS[command].sections
    for section in sections:
        for key in keys_of(section):
            assert key in lines, (command, key)
    for section in set(RunConfig.model_fields) - set(sections):
        assert not any(line.startswith(f"{section}.") for line in lines), (command, section)


def test_help_shows_type_default_and_description_from_the_schema():
    """train.max_steps is ``int``, default 20, described as "Optimizer steps." (prefopt_core/config.py);
    train.zero_stage is ``Literal[0, 1, 2, 3]`` with default 2."""
    out = prefopt("train", "--help").stdout.splitlines()
    i = out.index("  train.max_steps: int = 20")
    assert out[i + 1].strip() == "Optimizer steps."
    assert "  train.zero_stage: 0|1|2|3 = 2" in out


def test_same_entry_as_console_script_and_cli_module():
    """``prefopt``, ``python -m ray_jobs`` and ``python -m ray_jobs.cli`` print the same help."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    via_cli = subprocess.run(
        [sys.executable, "-m", "ray_jobs.cli", "--help"], env=env, capture_output=True, text=True, cwd=ROOT
    )
    assert via_cli.returncode == 0 and via_cli.stdout == prefopt("--help").stdout


# ------------------------------------------------------------------------------------------- config show
def test_config_show_prints_the_resolved_config(tmp_path):
    """The file sets run.name, the override train.max_steps; the rest are schema defaults (loss.name dpo)."""
    config = tmp_path / "c.yaml"
    config.write_text("run:\n  name: shown\n")
    done = prefopt("config", "show", str(config), "train.max_steps=7", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    shown = yaml.safe_load(done.stdout)
    assert shown["run"]["name"] == "shown" and shown["train"]["max_steps"] == 7
    assert shown["loss"]["name"] == "dpo"
    assert shown["run"]["workdir"] == str(tmp_path / "prefopt_work")  # resolved against the cwd


# ------------------------------------------------------------------------------------------- user errors
def test_malformed_yaml_names_file_line_and_column(tmp_path):
    """``seed: [1`` never closes its flow sequence: the parser fails at the end of the file (line 4,
    column 1) and names where the sequence began: line 3, column 9 (the ``[``)."""
    config = tmp_path / "bad.yaml"
    config.write_text("run:\n  name: x\n  seed: [1\n")
    done = prefopt("train", str(config))
    assert_user_error(done, f"{config}, line 4, column 1: malformed YAML", "line 3, column 9")


def test_debug_shows_the_traceback(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("a: [\n")
    done = prefopt("--debug", "train", str(config))
    assert done.returncode == 2 and "Traceback" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"prefopt train: {config}, line 2")


def test_missing_config_file(tmp_path):
    assert_user_error(
        prefopt("train", str(tmp_path / "nope.yaml")), "config file", "nope.yaml does not exist"
    )


def test_malformed_override_value():
    assert_user_error(prefopt("config", "show", "train.max_steps=["), "override 'train.max_steps=['")


def test_invalid_combination():
    """sft is reference-free, the default reference.strategy is frozen: a ConfigError from the schema."""
    done = prefopt("train", "loss.name=sft")
    assert_user_error(
        done, "prefopt train: invalid config", "loss.name=sft is reference-free", one_line=False
    )


def test_missing_data_source(tmp_path):
    missing = tmp_path / "pairs.parquet"
    assert_user_error(prefopt("cache", f"data.source={missing}"), f"data.source {missing} does not exist")


def test_glob_matching_nothing(tmp_path):
    assert_user_error(prefopt("cache", f"data.source={tmp_path}/*.parquet"), "no file matches this glob")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads every file")
def test_unreadable_data_source(tmp_path):
    source = tmp_path / "pairs.parquet"
    source.write_bytes(b"")
    source.chmod(0)
    assert_user_error(prefopt("cache", f"data.source={source}"), "exists but cannot be read")


def test_missing_prompt_file(tmp_path):
    missing = tmp_path / "prompts.txt"
    assert_user_error(prefopt("eval", f"eval.prompts={missing}"), f"eval.prompts {missing} does not exist")


def test_missing_timestep_weight_calibration(tmp_path):
    missing = tmp_path / "calibration.json"
    assert_user_error(
        prefopt("train", "loss.timestep_weight=calibrated", f"loss.timestep_weight_calibration={missing}"),
        f"loss.timestep_weight_calibration {missing} does not exist",
    )


def test_unreachable_tracking_server_before_anything_starts(tmp_path):
    """Nothing listens on port 9 of 127.0.0.1 (discard; closed here): the connection is refused at once.
    The message says how to run anyway; no workdir is made, since nothing started."""
    workdir = tmp_path / "w"
    done = prefopt("train", "tracking.uri=http://127.0.0.1:9", f"run.workdir={workdir}")
    assert_user_error(
        done, "MLflow tracking server at http://127.0.0.1:9 does not answer", "tracking.require_server=false"
    )
    assert not workdir.exists()


def test_unexpected_argument():
    assert_user_error(prefopt("train", "a.yaml", "b.yaml"), "unexpected argument 'b.yaml'")


def test_json_log_format_errors_are_json(tmp_path):
    done = prefopt("--log-format", "json", "train", str(tmp_path / "nope.yaml"))
    assert done.returncode == 2
    record = json.loads(done.stderr)
    assert record["level"] == "ERROR" and record["command"] == "train"
    assert record["message"].endswith("nope.yaml does not exist")


def _summary_of(cfg: RunConfig) -> dict:
    return {"workdir": str(cfg.workdir)}


def test_command_run_in_process_leaves_the_callers_ray_running(ray_cluster, tmp_path):
    """A caller that already runs Ray (a notebook, a test session, a script running several commands) gets
    it back running: the CLI stops only a Ray it started itself."""
    from prefopt_core.config import load_config
    from ray_jobs.cli import Command, run_command
    from ray_jobs.console import ConsoleOptions

    cmd = Command(
        "probe", "a command that reads the ray section", ("run", "ray"), "tests.test_cli:_summary_of"
    )
    cfg = load_config(None, [f"run.workdir={tmp_path}"])
    assert run_command(cmd, cfg, ConsoleOptions()) == {"workdir": str(tmp_path)}
    assert ray_cluster.is_initialized()
