"""Ranges of numeric options, declared in the signature that is the config schema, and checked from there.

``num_generations: Annotated[int, Range(ge=2, why="to form a group")] = 8`` states the range once, beside the type
and default, and :func:`check_ranges` refuses a value outside it when the config is read, before any model loads, in
one line naming the key. jsonargparse passes ``Annotated`` metadata it does not know through to the plain type (and
``--help`` shows that type), so the value parses as an ``int`` and only the range is qmath's to check.
(jsonargparse's own restricted number types would check the range too, but report it as a usage error with the
whole usage text, not as one line that names the key and the range.)
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Annotated, Any

from qmath.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """The values a numeric option may take; bounds left ``None`` are open. ``None`` as a value passes where the
    type allows it (``int | None``: "off")."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    why: str = ""  # said after the range: "at least 2 to form a group"

    def __contains__(self, value: float) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def __str__(self) -> str:
        """The range in words, as an error message says it.

        >>> str(Range(gt=0, le=1, why="(1: off)")), str(Range(ge=2)), str(Range(gt=0))
        ('in (0, 1] (1: off)', 'at least 2', 'positive')
        """
        low, high = (self.ge, "[") if self.ge is not None else (self.gt, "("), (
            (self.le, "]") if self.le is not None else (self.lt, ")"))
        if low[0] is not None and high[0] is not None:
            text = f"in {low[1]}{_num(low[0])}, {_num(high[0])}{high[1]}"
        elif self.gt == 0:
            text = "positive"
        elif low[0] is not None:
            text = f"{'at least' if self.ge is not None else 'above'} {_num(low[0])}"
        else:
            text = f"{'at most' if self.le is not None else 'below'} {_num(high[0])}"
        return f"{text} {self.why}".rstrip()



def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


Positive = Annotated[float, Range(gt=0)]
NonNegative = Annotated[float, Range(ge=0)]


def declared_ranges(function: Any) -> dict[str, Range]:
    """Each parameter of ``function`` whose annotation carries a :class:`Range` (also inside ``X | None``)."""
    ranges = {}
    for name, hint in typing.get_type_hints(function, include_extras=True).items():
        found = [m for h in (hint, *typing.get_args(hint)) if typing.get_origin(h) is Annotated
                 for m in h.__metadata__ if isinstance(m, Range)]
        if found:
            ranges[name] = found[0]
    return ranges


def check_ranges(function: Any, values: dict[str, Any], prefix: str) -> None:
    """Refuse the first value of ``values`` outside the range its parameter of ``function`` declares."""
    for name, allowed in declared_ranges(function).items():
        value = values.get(name)
        if value is not None and not isinstance(value, bool) and value not in allowed:
            null = ", or null" if _nullable(function, name) and "null" not in allowed.why else ""
            raise ConfigError(f"{prefix}.{name} must be {allowed}{null}, got {value}")


def _nullable(function: Any, name: str) -> bool:
    return type(None) in typing.get_args(typing.get_type_hints(function, include_extras=True)[name])
