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

logger = logging.getLogger(__name__)

#: Environment every Ray worker of ours gets: no hub access at run time, quiet progress bars.
WORKER_ENV = {
    "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
    "TOKENIZERS_PARALLELISM": "false",
    # an unreachable MLflow server must cost seconds per attempt, not minutes of HTTP back-off
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1"),
    "MLFLOW_HTTP_REQUEST_TIMEOUT": os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "10"),
}


def ensure_ray(cfg: RunConfig) -> None:
    """Initialise Ray once per process according to ``cfg.ray`` (no-op when already connected)."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    env = {k: v for k, v in WORKER_ENV.items() if v}
    runtime_env = {"env_vars": env}
    if address and address != "local":
        logger.info("connecting to Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return
    num_cpus = cfg.ray.num_cpus or max(4, os.cpu_count() or 1)
    logger.info("starting a local Ray on 127.0.0.1 with %d logical CPUs", num_cpus)
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=cfg.ray.include_dashboard,
        dashboard_host="127.0.0.1",
        runtime_env=runtime_env,
        log_to_driver=True,
        configure_logging=True,
        logging_level=logging.WARNING,
    )
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
