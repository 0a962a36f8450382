"""Command-line options generated from the configs they set: one pydantic field, one option.

A compressing command's options are its pass config's fields (flag, type, choices, help and default come
from the field), the calibration settings (:class:`~sparsify.recipe.Calibration`) and the recipe's compute
``dtype``, plus the run settings every compressing command shares, declared once in :mod:`sparsify.cli`.
A field may name its flag (``json_schema_extra={"flag": "--sparsity-profile"}``; a switch ``"--a/--b"``); a
nested config (QAT) becomes a switch plus its own fields, prefixed (``--qat --qat-steps 50``). Only what the
user gives reaches the recipe, whose validation then speaks for defaults and combinations.
"""

from __future__ import annotations

import enum
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args, get_origin

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo


@dataclass(frozen=True)
class Option:
    param: str  # the Python parameter name, unique in its command
    annotation: Any  # Annotated[type | None, typer.Option(...)]
    path: tuple[str, ...]  # where a given value goes: ("pass", key[, sub]), ("calibration", key), ("recipe", key)
    flag: str  # the flag as typed, for messages


def _optional(annotation: Any) -> Any:
    """``X | None`` → ``X``."""
    if get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _metavar(key: str, annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return "|".join(map(str, get_args(annotation)))
    return {int: "N", float: "X"}.get(annotation, key.upper())


_CHOICES: dict[tuple[str, ...], type[enum.Enum]] = {}


def _choice(values: tuple[str, ...]) -> type[enum.Enum]:
    """A str Enum of ``values`` (typer's type for a choice), one per distinct set."""
    if values not in _CHOICES:
        _CHOICES[values] = enum.Enum("Choice", {v: v for v in values}, type=str)  # type: ignore[misc]
    return _CHOICES[values]


def field_option(key: str, field: FieldInfo, path: tuple[str, ...], flag: str | None = None) -> Option | None:
    """The option that sets one config field (None: ``type``, and nested configs, see :func:`config_options`)."""
    if key == "type":
        return None
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    flag = flag or str(extra.get("flag") or "--" + "-".join(path[1:]).replace("_", "-"))
    annotation = _optional(field.annotation)
    default = None if field.is_required() else field.default
    help_text = field.description or ""
    param = "_".join(path).replace("-", "_")
    if annotation is bool:
        switch = flag if "/" in flag else f"{flag}/--no-{flag[2:]}"
        on, off = switch.split("/")
        shown = f" [default: {on if default else off}]" if default is not None else ""
        opt = typer.Option(switch, help=help_text + shown, show_default=False)
        return Option(param, Annotated[bool | None, opt], path, on)
    shown = f" [default: {default}]" if default not in (None, [], ()) else " [required]" if field.is_required() else ""
    if get_origin(annotation) is list:
        item = get_args(annotation)[0]
        opt = typer.Option(flag, help=help_text + " (repeatable)", metavar=_metavar(key, item), show_default=False)
        return Option(param, Annotated[list[item] | None, opt], path, flag)
    if get_origin(annotation) is Literal:
        opt = typer.Option(flag, help=help_text + shown, metavar=_metavar(key, annotation), case_sensitive=False,
                           show_default=False)  # fmt: skip
        return Option(param, Annotated[_choice(get_args(annotation)) | None, opt], path, flag)
    if annotation in (int, float, str):
        metavar = str(extra.get("metavar") or _metavar(key, annotation))
        opt = typer.Option(flag, help=help_text + shown, metavar=metavar, show_default=False)
        return Option(param, Annotated[annotation | None, opt], path, flag)
    return None


def config_options(config: type[BaseModel], path: tuple[str, ...]) -> list[Option]:
    """One option per field of ``config``; a nested config: a switch, then its fields (``--qat``, ``--qat-steps``)."""
    out = []
    own = inspect.get_annotations(config)
    fields = sorted(config.model_fields.items(), key=lambda kv: kv[0] not in own)  # its own fields first
    for key, field in fields:
        nested = _optional(field.annotation)
        if isinstance(nested, type) and issubclass(nested, BaseModel):
            switch = FieldInfo(annotation=bool, default=None, description=field.description)
            out.append(field_option(key, switch, (*path, key, ""), flag="--" + key.replace("_", "-")) or _never())
            out += [o for sub, f in nested.model_fields.items() if (o := field_option(sub, f, (*path, key, sub)))]
        elif (option := field_option(key, field, (*path, key))) is not None:
            out.append(option)
    return out


def _never() -> Option:
    raise AssertionError("a switch always has an option")


def values(options: list[Option], given: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The given values by destination, ``{"pass": {...}, "calibration": {...}, "recipe": {...}}`` (and any other
    section an option's path names, e.g. ``"export"``). A nested
    config's switch (its path ends in "") turns it on (its defaults) or off (null); naming one of its fields
    turns it on."""
    out: dict[str, dict[str, Any]] = {"pass": {}, "calibration": {}, "recipe": {}}
    for option in options:
        value = given.get(option.param)
        if value is None:
            continue
        section, key, *sub = option.path
        out.setdefault(section, {})
        if not sub:
            out[section][key] = _plain(value)
        elif sub == [""]:
            out[section][key] = out[section].get(key) or {} if value else None
        else:
            out[section][key] = {**(out[section].get(key) or {}), sub[0]: _plain(value)}
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def with_options(
    fn: Callable[..., Any],
    leading: list[inspect.Parameter],
    options: list[Option],
    trailing: list[inspect.Parameter] = (),  # type: ignore[assignment]
) -> Callable[..., Any]:
    """``fn`` (taking ``**kwargs``) given a signature typer reads: ``leading`` parameters, one per option, then
    ``trailing`` ones (keyword-only)."""
    params = [
        *leading,
        *(
            inspect.Parameter(o.param, inspect.Parameter.KEYWORD_ONLY, annotation=o.annotation, default=None)
            for o in options
        ),
        *trailing,
    ]
    fn.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return fn
