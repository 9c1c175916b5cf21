"""YAML values -> the dataclass fields' types, with one error naming the field."""

from __future__ import annotations

import math
from typing import Any, Mapping, get_args, get_origin, get_type_hints

from fedml_progfed.errors import FieldError

_EMPTY = ("", "none", "null")


def coerce(field_name: str, value: Any, annotation: Any) -> Any:
    """Convert ``value`` to ``annotation`` (int, float, bool, str, ``X | None``, ``tuple[X, ...]``)."""
    origin = get_origin(annotation)
    options = get_args(annotation)
    if value is None or (isinstance(value, str) and value.strip().lower() in _EMPTY):
        if type(None) in options or annotation is Any:
            return None
        raise FieldError(field_name, "a value is required")
    if type(None) in options:
        inner = [o for o in options if o is not type(None)]
        return coerce(field_name, value, inner[0])
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace(" ", "").split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise FieldError(field_name, f"{value!r} is not a list; write e.g. [25, 25, 25, 25]")
        return tuple(coerce(field_name, v, options[0]) for v in value)
    if annotation is bool:
        return _boolean(field_name, value)
    if annotation is int:
        return _integer(field_name, value)
    if annotation is float:
        try:
            number = float(value)  # PyYAML reads 1e-3 as a string; float() accepts it
        except (TypeError, ValueError):
            raise FieldError(field_name, f"{value!r} is not a number") from None
        if not math.isfinite(number):
            raise FieldError(field_name, f"{value!r} is not a finite number")
        return number
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise FieldError(field_name, f"{value!r} is not a single value")
        return str(value)
    return value


def _boolean(field_name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.strip().lower() in ("true", "yes", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise FieldError(field_name, f"{value!r} is not true/false")


def _integer(field_name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise FieldError(field_name, f"{value!r} is not an integer")
    if isinstance(value, int):
        return value  # exact: a float would round integers above 2**53
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value.strip())
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise FieldError(field_name, f"{value!r} is not an integer") from None
    if not math.isfinite(number) or not number.is_integer():
        raise FieldError(field_name, f"{value!r} is not an integer")
    return int(number)


def coerce_fields(cls: type, values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Coerce ``values`` (field name -> raw value) to ``cls``'s field types; fields are named ``prefix + name``."""
    hints = get_type_hints(cls)
    return {name: coerce(prefix + name, value, hints[name]) for name, value in values.items()}
