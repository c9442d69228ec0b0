"""Rows that share a source id but state different facts: keep one (or none), set the others aside.

Two catalog rows with the same id and, say, different episode counts would both be trained, teaching the
model two answers to one question. The synthesize stage calls this on every synthesizer's output: rows are
compared by the facts their conversations state (per column, the set of values), or, for a synthesizer
that renders no facts (instruction, conversations, text), by their messages. Rows of one id that agree are
left alone (the tokenize stage removes exact duplicates). Which row of a conflicting id is kept is
`synthesize.duplicate_ids`: the first in input order, the last, or none.
"""

import json

import pandas as pd

REASON = "duplicate id with different facts"


def row_contents(conversations: pd.DataFrame, rows: list[int]) -> dict[int, dict[str, frozenset]]:
    """Per input row (rows[i] is conversation i's row), what it states: column -> its values."""
    contents: dict[int, dict[str, set]] = {}
    for row, facts, messages in zip(rows, conversations["facts"].tolist(), conversations["messages"].tolist()):
        stated = contents.setdefault(row, {})
        if len(facts):
            for fact in facts:
                stated.setdefault(fact["column"], set()).add(fact["value"])
        else:
            stated.setdefault("messages", set()).add(json.dumps(list(messages), sort_keys=True, ensure_ascii=False, default=str))
    return {row: {column: frozenset(values) for column, values in stated.items()} for row, stated in contents.items()}


def differing_columns(first: dict[str, frozenset], second: dict[str, frozenset]) -> list[str]:
    """Columns both rows state with different values (a column only one of them states is no conflict)."""
    return [column for column in first if column in second and first[column] != second[column]]


def conflicting_duplicates(conversations: pd.DataFrame, rows: list[int], places: dict[int, str],
                           keep: str) -> dict[int, tuple[list[str], str]]:
    """Input rows to set aside: row -> (conflicting columns, reason). `places[row]` names a row ('catalog:7').

    `keep` is first | last | none: which row of an id whose rows disagree stays; all its other rows go.
    """
    contents = row_contents(conversations, rows)
    rows_by_id: dict[str, list[int]] = {}
    for row, source_id in dict(zip(rows, conversations["source_id"].tolist())).items():
        rows_by_id.setdefault(source_id, []).append(row)
    set_aside: dict[int, tuple[list[str], str]] = {}
    for source_id, id_rows in rows_by_id.items():
        id_rows = sorted(id_rows)
        pairs = [(a, b, differing_columns(contents[a], contents[b])) for i, a in enumerate(id_rows) for b in id_rows[i + 1:]]
        conflicts = [(a, b, columns) for a, b, columns in pairs if columns]
        if not conflicts:
            continue
        kept = {"first": id_rows[0], "last": id_rows[-1], "none": None}[keep]
        columns = sorted({column for _, _, found in conflicts for column in found})
        kept_text = f"kept {places[kept]} (synthesize.duplicate_ids: {keep})" if kept is not None \
            else "none kept (synthesize.duplicate_ids: none)"
        others = ", ".join(places[row] for row in id_rows)
        for row in id_rows:
            if row != kept:
                set_aside[row] = (columns, f"{REASON}: id {source_id!r} is on rows {others}, which differ in "
                                           f"{', '.join(columns)}; {kept_text} -> fix or remove the wrong row")
    return set_aside
