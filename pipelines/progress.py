"""Progress of long work (builds, training, evaluation) as log records the console can render.

A :class:`Progress` counts units done out of a known total and, at most every ``every_s`` seconds (and
always at the end), logs one record on the ``prefopt.progress`` logger. The record's message is a
human line::

    cache: 128/512 rows (25%) · 34.1 rows/s · quarantined 2 · ETA 0:00:11

and its ``progress`` attribute holds the same facts as a dict (``task``, ``done``, ``total``, ``unit``,
``rate``, ``eta_s`` and any extras), which the CLI's JSON log format prints as one object per line.
Nothing here prints: where the line goes (console, JSON, nowhere with ``--quiet``) is the CLI's choice.

    progress = Progress("cache", total=512, unit="rows")
    for batch in batches:
        ...
        progress.update(len(batch), quarantined=n_bad)
    progress.finish()
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

PROGRESS_LOGGER = "prefopt.progress"


def format_eta(seconds: float | None) -> str:
    """``3725.2`` -> ``"1:02:05"``; unknown (``None`` or not finite) -> ``"?"``.

    >>> format_eta(3725.2), format_eta(None)
    ('1:02:05', '?')
    """
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = max(0, round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def progress_line(record: dict[str, Any]) -> str:
    """The human line of a progress record (see the module docstring)."""
    done, total, unit = record["done"], record["total"], record["unit"]
    parts = [f"{record['task']}: {done}/{total} {unit}"]
    if total:
        parts[0] += f" ({100 * done / total:.0f}%)"
    parts += [f"{k.replace('_', ' ')} {_fmt(v)}" for k, v in record.get("extra", {}).items()]
    if record.get("rate") is not None:
        parts.append(f"{record['rate']:.3g} {unit}/s")
    if done < total:
        parts.append(f"ETA {format_eta(record.get('eta_s'))}")
    return " · ".join(parts)


def log_progress(record: dict[str, Any], logger: logging.Logger | None = None) -> None:
    """Log a progress record: its human line as the message, the record itself as ``record.progress``."""
    (logger or logging.getLogger(PROGRESS_LOGGER)).info(progress_line(record), extra={"progress": record})


class Progress:
    """Counts ``done`` of ``total`` units and logs a progress record at most every ``every_s`` seconds.

    ``start_done`` is work already done before this process started (a resumed build): it counts towards
    ``done`` but not towards the rate, so the ETA reflects this process's speed. ``sink`` receives each
    record instead of logging it here (a Ray worker hands its records to the driver, which logs them with
    :func:`log_progress`). ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        task: str,
        total: int,
        *,
        unit: str = "rows",
        every_s: float = 5.0,
        start_done: int = 0,
        logger: logging.Logger | None = None,
        sink: Callable[[dict[str, Any]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.task, self.total, self.unit, self.every_s = task, total, unit, every_s
        self.done = start_done
        self._start_done = start_done
        self._clock = clock
        self._t0 = clock()
        self._last_emit: float | None = None
        self._sink = sink or (lambda record: log_progress(record, logger))
        self.extra: dict[str, Any] = {}

    def record(self) -> dict[str, Any]:
        """The current state as a dict (what a log record carries in ``progress``)."""
        elapsed = self._clock() - self._t0
        new = self.done - self._start_done
        rate = new / elapsed if elapsed > 0 and new > 0 else None
        eta = (self.total - self.done) / rate if rate else None
        return {
            "task": self.task,
            "done": self.done,
            "total": self.total,
            "unit": self.unit,
            "rate": rate,
            "eta_s": eta,
            "elapsed_s": elapsed,
            "extra": dict(self.extra),
        }

    def update(self, n: int = 1, **extra: Any) -> None:
        """Add ``n`` done units; ``extra`` values (e.g. ``quarantined=2``) replace the previous ones. The
        first update and then one every ``every_s`` seconds emit a record; :meth:`finish` emits the last."""
        self.done += n
        self.extra.update(extra)
        now = self._clock()
        if self._last_emit is None or now - self._last_emit >= self.every_s:
            self.emit()

    def emit(self) -> None:
        self._last_emit = self._clock()
        self._sink(self.record())

    def finish(self, **extra: Any) -> None:
        """Emit the final record (with ``extra``, e.g. where the result went)."""
        self.extra.update(extra)
        self.emit()
