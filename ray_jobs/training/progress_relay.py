"""Training progress from rank 0 to the driver's console: a small actor that holds records until the
driver's polling thread takes them and logs them on ``prefopt.progress``.

The worker side is fire-and-forget (``sink.push.remote(record)``, never waited on), so a slow or busy
driver can never stall a training step.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from pipelines.progress import log_progress

logger = logging.getLogger(__name__)


class _Sink:
    """Buffers progress records (bounded: only the newest ``keep`` are held between two drains)."""

    def __init__(self, keep: int = 100) -> None:
        self.records: list[dict[str, Any]] = []
        self.keep = keep

    def push(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        del self.records[: -self.keep]

    def drain(self) -> list[dict[str, Any]]:
        out, self.records = self.records, []
        return out


class ProgressRelay:
    """Context manager of the driver: starts the sink actor (no CPU reserved) and a thread that logs what
    arrives every ``poll_s`` seconds; on exit it logs what is left and ends the actor."""

    def __init__(self, poll_s: float = 1.0) -> None:
        import ray

        self.sink = ray.remote(num_cpus=0)(_Sink).remote()
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prefopt-progress", daemon=True)

    def __enter__(self) -> ProgressRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        import ray

        self._stop.set()
        self._thread.join()
        self._log_pending()
        ray.kill(self.sink)

    def _log_pending(self) -> None:
        import ray

        try:
            records = ray.get(self.sink.drain.remote(), timeout=30)
        except Exception as err:  # the console line is a convenience: never fail training for it
            logger.debug("progress relay: %s", err)
            return
        for record in records:
            log_progress(record)

    def _run(self) -> None:
        while not self._stop.wait(self._poll_s):
            self._log_pending()
