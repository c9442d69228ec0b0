"""Fact types: what kind of value a synthesizer renders into an answer, and whether a cell is one.

Every synthesizer declares `FACT_TYPES` (its field -> one of these types). A value that does not parse as its
field's type (a `Scored By` of `abc`) is never rendered: the question that needs it is skipped with the reason,
as for a missing value.
"""

import re
from datetime import datetime
from typing import Literal

FactType = Literal["count", "score", "date", "text"]

_COUNT = re.compile(r"^(?:\d+|\d{1,3}(?:,\d{3})+)$")  # 12, 12000, 12,000
_SCORE = re.compile(r"^\d+(?:\.\d+)?$")  # 6.5, 7, 8.25
DATE_FORMATS = ("%Y-%m-%d", "%b %d, %Y", "%B %d, %Y", "%d %b %Y", "%d %B %Y", "%Y/%m/%d")

# How a type is explained in a skip reason.
DESCRIBED = {
    "count": "a count (a whole number such as 12 or 1,200)",
    "score": "a score (a number such as 7 or 6.85)",
    "date": "a date (such as 2021-04-03 or Apr 3, 2021)",
    "text": "text",
}


def is_date(value: str) -> bool:
    """True when `value` reads as a calendar date in one of DATE_FORMATS."""
    for layout in DATE_FORMATS:
        try:
            datetime.strptime(value, layout)
            return True
        except ValueError:
            continue
    return False


CHECKS = {"count": _COUNT.match, "score": _SCORE.match, "date": is_date, "text": bool}


def parses_as(fact_type: FactType, value: str) -> bool:
    """True when a present (non-missing, trimmed) value is a valid `fact_type`."""
    return bool(CHECKS[fact_type](value))


def not_a(fact_type: FactType, column: str, value: str) -> str:
    """The skip-reason fragment for a value that is not its type, e.g. "Scored By 'abc' is not a count (...)"."""
    return f"{column} {value!r} is not {DESCRIBED[fact_type]}"
