"""Help text for config keys, generated from the pydantic schema in ``prefopt_core.config``.

Every key's type, default and description come from :class:`~prefopt_core.config.RunConfig` itself, so the
help cannot drift from what the loader accepts::

    >>> print(section_help("tracking").splitlines()[1])
      tracking.uri: str | None = null
"""

from __future__ import annotations

import textwrap
import types
import typing
from collections.abc import Iterable
from typing import Any, Literal

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from prefopt_core.config import RunConfig

#: Width the descriptions are wrapped to.
WIDTH = 100


def type_name(annotation: Any) -> str:
    """A short, readable name: ``Literal['a', 'b']`` -> ``a|b``, ``int | None`` -> ``int | None``,
    ``list[str]`` -> ``list[str]``, ``tuple[float, float]`` -> ``tuple[float, float]``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def default_text(field: FieldInfo) -> str:
    """The default as YAML would spell it in a flow style (``None`` -> ``null``, as an override spells it)."""
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "(required)"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    if value is None:
        return "null"
    if isinstance(value, tuple):
        value = list(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("\n...")


def _is_section(field: FieldInfo) -> bool:
    return isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)


def _key_lines(model: type[BaseModel], prefix: str) -> list[str]:
    lines = []
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}"
        if _is_section(field):
            lines += _key_lines(field.annotation, key)
            continue
        lines.append(f"  {key}: {type_name(field.annotation)} = {default_text(field)}")
        if field.description:
            lines += textwrap.wrap(
                field.description,
                WIDTH,
                initial_indent=" " * 6,
                subsequent_indent=" " * 6,
                break_on_hyphens=False,
            )
    return lines


def section_help(section: str) -> str:
    """``section:`` then one entry per key (nested sections flattened to dotted keys)."""
    field = RunConfig.model_fields.get(section)
    if field is None or not _is_section(field):
        valid = ", ".join(RunConfig.model_fields)
        raise ValueError(f"unknown config section {section!r}; valid sections: {valid}")
    return "\n".join([f"{section}:", *_key_lines(field.annotation, section)])


def sections_help(sections: Iterable[str]) -> str:
    """The help of several sections, with a line saying how to set the keys."""
    head = "config keys read (set in CONFIG.yaml or as dotted.key=value overrides):"
    return "\n\n".join([head, *(section_help(s) for s in sections)])


def all_sections() -> tuple[str, ...]:
    """Every top-level section of the schema, in schema order."""
    return tuple(RunConfig.model_fields)
