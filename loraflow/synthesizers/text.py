"""text: one text column -> a single assistant turn (plain language modelling; the format stage renders it raw)."""

import pandas as pd
from pydantic import ConfigDict, Field

from loraflow.config.base import StrictModel
from loraflow.synthesizers.common import column_text, conversations_frame, provenance, row_ids, skipped_frame
from loraflow.synthesizers.facts import FactType

# The types of the facts this synthesizer renders (loraflow/synthesizers/facts.py): none, it copies text as written.
FACT_TYPES: dict[str, FactType] = {}

KIND = "text"


class Options(StrictModel):
    """Options of the text synthesizer (plain language modelling on one column)."""

    model_config = ConfigDict(title="TextOptions")

    column: str = Field("text", description="Column with the text to train on.")
    id_column: str | None = Field(None, description="Optional column with a stable row id.")


def required_columns(options: Options) -> dict[str, str]:
    """Config key (under synthesize.text) -> source column."""
    return {key: getattr(options, key) for key in ("column", "id_column") if getattr(options, key) is not None}


def expansion(options: Options) -> tuple[int, int]:
    """(units per input row, conversations per emitted unit)."""
    return 1, 1


def synthesize(rows: pd.DataFrame, options: Options) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Text rows -> (conversations, skipped rows with reasons). The text is kept exactly as written."""
    sources, source_rows = provenance(rows)
    source_ids = row_ids(rows, options.id_column, sources, source_rows)
    texts = column_text(rows, options.column)
    kept = [row for row, text in enumerate(texts) if text is not None and text.strip()]
    empty = sorted(set(range(len(rows))) - set(kept))
    conversations = conversations_frame(
        ids=[f"{sources[row]}:{source_rows[row]}:{KIND}:0" for row in kept],
        messages=[[{"role": "assistant", "content": texts[row]}] for row in kept],
        kind=KIND, source=[sources[row] for row in kept], source_row=[source_rows[row] for row in kept],
        source_id=[source_ids[row] for row in kept], phrasing_set="train", facts=[[] for _ in kept],
    )
    skipped = skipped_frame(empty, [KIND] * len(empty), [[options.column]] * len(empty),
                            [f"{KIND} skipped: {options.column} is empty"] * len(empty))
    return conversations, skipped
