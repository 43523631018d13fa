"""What the console shows (ray_jobs.console), on a private logger: progress lines as text or one JSON object
per line, warnings always, INFO only with --verbose, nothing of the progress with --quiet."""

from __future__ import annotations

import io
import json
import logging

import pytest

from pipelines.progress import PROGRESS_LOGGER, Progress
from ray_jobs.console import (
    WARNINGS_LOGGER,
    ConsoleFilter,
    ConsoleOptions,
    JsonFormatter,
    TextFormatter,
)


class Clock:
    """A settable clock for Progress (seconds)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def console_output(options: ConsoleOptions, emit) -> list[str]:
    """Lines a console handler configured like the CLI's writes while ``emit(progress_logger, logger)`` runs."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if options.log_format == "json" else TextFormatter())
    handler.addFilter(ConsoleFilter(options))
    loggers = [logging.getLogger(f"{PROGRESS_LOGGER}.test"), logging.getLogger("pipelines.test_console")]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
        lg.propagate = False
    try:
        emit(*loggers)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    return stream.getvalue().splitlines()


def two_updates(progress_logger: logging.Logger, _: logging.Logger) -> None:
    """2 of 4 rows after 4 s, 4 of 4 after 8 s: 0.5 rows/s, ETA 4 s at the first record."""
    clock = Clock()
    progress = Progress("cache", total=4, unit="rows", every_s=1.0, logger=progress_logger, clock=clock)
    clock.now = 4.0
    progress.update(2, quarantined=1)
    clock.now = 8.0
    progress.update(2)


def test_json_lines_carry_the_progress_record():
    lines = console_output(ConsoleOptions(log_format="json"), two_updates)
    records = [json.loads(line) for line in lines]
    assert [r["progress"]["done"] for r in records] == [2, 4]
    first = records[0]
    assert first["level"] == "INFO" and first["logger"] == f"{PROGRESS_LOGGER}.test"
    assert first["progress"]["rate"] == 0.5 and first["progress"]["eta_s"] == 4.0
    assert first["progress"]["extra"] == {"quarantined": 1}
    assert first["message"] == "cache: 2/4 rows (50%) · quarantined 1 · 0.5 rows/s · ETA 0:00:04"


def test_text_progress_is_the_bare_human_line():
    lines = console_output(ConsoleOptions(), two_updates)
    assert lines == [
        "cache: 2/4 rows (50%) · quarantined 1 · 0.5 rows/s · ETA 0:00:04",
        "cache: 4/4 rows (100%) · quarantined 1 · 0.5 rows/s",
    ]


def test_quiet_drops_progress_but_not_warnings():
    def emit(progress_logger, lib_logger):
        two_updates(progress_logger, lib_logger)
        lib_logger.warning("disk almost full")

    lines = console_output(ConsoleOptions(quiet=True), emit)
    assert len(lines) == 1 and lines[0].endswith("pipelines.test_console WARNING disk almost full")


@pytest.mark.parametrize(("verbose", "shown"), [(False, 0), (True, 1)])
def test_info_logs_only_with_verbose(verbose, shown):
    lines = console_output(ConsoleOptions(verbose=verbose), lambda _, lib: lib.info("resolved 1 file"))
    assert len(lines) == shown


@pytest.mark.parametrize(("verbose", "shown"), [(False, False), (True, True)])
def test_python_warnings_only_with_verbose(verbose, shown):
    record = logging.LogRecord(WARNINGS_LOGGER, logging.WARNING, __file__, 1, "FutureWarning: x", None, None)
    assert ConsoleFilter(ConsoleOptions(verbose=verbose)).filter(record) is shown


def test_unknown_log_format_lists_valid_ones():
    with pytest.raises(ValueError, match="valid: text, json"):
        ConsoleOptions(log_format="xml")  # type: ignore[arg-type]
