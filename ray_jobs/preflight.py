"""Checks made before a command starts anything: the config file parses, the local inputs it names exist
and can be read, its object-store locations answer (inputs there exist), and its tracking server answers.

Each failure is a :class:`PreflightError` whose message is one sentence saying what to fix; the CLI prints
it and exits with status 2. What is checked depends on the config sections the command reads (the CLI's
command table), so ``prefopt eval`` is not stopped by a missing ``data.source`` it would never open.
"""

from __future__ import annotations

import glob
import os
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from prefopt_core.config import ConfigError, RunConfig, load_config
from prefopt_core.config_keys import parse_override
from prefopt_core.storage import Location, is_uri

#: Seconds an http(s) tracking server gets to answer before the command gives up.
TRACKING_TIMEOUT_S = 5.0
#: Suffixes that make a ``data.source`` that does not exist a missing file rather than a hub id.
LOCAL_DATA_SUFFIXES = (".parquet", ".tar")
#: ``(section, key)`` of the prompt files a command reads when its section is set.
PROMPT_FILES = (("regenerate", "prompts"), ("online", "prompts"), ("eval", "prompts"))


class PreflightError(ValueError):
    """A command cannot start: the message says which input or service and what to do."""


# ------------------------------------------------------------------------------------------- config file
def _where(mark) -> str:
    return "" if mark is None else f", line {mark.line + 1}, column {mark.column + 1}"


def _yaml_problem(err: yaml.MarkedYAMLError) -> str:
    """``expected ',' or ']', but got '<stream end>' (while parsing a flow sequence at line 3, column 9)``:
    the problem, and where the construct it broke began."""
    problem = err.problem or str(err)
    if err.context and err.context_mark is not None:
        mark = err.context_mark
        return f"{problem} ({err.context} at line {mark.line + 1}, column {mark.column + 1})"
    return problem


