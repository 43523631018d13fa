"""``prefopt [--quiet|--verbose] [--log-format text|json] [--debug] COMMAND [CONFIG.yaml] [dotted.key=value ...]``

The one entry point of every command (also ``python -m ray_jobs`` and ``python -m ray_jobs.cli``): it
parses the arguments, configures the console (``ray_jobs.console``), loads and checks the config
(``ray_jobs.preflight``), starts Ray for the commands that use it, runs the command, writes
``<workdir>/<command>_summary.json`` and prints the summary. ``COMMANDS`` is the one table of what each
command does, which config sections it reads (its ``--help`` lists their keys from the schema) and which
function runs it; the command modules never import this one.

Exit status: 0 done; 2 a user error (bad argument, malformed or invalid config, missing input,
unreachable tracking server), printed as one line (``--debug`` adds the traceback); anything else is a
bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Any

import yaml

from pipelines.cache_format import CacheMismatchError
from pipelines.sharded_build import PlanMismatchError
from prefopt_core.config import ConfigError, RunConfig
from ray_jobs import compare, config_help, console, memory_plan, preflight, timestep_report
from ray_jobs.compare import CompareError

#: Sections every Ray command reads.
_BASE = ("run", "ray", "model")
_TRAINING = ("loss", "reference", "timesteps", "train", "tracking")


@dataclass(frozen=True)
class Command:
    """One ``prefopt`` command: its one-line summary, the config sections it reads, the function that runs
    it (``"module:function"``, taking a RunConfig and returning the summary) and optionally one that makes
    the closing lines of its output from the summary."""

    name: str
    summary: str
    sections: tuple[str, ...]
    target: str | None = None
    closing: str | None = None


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command(
            "demo",
            "the whole path once on the toy testbed: latent cache, DPO training, export, and the style "
            "adoption rate before -> after",
            (*_BASE, "data", "cache", *_TRAINING, "eval"),
            "ray_jobs.demo:run_demo",
            "ray_jobs.demo:outcome_lines",
        ),
        Command(
            "cache",
            "build (or finish) the latent cache of a dataset of preference pairs",
            (*_BASE, "data", "cache", "reference", "timesteps"),
            "ray_jobs.cache:run_cache",
        ),
        Command(
            "regenerate",
            "generate a preference dataset with a base model (chosen vs rejected prompt templates)",
            (*_BASE, "regenerate"),
            "ray_jobs.regenerate:run_regenerate",
        ),
        Command(
            "train",
            "train on a latent cache with Ray Train + DeepSpeed (DPO, MaPO, SFT, KTO), log to MLflow, export",
            (*_BASE, "cache", *_TRAINING),
            "ray_jobs.training.driver:run_training",
        ),
        Command(
            "online",
            "online rounds: sample with the policy, score, keep best vs worst pairs, train on them",
            (*_BASE, *_TRAINING, "online"),
            "ray_jobs.online_loop:run_online",
        ),
        Command(
            "eval",
            "score exported models against the base model on prompts x seeds (paired), log to MLflow",
            ("run", "model", "eval", "tracking"),
            "ray_jobs.evaluate:run_eval",
        ),
        Command(
            "compare",
            "compare MLflow runs of one command: final/best metrics, differing params, plots",
            ("tracking",),
        ),
        Command(
            "plan",
            "estimate per-worker memory and throughput of a config's training on GPUs, offline (meta device)",
            ("model", "loss", "reference", "train"),
        ),
        Command(
            "timesteps",
            "the shape of each timestep weight lambda(t) over a config's training timesteps, its gamma bins' "
            "sigma ranges; --calibrate RUN_ID writes the table of lambda=calibrated",
            ("model", "loss", "timesteps", "tracking"),
        ),
        Command(
            "config",
            "print the resolved config (file + overrides + defaults) as YAML: config show CONFIG",
            config_help.all_sections(),
        ),
    )
}


class UserError(Exception):
    """A command-line mistake that is not about the config (e.g. an unexpected argument)."""


#: Errors that are the user's to fix: one line and exit status 2.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    preflight.PreflightError,
    CompareError,
    UserError,
    PlanMismatchError,
    CacheMismatchError,
)


# ------------------------------------------------------------------------------------------- arguments
def _global_flags(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """The global flags; on subcommands with SUPPRESSed defaults so they may also follow the command."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--quiet", action="store_true", default=default(False), help="no progress lines")
    parser.add_argument(
        "--verbose",
        action="store_true",
        default=default(False),
        help="every INFO log on the console, Ray's and the workers' included",
    )
    parser.add_argument(
        "--log-format",
        choices=console.LOG_FORMATS,
        default=default("text"),
        help="text lines, or one JSON object per line (default text)",
    )
    parser.add_argument(
        "--debug", action="store_true", default=default(False), help="show the traceback of user errors too"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefopt",
        description="Preference optimisation (Diffusion-DPO, MaPO, KTO, SFT) of diffusers text-to-image models "
        "on Ray. `prefopt COMMAND --help` lists the config keys a command reads.",
    )
    _global_flags(parser, suppress=False)
    sub = parser.add_subparsers(dest="command_name", required=True, metavar="COMMAND")
    for cmd in COMMANDS.values():
        p = sub.add_parser(
            cmd.name,
            help=cmd.summary,
            description=cmd.summary,
            epilog=config_help.sections_help(cmd.sections),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _global_flags(p, suppress=True)
        if cmd.name == "compare":
            compare.add_arguments(p)
            continue
        if cmd.name == "plan":
            memory_plan.add_arguments(p)
            continue
        if cmd.name == "timesteps":
            timestep_report.add_arguments(p)
            continue
        if cmd.name == "config":
            p.add_argument("action", choices=["show"], help="show: print the resolved config as YAML")
        p.add_argument(
            "args",
            nargs="*",
            metavar="[CONFIG.yaml] [dotted.key=value]",
            help="a config file and/or overrides of its keys",
        )
    return parser


def split_args(args: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG.yaml] [dotted.key=value ...]`` -> ``(config path or None, overrides)``."""
    config, overrides = None, []
    for a in args:
        if "=" in a:
            overrides.append(a)
        elif config is None:
            config = a
        else:
            raise UserError(
                f"unexpected argument {a!r}: expected one CONFIG.yaml and dotted.key=value overrides"
            )
    return config, overrides


# ------------------------------------------------------------------------------------------- running
def _call(target: str, *args: Any) -> Any:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)(*args)


def _print_table(title: str, summary: dict[str, Any]) -> None:
    rows = []
    for k, v in summary.items():
        if isinstance(v, dict):
            rows += [(f"{k}.{kk}", vv) for kk, vv in v.items()]
        else:
            rows.append((k, v))
    width = max((len(k) for k, _ in rows), default=0)
    lines = [f"== prefopt {title} =="]
    lines += [f"  {k.ljust(width)}  {f'{v:.6g}' if isinstance(v, float) else v}" for k, v in rows]
    print("\n".join(lines), flush=True)


def load_run_config(cmd: Command, args: list[str]) -> RunConfig:
    """The checked config of ``cmd`` (the demo's own config when none is given)."""
    path, overrides = split_args(args)
    if cmd.name == "demo" and path is None:
        from ray_jobs.demo import DEMO_CONFIG

        path = str(DEMO_CONFIG)
    cfg = preflight.load_user_config(path, overrides)
    preflight.check_inputs(cfg, cmd.sections)
    return cfg


def run_command(cmd: Command, cfg: RunConfig, options: console.ConsoleOptions) -> dict[str, Any]:
    """Start Ray if the command uses it, run the command, stop Ray (so nothing it says comes after the
    summary), return the summary."""
    from ray_jobs.cluster import ensure_ray, shutdown_ray

    if "ray" in cmd.sections:
        ensure_ray(cfg, verbose=options.verbose)
    try:
        result = _call(cmd.target, cfg)
    finally:
        shutdown_ray()
    return dataclasses.asdict(result) if dataclasses.is_dataclass(result) else result


def report(cmd: Command, cfg: RunConfig, summary: dict[str, Any], options: console.ConsoleOptions) -> None:
    """Write the summary file, then print the summary (a table, or one JSON line) and the closing lines."""
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    out = cfg.workdir / f"{cmd.name}_summary.json"
    out.write_text(json.dumps(summary, indent=1, default=str))
    closing = _call(cmd.closing, summary) if cmd.closing else []
    log_file = cfg.scratch_dir / console.LOG_FILE  # a log is appended to: always on this node's disk
    if options.log_format == "json":
        record = {
            "command": cmd.name,
            "summary": summary,
            "summary_file": str(out),
            "log_file": str(log_file),
        }
        print(json.dumps({**record, "closing": closing}, default=str), flush=True)
        return
    _print_table(cmd.name, summary)
    print(f"summary written to {out}; full log in {log_file}", flush=True)
    for line in closing:
        print(line, flush=True)


def _dispatch(ns: argparse.Namespace, options: console.ConsoleOptions) -> int:
    cmd = COMMANDS[ns.command_name]
    if cmd.name == "compare":
        return compare.run(ns)
    if cmd.name == "plan":
        return memory_plan.run(ns)
    if cmd.name == "timesteps":
        return timestep_report.run(ns)
    cfg = load_run_config(cmd, ns.args)
    if cmd.name == "config":
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip("\n"), flush=True)
        return 0
    console.attach_log_file(cfg.scratch_dir, options.log_format)
    report(cmd, cfg, run_command(cmd, cfg, options), options)
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; config files and overrides may come before, between or after the flags."""
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    positional = {"compare": "config", "plan": "overrides", "timesteps": "overrides"}.get(ns.command_name, "args")
    setattr(ns, positional, [*getattr(ns, positional), *extra])
    return ns


def main(argv: list[str] | None = None) -> int:
    ns = parse(sys.argv[1:] if argv is None else argv)
    options = console.ConsoleOptions(
        quiet=ns.quiet, verbose=ns.verbose, log_format=ns.log_format, debug=ns.debug
    )
    console.configure_console(options)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return _dispatch(ns, options)
    except USER_ERRORS as err:
        if options.debug:
            traceback.print_exc()
        console.report_error(ns.command_name, str(err), options)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
