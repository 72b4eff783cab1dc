"""Typed config fields: one `Field` per key, with its type, range, default and whether it may
vary inside one compiled program (a traced scalar). Most keys are scalars; "int_list" (e.g. a
network's hidden widths) and "mapping" (options handed on to a component, e.g. a learner's) are
structural."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from bilevel_jax.errors import BilevelJaxError

KINDS = ("int", "float", "bool", "str", "int_list", "mapping")


class ConfigError(BilevelJaxError, ValueError):
    """A config is refused: the message names the key path and what was expected."""


@dataclass(frozen=True)
class Field:
    """One config key.

    Attributes:
      kind: "int", "float" (ints are accepted and converted), "bool", "str", "int_list" (a
        non-empty list of ints, each within `low`/`high`) or "mapping" (string keys to any
        YAML values, checked by whoever receives them).
      default: the value when the key is absent.
      low, high: inclusive bounds (`low_open` / `high_open` make them strict).
      choices: allowed values of a "str" field.
      nullable: `null` is allowed (and means "off" or "derived", see `doc`).
      traced: a numeric key that may differ between runs of one compiled program (it enters the
        program as a traced scalar); a swept key that is not traced splits the grid into one
        compiled program per value.
      doc: one line for `bilevel-jax list` and the README.
    """

    kind: str
    default: Any = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple | None = None
    nullable: bool = False
    traced: bool = False
    doc: str = ""

    def expected(self) -> str:
        if self.kind == "bool":
            text = "true or false"
        elif self.kind == "mapping":
            text = "a mapping of names to values"
        elif self.kind == "int_list":
            bound = "" if self.low is None else f" >= {_fmt(self.low)}"
            text = f"a non-empty list of ints{bound}"
        elif self.kind == "str":
            text = f"one of {list(self.choices)}" if self.choices else "a string"
        else:
            text = "an int" if self.kind == "int" else "a number"
            lo = None if self.low is None else _fmt(self.low)
            hi = None if self.high is None else _fmt(self.high)
            if lo is not None and hi is not None:
                text += f" in {'(' if self.low_open else '['}{lo}, {hi}{')' if self.high_open else ']'}"
            elif lo is not None:
                text += f" {'>' if self.low_open else '>='} {lo}"
            elif hi is not None:
                text += f" {'<' if self.high_open else '<='} {hi}"
        return text + (" or null" if self.nullable else "")

    def coerce(self, path: str, value: Any) -> Any:
        """The value checked and normalized (ints to floats for "float"); raises `ConfigError`."""
        if value is None:
            if self.nullable:
                return None
            raise self.error(path, value)
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise self.error(path, value)
            return value
        if self.kind == "str":
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                raise self.error(path, value)
            return value
        if self.kind == "mapping":
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise self.error(path, value)
            return dict(value)
        if self.kind == "int_list":
            # A list (not a tuple) so the resolved config stays JSON and YAML as written.
            if not isinstance(value, (list, tuple)) or not value:
                raise self.error(path, value)
            item = Field("int", low=self.low, high=self.high)
            return [item.coerce(f"{path}[{i}]", v) for i, v in enumerate(value)]
        if isinstance(value, bool):
            raise self.error(path, value)
        original = value
        if self.kind == "int":
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if not isinstance(value, int):
                raise self.error(path, value)
        else:
            if isinstance(value, str):      # YAML 1.1 reads `1e-3` (no dot) as a string
                try:
                    value = float(value)
                except ValueError:
                    raise self.error(path, value) from None
            if not isinstance(value, (int, float)):
                raise self.error(path, value)
            value = float(value)
            if not math.isfinite(value):
                raise self.error(path, value)
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise self.error(path, original)
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            raise self.error(path, original)
        return value

    def error(self, path: str, value: Any) -> ConfigError:
        return ConfigError(f"{path}: expected {self.expected()}, got {_show(value)}")

    @property
    def numeric(self) -> bool:
        return self.kind in ("int", "float")


def _fmt(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else repr(number)


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def show_value(value: Any) -> str:
    """A value as it would be written in YAML (for messages and labels)."""
    return _show(value) if not isinstance(value, str) else value


def show_default(value: Any) -> str:
    """`show_value`, with lists and mappings written out in YAML's flow style (for listings;
    messages say "a list" / "a mapping")."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show_default(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show_default(v)}" for k, v in value.items()) + "}"
    return show_value(value)
