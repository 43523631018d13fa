"""MLflow tracking: one run per training run, resumed (not duplicated) on resume, never fatal.

The driver opens (or finds) the run before training starts and logs the resolved config; rank 0 of the
training workers logs metrics through a :class:`MetricBuffer` that batches them, retries when the
tracking server is unreachable, and spills what it could not send to ``<workdir>/mlflow_pending.jsonl``
so it can be replayed later (``replay_pending``). Training never dies because MLflow does.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RUN_KEY_TAG = "prefopt.run_key"


#: MLflow's HTTP client retries a refused request 7 times with exponential back-off (minutes per call), which
#: would stall a training step for as long whenever the server is down. prefopt buffers and retries itself
#: (:class:`MetricBuffer`), so each call fails fast unless the user set these variables.
FAIL_FAST_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def mlflow_client(uri: str):
    """An ``MlflowClient`` for ``uri`` whose HTTP calls fail fast (see ``FAIL_FAST_ENV``); every prefopt MLflow
    call goes through here."""
    from mlflow.tracking import MlflowClient

    for key, value in FAIL_FAST_ENV.items():
        os.environ.setdefault(key, value)
    return MlflowClient(tracking_uri=uri)


def default_artifact_location(uri: str) -> str | None:
    """``sqlite:///dir/mlflow.db`` -> ``file:///dir/mlartifacts``: next to the store, not ``./mlruns`` of
    whatever directory the process happens to run in (MLflow's default for database stores)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None


def ensure_experiment(uri: str, name: str) -> str:
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=default_artifact_location(uri))
    except Exception:  # created concurrently
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def find_or_create_run(
    uri: str,
    experiment: str,
    run_key: str,
    run_name: str,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
) -> tuple[str, bool]:
    """Return ``(run_id, resumed)``: the unfinished-or-finished run tagged ``run_key``, else a new one."""
    client = mlflow_client(uri)
    exp_id = ensure_experiment(uri, experiment)
    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id, True
    all_tags = {RUN_KEY_TAG: run_key, "mlflow.runName": run_name, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, tags=all_tags, run_name=run_name)
    return run.info.run_id, False


def final_metrics(uri: str, run_id: str, step_key: str = "loss") -> dict[str, float]:
    """The latest value of every metric of a run, and ``step``: the last step logged for ``step_key``. What
    a rerun of a finished training run reports, since it trains no step and its workers report no loss."""
    client = mlflow_client(uri)
    out = {k: float(v) for k, v in client.get_run(run_id).data.metrics.items()}
    steps = [m.step for m in client.get_metric_history(run_id, step_key)]
    if steps:
        out["step"] = float(max(steps))
    return out


def log_params_once(uri: str, run_id: str, params: dict[str, Any]) -> None:
    """Log params not yet on the run; a resumed run whose params changed keeps the old ones (MLflow params
    are immutable) and the difference is logged as a warning and recorded as tags."""
    from mlflow.entities import Param

    client = mlflow_client(uri)
    existing = client.get_run(run_id).data.params
    new, changed = [], {}
    for k, v in params.items():
        value = str(v)[:6000]
        if k not in existing:
            new.append(Param(k, value))
        elif existing[k] != value:
            changed[k] = value
    for i in range(0, len(new), 100):
        client.log_batch(run_id, params=new[i : i + 100])
    if changed:
        logger.warning(
            "resumed run %s with changed params (kept the old values): %s", run_id, sorted(changed)
        )
        for k, v in changed.items():
            client.set_tag(run_id, f"prefopt.changed_param.{k}", v[:5000])


def set_terminated(uri: str, run_id: str, status: str = "FINISHED") -> None:
    try:
        mlflow_client(uri).set_terminated(run_id, status=status)
    except Exception as exc:  # pragma: no cover - best effort
        logger.warning("could not mark MLflow run %s %s: %s", run_id, status, exc)


@dataclass(frozen=True)
class RunIdentity:
    """How to find (or create) a run when its id is not known yet (tracking server down at start)."""

    experiment: str
    run_key: str
    run_name: str
    tags: dict[str, str] = field(default_factory=dict)


