"""Connecting to Ray: an existing cluster (``ray.address`` / ``RAY_ADDRESS``) or a local one on 127.0.0.1.

The local default is sized for small machines: Ray gets ``max(4, cores)`` *logical* CPUs so that the
training workers' CPUs never leave Ray Data without a slot (on 2 physical cores, 2 workers x 1 CPU would
otherwise take everything and reads would wait forever). The dashboard is off by default and, when on,
bound to 127.0.0.1: Ray's dashboard and job server execute code for whoever reaches them.
"""

from __future__ import annotations

import logging
import os

from prefopt_core.config import RunConfig
from ray_jobs.tracking import FAIL_FAST_ENV

logger = logging.getLogger(__name__)

#: Environment every Ray worker of ours gets: no hub access at run time, MLflow calls that fail fast.
WORKER_ENV = {
    "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
    "TOKENIZERS_PARALLELISM": "false",
    **{key: os.environ.get(key, value) for key, value in FAIL_FAST_ENV.items()},
}


def ensure_ray(cfg: RunConfig, *, verbose: bool = False) -> None:
    """Initialise Ray once per process according to ``cfg.ray`` (no-op when already connected).

    Quiet unless ``verbose``: the workers' output is not forwarded to this process, and Ray's loggers
    (below ERROR) and Ray Data's progress bars stay off the console. All of it is still in the Ray session logs
    (``<temp dir>/session_latest/logs``).
    """
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    env = {k: v for k, v in WORKER_ENV.items() if v}
    runtime_env = {"env_vars": env}
    level = logging.INFO if verbose else logging.ERROR
    if address and address != "local":
        logger.info("connecting to Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=verbose, logging_level=level)
    else:
        num_cpus = cfg.ray.num_cpus or max(4, os.cpu_count() or 1)
        logger.info("starting a local Ray on 127.0.0.1 with %d logical CPUs", num_cpus)
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=cfg.ray.include_dashboard,
            dashboard_host="127.0.0.1",
            runtime_env=runtime_env,
            log_to_driver=verbose,
            configure_logging=True,
            logging_level=level,
        )
    configure_data_context(verbose=verbose)


def configure_data_context(*, verbose: bool = False) -> None:
    """This process's Ray Data settings: blocks in order (results are reproducible run to run), progress
    bars and logs below ERROR on the console only when ``verbose`` (Ray Data's log file keeps them)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = verbose
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler) and type(handler).__name__ != "SessionFileHandler":
            handler.setLevel(logging.INFO if verbose else logging.ERROR)


def ingest_options():
    """Ray Data execution options for Ray Train's dataset ingest (``DataConfig(execution_options=...)``):
    this process's options with blocks in order.

    Built field by field: ``DataConfig.default_ingest_options()`` passes the deprecated
    ``exclude_resources`` and so warns on every run.
    """
    from ray.data import DataContext, ExecutionOptions

    current = DataContext.get_current().execution_options
    return ExecutionOptions(
        resource_limits=current.resource_limits,
        preserve_order=True,
        verbose_progress=current.verbose_progress,
    )


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
