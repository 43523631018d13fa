"""What reaches the operator's console, and in which form; everything else goes to a log file.

The CLI calls :func:`configure_console` once, before anything logs, and :func:`attach_log_file` once the
run's workdir is known. The console then shows:

* progress records (logger ``prefopt.progress``, see ``pipelines.progress``) as their human line, unless
  ``quiet``;
* warnings and errors of every logger;
* INFO records of every logger only when ``verbose`` (they always go to ``<workdir>/prefopt.log``).

``log_format="json"`` prints one JSON object per record instead: ``time``, ``level``, ``logger``,
``message``, and ``progress`` (the record's dict) for progress records.

Libraries talk to the console only about errors unless ``verbose``: Python warnings are routed into
logging (logger ``py.warnings``, in the log file, on the console only when verbose), and the libraries
that print through handlers of their own are turned down where they read their settings (environment
variables the user did not set; DeepSpeed's logger, which reads none). Ray's loggers and Ray Data's are
set in ``ray_jobs.cluster``; all of Ray's output stays in the Ray session logs.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from pipelines.progress import PROGRESS_LOGGER

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[str, ...] = get_args(LogFormat)

#: Name of the log file written into the run's workdir.
LOG_FILE = "prefopt.log"
#: Format of every non-progress text record, on the console and in the log file.
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
#: The logger ``logging.captureWarnings`` sends Python warnings to.
WARNINGS_LOGGER = "py.warnings"
#: Environment that quiets libraries printing through their own handlers (set only where unset).
QUIET_LIBRARY_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # also turns off transformers' "Writing model shards" bars
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # mlflow's own handler ("Creating initial MLflow database tables")
}
#: Loggers that print through a handler of their own and never propagate; quiet mode keeps their
#: records below ERROR off the console.
SELF_HANDLED_LOGGERS = ("DeepSpeed",)
#: Marks the handlers this module installed, so that configuring again replaces them.
_MARK = "_prefopt_console"


@dataclass(frozen=True)
class ConsoleOptions:
    """The CLI's global output flags."""

    quiet: bool = False
    verbose: bool = False
    log_format: LogFormat = "text"
    debug: bool = False

    def __post_init__(self) -> None:
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"unknown log format {self.log_format!r}; valid: {', '.join(LOG_FORMATS)}")


def is_progress(record: logging.LogRecord) -> bool:
    return record.name == PROGRESS_LOGGER or hasattr(record, "progress")


class JsonFormatter(logging.Formatter):
    """One JSON object per record (no newline inside): time, level, logger, message[, progress][, exc]."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
            + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if hasattr(record, "progress"):
            obj["progress"] = record.progress
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str)


class TextFormatter(logging.Formatter):
    """Progress records as their bare human line; every other record as ``TEXT_FORMAT``."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        if is_progress(record):
            return record.getMessage()
        return super().format(record)


class ConsoleFilter(logging.Filter):
    """Progress unless quiet; Python warnings and INFO and below only when verbose; other WARNING and above
    always."""

    def __init__(self, options: ConsoleOptions) -> None:
        super().__init__()
        self.options = options

    def filter(self, record: logging.LogRecord) -> bool:
        if is_progress(record):
            return not self.options.quiet
        if record.name == WARNINGS_LOGGER:
            return self.options.verbose
        return record.levelno >= logging.WARNING or self.options.verbose


class ErrorsOnly(logging.Filter):
    """A logger filter passing only ERROR and above (for loggers whose handlers are not ours)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def quiet_libraries(options: ConsoleOptions) -> None:
    """Turn the self-handled library loggers down to errors, unless ``verbose``."""
    if options.verbose:
        return
    for key, value in QUIET_LIBRARY_ENV.items():
        os.environ.setdefault(key, value)
    for name in SELF_HANDLED_LOGGERS:
        lib_logger = logging.getLogger(name)
        if not any(isinstance(f, ErrorsOnly) for f in lib_logger.filters):
            lib_logger.addFilter(ErrorsOnly())
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # "Loading pipeline components" bars of every pipeline load


def formatter_for(log_format: LogFormat) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else TextFormatter()


def _replace_handler(logger: logging.Logger, handler: logging.Handler, kind: str) -> None:
    for old in [h for h in logger.handlers if getattr(h, _MARK, None) == kind]:
        logger.removeHandler(old)
        old.close()
    setattr(handler, _MARK, kind)
    logger.addHandler(handler)


def configure_console(options: ConsoleOptions, stream=None) -> None:
    """Install the console handler on the root logger (replacing one installed before)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter_for(options.log_format))
    handler.addFilter(ConsoleFilter(options))
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if options.verbose else logging.INFO)
    _replace_handler(root, handler, "console")
    logging.captureWarnings(True)
    quiet_libraries(options)


def attach_log_file(workdir: Path, log_format: LogFormat = "text") -> Path:
    """Append every INFO-and-above record (progress included) to ``<workdir>/prefopt.log``."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOG_FILE
    handler = logging.FileHandler(path)
    handler.setLevel(logging.INFO)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    _replace_handler(logging.getLogger(), handler, "file")
    return path


def report_error(command: str, message: str, options: ConsoleOptions) -> None:
    """The one line a user error gets on stderr (a JSON object in json mode)."""
    if options.log_format == "json":
        obj = {"level": "ERROR", "logger": "prefopt", "command": command, "message": message}
        print(json.dumps(obj), file=sys.stderr, flush=True)
    else:
        print(f"prefopt {command}: {message}", file=sys.stderr, flush=True)