class MetricBuffer:
    """Batched, retrying, spill-to-disk metric logging for one run (used on rank 0 only).

    ``run_id=None`` (the server was unreachable when training started): every flush first tries to find or
    create the run from ``identity``; values that cannot be sent are kept and, beyond ``max_buffer`` or at
    close, appended to ``pending_path`` with the run's identity so :func:`replay_pending` can send them.
    """

    def __init__(
        self,
        uri: str,
        run_id: str | None,
        pending_path: str | Path,
        *,
        identity: RunIdentity | None = None,
        flush_every: int = 10,
        max_buffer: int = 10_000,
    ) -> None:
        if run_id is None and identity is None:
            raise ValueError("MetricBuffer needs a run_id or a RunIdentity to create the run later")
        self.uri = uri
        self.run_id = run_id
        self.identity = identity
        self.pending_path = Path(pending_path)
        self.flush_every = flush_every
        self.max_buffer = max_buffer
        self._buffer: list[tuple[str, float, int, int]] = []  # (key, value, step, timestamp ms)
        self._since_flush = 0
        self._skip_through = -1

    def _ensure_run(self) -> str:
        if self.run_id is None:
            ident = self.identity
            self.run_id, _ = find_or_create_run(
                self.uri, ident.experiment, ident.run_key, ident.run_name, ident.tags
            )
            logger.info("MLflow reachable again: logging to run %s", self.run_id)
        return self.run_id

    def last_logged_step(self, key: str) -> int:
        """Largest step of ``key`` already in the run (-1 if none or unreachable)."""
        if self.run_id is None:
            return -1
        try:
            history = mlflow_client(self.uri).get_metric_history(self.run_id, key)
        except Exception as exc:
            logger.warning("could not read MLflow history of %s: %s", key, exc)
            return -1
        return max((m.step for m in history), default=-1)

    def skip_through(self, step: int) -> None:
        """Drop values for steps <= ``step`` (already logged before a failure, so each step appears once)."""
        self._skip_through = step

    def log(self, metrics: dict[str, float], step: int) -> None:
        if step <= self._skip_through:
            return
        ts = int(time.time() * 1000)
        for k, v in metrics.items():
            self._buffer.append((k, float(v), int(step), ts))
        self._since_flush += 1
        if self._since_flush >= self.flush_every:
            self.flush()

    def flush(self) -> bool:
        """Send what is buffered; on failure keep it (and spill beyond ``max_buffer``). True if all sent."""
        self._since_flush = 0
        if not self._buffer:
            return True
        from mlflow.entities import Metric

        try:
            run_id = self._ensure_run()
            client = mlflow_client(self.uri)
            while self._buffer:
                chunk = self._buffer[:1000]
                client.log_batch(run_id, metrics=[Metric(k, v, ts, s) for k, v, s, ts in chunk])
                del self._buffer[:1000]
            return True
        except Exception as exc:
            logger.warning(
                "MLflow unreachable (%s); keeping %d metric values for retry", exc, len(self._buffer)
            )
            if len(self._buffer) > self.max_buffer:
                self.spill()
            return False

    def spill(self) -> None:
        """Append everything buffered to the pending file (replayable with :func:`replay_pending`)."""
        if not self._buffer:
            return
        self.pending_path.parent.mkdir(parents=True, exist_ok=True)
        ident = asdict(self.identity) if self.identity else None
        with self.pending_path.open("a") as fh:
            for k, v, s, ts in self._buffer:
                row = {"run_id": self.run_id, "identity": ident, "key": k, "value": v, "step": s, "ts": ts}
                fh.write(json.dumps(row) + "\n")
        logger.warning(
            "spilled %d metric values to %s; send them later with `python -m ray_jobs.tracking replay %s --uri URI`",
            len(self._buffer),
            self.pending_path,
            self.pending_path,
        )
        self._buffer.clear()

    def close(self) -> None:
        if not self.flush():
            self.spill()


def replay_pending(uri: str, pending_path: str | Path) -> int:
    """Send spilled metrics to MLflow (creating runs that never reached the server); returns how many were
    sent. The file is removed once everything is sent."""
    from mlflow.entities import Metric

    path = Path(pending_path)
    if not path.exists():
        return 0
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    client = mlflow_client(uri)
    by_run: dict[str, list] = {}
    resolved: dict[str, str] = {}
    for r in rows:
        run_id = r.get("run_id")
        if run_id is None:
            ident = RunIdentity(**r["identity"])
            if ident.run_key not in resolved:
                resolved[ident.run_key], _ = find_or_create_run(
                    uri, ident.experiment, ident.run_key, ident.run_name, ident.tags
                )
            run_id = resolved[ident.run_key]
        by_run.setdefault(run_id, []).append(Metric(r["key"], r["value"], r["ts"], r["step"]))
    for run_id, metrics in by_run.items():
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i : i + 1000])
    path.unlink()
    return len(rows)


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    try:
        mlflow_client(uri).log_batch(
            run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()]
        )
    except Exception as exc:
        logger.warning("could not log metrics to MLflow: %s", exc)


def log_artifact(uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    try:
        mlflow_client(uri).log_artifact(run_id, str(path), artifact_path)
    except Exception as exc:
        logger.warning("could not log artifact %s to MLflow: %s", path, exc)


def log_cache_input(uri: str, run_id: str, manifest: dict[str, Any], cache_dir: str | Path) -> None:
    """Record the latent cache as the run's dataset input (name, fingerprint digest, counts) and log the
    quarantine counts as metrics."""
    try:
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource
        from mlflow.entities import DatasetInput, InputTag

        ds = MetaDataset(
            source=LocalArtifactDatasetSource(str(cache_dir)),
            name=f"latent-cache-{manifest['fingerprint_hash']}",
            digest=manifest["fingerprint_hash"],
            schema=None,
        )
        entity = ds._to_mlflow_entity()
        mlflow_client(uri).log_inputs(
            run_id, datasets=[DatasetInput(entity, tags=[InputTag("mlflow.data.context", "train")])]
        )
    except Exception as exc:
        logger.warning("could not log the cache as an MLflow dataset input: %s", exc)
    counts = {f"quarantine/{k}": v for k, v in manifest.get("quarantine", {}).items()}
    if counts:
        log_metrics(uri, run_id, counts, step=0)


def main(argv: list[str] | None = None) -> int:
    """``python -m ray_jobs.tracking replay PENDING.jsonl --uri URI``: send metrics spilled while MLflow
    was unreachable."""
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.tracking")
    sub = parser.add_subparsers(dest="command", required=True)
    rp = sub.add_parser("replay", help="send spilled metrics")
    rp.add_argument("pending", help="the mlflow_pending.jsonl of a workdir")
    rp.add_argument("--uri", required=True, help="MLflow tracking URI")
    ns = parser.parse_args(argv)
    sent = replay_pending(ns.uri, ns.pending)
    print(f"sent {sent} metric values to {ns.uri}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