def _check_yaml_file(path: Path) -> None:
    """Parse ``path`` once for a message with file, line and column (``load_config`` parses it again)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as err:
        raise PreflightError(f"cannot read config file {path}: {err.strerror or err}") from None
    try:
        yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        raise PreflightError(
            f"{path}{_where(err.problem_mark)}: malformed YAML: {_yaml_problem(err)}"
        ) from None
    except yaml.YAMLError as err:
        raise PreflightError(f"{path}: malformed YAML: {err}") from None


def _check_overrides(overrides: Iterable[str]) -> None:
    for item in overrides:
        try:
            parse_override(item)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or err
            raise PreflightError(f"override {item!r}: the value is not valid YAML ({problem})") from None


def load_user_config(path: str | None, overrides: list[str]) -> RunConfig:
    """``load_config`` with one-sentence errors for what a user can get wrong in the file or overrides."""
    if path is not None:
        _check_yaml_file(Path(path))
    _check_overrides(overrides)
    return load_config(path, overrides)


# ------------------------------------------------------------------------------------------- local inputs
def _readable(path: Path) -> bool:
    if path.is_dir():
        return os.access(path, os.R_OK | os.X_OK)
    return os.access(path, os.R_OK)


def check_data_source(source: str | None) -> None:
    """A local ``data.source`` (file, directory or glob) exists and can be read; a hub id is not checked."""
    if source is None:
        return  # the synthetic source is written by the command itself
    path = Path(source).expanduser()
    if path.exists():
        if not _readable(path):
            raise PreflightError(f"data.source {source} exists but cannot be read (check its permissions)")
        return
    if glob.has_magic(source):
        if not glob.glob(os.path.expanduser(source), recursive=True):
            raise PreflightError(f"data.source {source!r}: no file matches this glob")
        return
    if path.is_absolute() or source.startswith((".", "~")) or path.suffix in LOCAL_DATA_SUFFIXES:
        raise PreflightError(
            f"data.source {source} does not exist; pass an existing parquet/webdataset file, directory or "
            "glob, a hub id 'owner/name', or leave it unset for the synthetic source"
        )


def check_prompt_file(key: str, value: str | None) -> None:
    """A prompt file named by ``key`` exists and can be read (unset: the command's default prompts)."""
    if value is None:
        return
    path = Path(value).expanduser()
    if not path.is_file():
        raise PreflightError(f"{key} {value} does not exist (expected a text file or a parquet file)")
    if not _readable(path):
        raise PreflightError(f"{key} {value} exists but cannot be read (check its permissions)")


# ------------------------------------------------------------------------------------------- object storage
#: ``(section, key, must exist)`` of the config's locations; a URI among them is probed before anything starts.
LOCATION_KEYS = (
    ("run", "workdir", False),
    ("cache", "dir", False),
    ("data", "source", True),
    ("model", "pretrained", True),
    ("model", "init_denoiser", True),
    ("regenerate", "output_dir", False),
    ("eval", "baseline", True),
)


def check_remote_location(key: str, uri: str, *, must_exist: bool) -> None:
    """The bucket of ``uri`` answers and exists (and ``uri`` itself, for an input); the store's own error
    otherwise, in one sentence that names the URI (never the credentials, which are not in it)."""
    loc = Location(uri)
    bucket = Location(f"{urlsplit(loc.uri).scheme}://{urlsplit(loc.uri).netloc}")
    try:
        if not bucket.exists():
            raise PreflightError(
                f"{key} {uri}: bucket {bucket} does not exist (or is not visible to these credentials)"
            )
        if must_exist and not loc.exists():
            raise PreflightError(f"{key} {uri} does not exist")
    except PreflightError:
        raise
    except Exception as err:  # the store's client errors carry no common base class
        raise PreflightError(
            f"{key} {uri} cannot be reached ({' '.join(str(err).split())}); check the URI, the network and the "
            "endpoint and credentials in the environment (AWS_ENDPOINT_URL, AWS_* / GOOGLE_APPLICATION_CREDENTIALS)"
        ) from None


def check_locations(cfg: RunConfig, sections: set[str]) -> None:
    """Probe every object-store location of the sections a command reads (``run.workdir`` always)."""
    for section, key, must_exist in LOCATION_KEYS:
        value = getattr(getattr(cfg, section), key)
        if (section == "run" or section in sections) and value and is_uri(value):
            check_remote_location(f"{section}.{key}", value, must_exist=must_exist)


# ------------------------------------------------------------------------------------------- tracking
def tracking_server_answers(uri: str, timeout_s: float = TRACKING_TIMEOUT_S) -> str | None:
    """``None`` when the http(s) server at ``uri`` answers at all within ``timeout_s`` (any HTTP status
    counts: it is up), else the reason it did not."""
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s):
            return None
    except urllib.error.HTTPError:
        return None
    except urllib.error.URLError as err:
        return str(getattr(err.reason, "strerror", None) or err.reason)
    except TimeoutError:
        return f"no answer within {timeout_s:g} s"
    except OSError as err:
        return str(err.strerror or err)


def check_tracking(cfg: RunConfig) -> None:
    """An http(s) tracking server must answer unless ``tracking.require_server`` is false; file and
    database stores are local and need no check."""
    uri = cfg.tracking_uri
    if not uri.startswith(("http://", "https://")) or not cfg.tracking.require_server:
        return
    reason = tracking_server_answers(uri)
    if reason is not None:
        raise PreflightError(
            f"the MLflow tracking server at {uri} does not answer ({reason}); start it, fix tracking.uri, or "
            "set tracking.require_server=false to run anyway and keep the metrics in "
            f"{cfg.scratch_dir / 'mlflow_pending.jsonl'} until it answers"
        )


def check_inputs(cfg: RunConfig, sections: Iterable[str]) -> None:
    """Every pre-flight check that applies to a command reading ``sections`` of the config."""
    sections = set(sections)
    check_locations(cfg, sections)
    if "data" in sections and not (cfg.data.source and is_uri(cfg.data.source)):
        check_data_source(cfg.data.source)
    for section, key in PROMPT_FILES:
        if section in sections:
            check_prompt_file(f"{section}.{key}", getattr(getattr(cfg, section), key))
    if "tracking" in sections:
        check_tracking(cfg)
