"""conversations: ShareGPT-style rows (`conversations: [{from, value}, ...]`) -> one multi-turn conversation each.

The column may hold a list (or numpy array, as read back from Parquet) of dicts, or the same as a JSON
string. Speakers are mapped with options.role_map; system turns are kept. A conversation that does not end
with an assistant turn is cut after its last assistant turn (counted as `trimmed_to_last_assistant`); one
with no assistant turn, an unknown speaker, an empty turn or unreadable JSON is skipped with a reason.
"""

import json
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import ConfigDict, Field

from loraflow.config.base import StrictModel
from loraflow.synthesizers.common import conversations_frame, provenance, row_ids, skipped_frame
from loraflow.synthesizers.facts import FactType

# The types of the facts this synthesizer renders (loraflow/synthesizers/facts.py): none, it copies text as written.
FACT_TYPES: dict[str, FactType] = {}

KIND = "conversation"


class Options(StrictModel):
    """Options of the conversations synthesizer (ShareGPT-style multi-turn rows)."""

    model_config = ConfigDict(title="ConversationsOptions")

    column: str = Field("conversations", description="Column holding the list of turns.")
    role_key: str = Field("from", description="Key of a turn's speaker.")
    content_key: str = Field("value", description="Key of a turn's text.")
    role_map: dict[str, Literal["system", "user", "assistant"]] = Field(
        default_factory=lambda: {
            "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
        },
        description="Speaker names in the data -> chat roles.",
    )
    id_column: str | None = Field(None, description="Optional column with a stable row id.")


def required_columns(options: Options) -> dict[str, str]:
    """Config key (under synthesize.conversations) -> source column."""
    return {key: getattr(options, key) for key in ("column", "id_column") if getattr(options, key) is not None}


def expansion(options: Options) -> tuple[int, int]:
    """(units per input row, conversations per emitted unit)."""
    return 1, 1


def parse_turns(value) -> list:
    """The turns of one cell as a list; raises ValueError with a readable reason."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"not valid JSON ({error.msg} at character {error.pos})") from None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if value is None or (isinstance(value, float) and value != value):
        raise ValueError("is empty")
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"is a {type(value).__name__}, expected a list of turns")
    return list(value)


def to_messages(turns: list, options: Options) -> list[dict]:
    """Turns -> chat messages; raises ValueError naming the first bad turn."""
    messages = []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {number} is a {type(turn).__name__}, expected {{{options.role_key}, {options.content_key}}}")
        speaker = turn.get(options.role_key)
        role = options.role_map.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise ValueError(
                f"turn {number} has speaker {speaker!r} -> add it to synthesize.conversations.role_map "
                f"(known: {sorted(options.role_map)})"
            )
        content = turn.get(options.content_key)
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"turn {number} ({speaker}) has no text in {options.content_key!r}")
        messages.append({"role": role, "content": content})  # as written; format.strip_whitespace decides
    return messages


def synthesize(rows: pd.DataFrame, options: Options) -> tuple[pd.DataFrame, pd.DataFrame]:
    """ShareGPT rows -> (conversations, skipped rows with reasons)."""
    sources, source_rows = provenance(rows)
    source_ids = row_ids(rows, options.id_column, sources, source_rows)
    ids, all_messages, out_sources, out_rows, out_ids = [], [], [], [], []
    skipped_rows, skipped_reasons = [], []
    trimmed = 0
    for row, cell in enumerate(rows[options.column].tolist()):
        try:
            messages = to_messages(parse_turns(cell), options)
        except ValueError as error:
            skipped_rows.append(row), skipped_reasons.append(f"{KIND} skipped: {options.column} {error}")
            continue
        last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last_assistant is None:
            skipped_rows.append(row), skipped_reasons.append(f"{KIND} skipped: {options.column} has no assistant turn")
            continue
        if last_assistant < len(messages) - 1:
            messages, trimmed = messages[: last_assistant + 1], trimmed + 1
        ids.append(f"{sources[row]}:{source_rows[row]}:{KIND}:0")
        all_messages.append(messages)
        out_sources.append(sources[row]), out_rows.append(source_rows[row]), out_ids.append(source_ids[row])
    conversations = conversations_frame(
        ids=ids, messages=all_messages, kind=KIND, source=out_sources, source_row=out_rows, source_id=out_ids,
        phrasing_set="train", facts=[[] for _ in ids], stats={"trimmed_to_last_assistant": trimmed},
    )
    skipped = skipped_frame(skipped_rows, [KIND] * len(skipped_rows), [[options.column]] * len(skipped_rows), skipped_reasons)
    return conversations, skipped
