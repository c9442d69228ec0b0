"""What every synthesizer shares: reading cell values as text, the output frames, the fact check.

A synthesizer returns two frames:
- conversations: the CONVERSATIONS contract's columns (see data_contracts/conversations.py);
- skipped: one row per (input row, unit) it set aside, with columns `row` (position in its input frame),
  `kind`, `columns` (list of the source columns that caused it) and `reason`. The stage turns these into
  quarantine rows that keep the input row verbatim.
Extra counts a synthesizer wants in the stage stats (e.g. trimmed turns) go in `conversations.attrs["stats"]`.
"""

import gc
from contextlib import contextmanager

import numpy as np
import pandas as pd

CONVERSATION_COLUMNS = ["id", "messages", "kind", "source", "source_row", "source_id", "phrasing_set", "facts"]
SKIPPED_COLUMNS = ["row", "kind", "columns", "reason"]


def as_text(value) -> str | None:
    """A cell as text, or None when it holds nothing (None, NaN, pd.NA). Lists become 'a, b, c'."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (float, np.floating)):
        return None if np.isnan(value) else str(value)
    if isinstance(value, (list, tuple, np.ndarray)):
        items = [as_text(item) for item in value]
        return ", ".join(item for item in items if item)
    return str(value)


def column_text(rows: pd.DataFrame, column: str) -> list[str | None]:
    """A column as a list of text-or-None (one pass, no per-row pandas calls)."""
    return [value if type(value) is str else as_text(value) for value in rows[column].tolist()]


@contextmanager
def gc_paused():
    """Pause the cyclic garbage collector while building many small containers.

    Synthesizers create a few dicts and lists per example and no reference cycles; with the collector on,
    its repeated passes over the growing heap cost about a fifth of the time at 25k rows (measured).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def text_or_none(values: list[str | None]) -> list[str | None]:
    """Values exactly as written (whitespace at the edges kept: a code answer's indentation is data); empty or
    whitespace-only values become None. Stripping is the format stage's explicit choice (format.strip_whitespace)."""
    return [value if value is not None and value.strip() else None for value in values]


def stripped_or_none(values: list[str | None]) -> list[str | None]:
    """Values with outer whitespace removed; empty or whitespace-only values become None."""
    return [value.strip() or None if value is not None else None for value in values]


def conversations_frame(
    *, ids: list[str], messages: list[list[dict]], kind: list[str] | str, source: list[str], source_row: list[int],
    source_id: list[str], phrasing_set: list[str] | str, facts: list[list[dict]], stats: dict | None = None,
) -> pd.DataFrame:
    """The CONVERSATIONS frame with the contract's dtypes (also when empty)."""
    count = len(ids)
    frame = pd.DataFrame(
        {
            "id": pd.Series(ids, dtype=str),
            "messages": pd.Series(messages, dtype=object),
            "kind": pd.Series([kind] * count if isinstance(kind, str) else kind, dtype=str),
            "source": pd.Series(source, dtype=str),
            "source_row": pd.Series(source_row, dtype="int64"),
            "source_id": pd.Series(source_id, dtype=str),
            "phrasing_set": pd.Series([phrasing_set] * count if isinstance(phrasing_set, str) else phrasing_set, dtype=str),
            "facts": pd.Series(facts, dtype=object),
        },
        columns=CONVERSATION_COLUMNS,
    )
    frame.attrs["stats"] = dict(stats or {})
    return frame


def skipped_frame(rows: list[int], kinds: list[str], columns: list[list[str]], reasons: list[str]) -> pd.DataFrame:
    """The skipped frame (see module docstring)."""
    return pd.DataFrame(
        {
            "row": pd.Series(rows, dtype="int64"),
            "kind": pd.Series(kinds, dtype=str),
            "columns": pd.Series(columns, dtype=object),
            "reason": pd.Series(reasons, dtype=str),
        },
        columns=SKIPPED_COLUMNS,
    )


def unstated_fact(answer: str, facts: list[dict]) -> dict | None:
    """The first fact whose value does not appear verbatim in `answer`, or None when all do."""
    for fact in facts:
        if fact["value"] not in answer:
            return fact
    return None


def provenance(rows: pd.DataFrame) -> tuple[list[str], list[int]]:
    """The `_source` and `_row` columns of a RAW frame as lists."""
    return [str(name) for name in rows["_source"].tolist()], [int(row) for row in rows["_row"].tolist()]


def row_ids(rows: pd.DataFrame, id_column: str | None, sources: list[str], source_rows: list[int]) -> list[str]:
    """source_id per row: the id column's value when set and non-empty, else '<source>:<row>'."""
    fallback = [f"{source}:{row}" for source, row in zip(sources, source_rows)]
    if id_column is None:
        return fallback
    given = stripped_or_none(column_text(rows, id_column))
    return [value if value is not None else default for value, default in zip(given, fallback)]
