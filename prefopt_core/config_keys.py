"""Dotted config keys: ``section.key=value`` overrides, renamed keys, and flattening for MLflow params.

Plain-dict helpers with no knowledge of the schema (:mod:`prefopt_core.config` holds that).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration that cannot run; the message says which key and why."""


@dataclass(frozen=True)
class RenamedKey:
    """A config key that was renamed: reading the old one fails with a sentence naming the new one."""

    old: str
    new: str
    hint: str = ""


def check_renamed(data: dict[str, Any], renamed: Iterable[RenamedKey]) -> None:
    """:class:`ConfigError` naming the new key when the nested dict ``data`` uses an old key of ``renamed``."""
    for key in renamed:
        node: Any = data
        for part in key.old.split("."):
            node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        if node is not _MISSING:
            hint = f" ({key.hint})" if key.hint else ""
            raise ConfigError(f"config key {key.old!r} was renamed to {key.new!r}{hint}.")


_MISSING = object()


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.max_steps=5"`` -> ``(["train", "max_steps"], 5)``; values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form dotted.key=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r} has an empty key")
    return parts, yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides to a nested dict (in place) and return it."""
    for item in overrides:
        parts, value = parse_override(item)
        node = data
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for MLflow params and config diffs)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
