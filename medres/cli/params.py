"""Plain option values without pydantic.

typer >= 0.2x coerces every option through a pydantic ``TypeAdapter``, whose import and
schema builds cost 60-100 ms of every command (a sixth of ``medres ingest`` on one series).
:func:`install` (called by the CLI's group and command classes before they parse) gives each
parameter a :class:`PlainParam` instead: values that are plainly of the parameter's type
(``str``; ``bool``; ``int`` / ``float`` written as plain decimals; ``Path``; lists of them)
are converted here exactly as typer's adapter converts them, and anything else (a malformed
or unusual number, a ranged, choice, file or custom-parser parameter) goes to typer's own
coercion, so values and error messages are typer's (``tests/unit/test_cli_imports.py``
compares the two). A typer without this machinery is left alone.

Imports: typer (its ``_coercion`` and ``_param_types`` modules, private: every use is guarded).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_INT = re.compile(r"-?(0|[1-9][0-9]{0,17})")
_FLOAT = re.compile(r"-?(0|[1-9][0-9]{0,14})(\.[0-9]{1,15})?")
_LEAVES = (str, bool, int, float, Path)

try:  # typer's coercion layer (typer >= 0.2x); older typers convert with click
    from typer._coercion import RuntimeParam, build_runtime_param
    from typer._param_types import coerce_cli_path
except ImportError:  # pragma: no cover - another typer
    RuntimeParam = None


class _Delegate(Exception):
    """The value is not plain: typer's own coercion converts it (or reports it)."""


def _leaf(value: Any, leaf: type, param: Any, ctx: Any) -> Any:
    if leaf is str:
        if isinstance(value, str):
            return value
    elif leaf is bool:
        if isinstance(value, bool):
            return value
    elif leaf is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and _INT.fullmatch(value):
            return int(value)
    elif leaf is float:
        if isinstance(value, float):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.fullmatch(value):
            return float(value)
    elif isinstance(value, Path) or (isinstance(value, str) and value):
        info = param.type_descriptor.parameter_info
        return coerce_cli_path(Path(value), info, path_type=Path, param=param, ctx=ctx)
    raise _Delegate


if RuntimeParam is not None:

    class PlainParam(RuntimeParam):  # type: ignore[misc,valid-type]
        """Typer's runtime coercion for a ``str``/``int``/``float``/``Path`` (or list)
        parameter, pydantic-free for plain values (module docstring)."""

        def __init__(self, descriptor: Any, leaf: type, is_list: bool) -> None:
            super().__init__(
                parameter_info=descriptor.parameter_info, annotation=descriptor.annotation
            )
            object.__setattr__(self, "_descriptor", descriptor)
            object.__setattr__(self, "_plain", (leaf, is_list))
            object.__setattr__(self, "_typer", None)

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            leaf, is_list = self._plain
            try:
                if not is_list:
                    return _leaf(value, leaf, param, ctx)
                if isinstance(value, (list, tuple)):
                    return [_leaf(v, leaf, param, ctx) for v in value]
            except _Delegate:
                pass
            if self._typer is None:
                object.__setattr__(self, "_typer", build_runtime_param(self._descriptor))
            return self._typer._coerce_value(value, param=param, ctx=ctx)


def _plain_kind(param: Any) -> tuple[type, bool] | None:
    """(leaf type, is a list) of a parameter :class:`PlainParam` may convert, else None."""
    td = getattr(param, "type_descriptor", None)
    if td is None or getattr(param, "_runtime_param", False) is not None:
        return None
    info = td.parameter_info
    if td.file_annotation is not None or info.parser is not None:
        return None
    if info.min is not None or info.max is not None or td.choices is not None:
        return None
    ann, is_list = td.annotation, False
    if td.is_list:
        args = getattr(ann, "__args__", ())
        if len(args) != 1:
            return None
        ann, is_list = args[0], True
    if ann not in _LEAVES:
        return None
    if getattr(info, "path_type", None) is not None:
        return None
    return ann, is_list


def install(command: Any, ctx: Any) -> None:
    """Give every plain parameter of ``command`` (a click command typer built, about to
    parse its arguments in ``ctx``; its ``--help`` included) a :class:`PlainParam`; a typer
    without the coercion layer is left alone."""
    if RuntimeParam is None:
        return
    try:
        found = list(command.get_params(ctx))
    except Exception:  # pragma: no cover - another typer
        found = list(getattr(command, "params", ()))
    for param in found:
        try:
            kind = _plain_kind(param)
            if kind is not None:
                param._runtime_param = PlainParam(param.type_descriptor, *kind)
        except Exception:  # a typer whose internals differ: its own coercion runs
            continue
