"""``prefopt <command> [CONFIG.yaml] [dotted.key=value ...]``

Commands: demo, cache, regenerate, train, online, eval, compare. Every command validates the whole
config before it starts, ends by writing ``<workdir>/<command>_summary.json`` and prints it as a table.
Each also runs as ``python -m ray_jobs.<module>``, so ``ray job submit --working-dir . -- prefopt train
configs/x.yaml`` works on any cluster (``RAY_ADDRESS`` or ``ray.address=...``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefopt_core.config import ConfigError, RunConfig, load_config

logger = logging.getLogger("prefopt")

COMMANDS = ("demo", "cache", "regenerate", "train", "online", "eval", "compare", "plan")


def _split_args(args: list[str]) -> tuple[str | None, list[str]]:
    config, overrides = None, []
    for a in args:
        if "=" in a:
            overrides.append(a)
        elif config is None and (a.endswith((".yaml", ".yml")) or Path(a).is_file()):
            config = a
        else:
            raise ConfigError(f"unexpected argument {a!r}: expected CONFIG.yaml or dotted.key=value")
    return config, overrides


def _print_table(title: str, summary: dict[str, Any]) -> None:
    rows = []
    for k, v in summary.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                rows.append((f"{k}.{kk}", vv))
        else:
            rows.append((k, v))
    width = max((len(k) for k, _ in rows), default=0)
    lines = [f"== prefopt {title} =="]
    for k, v in rows:
        value = f"{v:.6g}" if isinstance(v, float) else str(v)
        lines.append(f"  {k.ljust(width)}  {value}")
    print("\n".join(lines), flush=True)  # the CLI's own output, not library logging


def _cmd_cache(cfg: RunConfig) -> dict[str, Any]:
    from ray_jobs.cache import run_cache

    return run_cache(cfg)


def _cmd_train(cfg: RunConfig) -> dict[str, Any]:
    from ray_jobs.training.driver import run_training

    return vars(run_training(cfg))


def _cmd_demo(cfg: RunConfig) -> dict[str, Any]:
    from ray_jobs.demo import run_demo

    return run_demo(cfg)


def _lazy(module: str, func: str) -> Callable[[RunConfig], dict[str, Any]]:
    def run(cfg: RunConfig) -> dict[str, Any]:
        import importlib

        return getattr(importlib.import_module(module), func)(cfg)

    return run


HANDLERS: dict[str, Callable[[RunConfig], dict[str, Any]]] = {
    "demo": _cmd_demo,
    "cache": _cmd_cache,
    "train": _cmd_train,
    "regenerate": _lazy("ray_jobs.regenerate", "run_regenerate"),
    "online": _lazy("ray_jobs.online_loop", "run_online"),
    "eval": _lazy("ray_jobs.evaluate", "run_eval"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="prefopt", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("args", nargs=argparse.REMAINDER, help="[CONFIG.yaml] [dotted.key=value ...]")
    ns = parser.parse_args([*argv[:1], "--", *argv[1:]] if argv[1:] else argv)
    args = [a for a in ns.args if a != "--"]
    logging.basicConfig(
        level=os.environ.get("PREFOPT_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # fail fast when the server is down
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    if ns.command == "plan":
        from ray_jobs.memory_plan import main as plan_main

        return plan_main(args)
    if ns.command == "compare":
        from ray_jobs.compare import main as compare_main

        return compare_main(args)
    try:
        config_path, overrides = _split_args(args)
        if ns.command == "demo" and config_path is None:
            from ray_jobs.demo import DEMO_CONFIG

            config_path = str(DEMO_CONFIG)
        cfg = load_config(config_path, overrides)
    except (ConfigError, FileNotFoundError) as err:
        print(f"prefopt {ns.command}: {err}", file=sys.stderr)
        return 2
    summary = HANDLERS[ns.command](cfg)
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    out = cfg.workdir / f"{ns.command}_summary.json"
    out.write_text(json.dumps(summary, indent=1, default=str))
    _print_table(ns.command, summary)
    print(f"summary written to {out}", flush=True)
    if "adoption_rate_before" in summary:
        print(
            f"style adoption rate (held-out prompts without the style word): base "
            f"{summary['adoption_rate_before']:.3f} -> trained {summary['adoption_rate_after']:.3f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
