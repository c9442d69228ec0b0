"""instruction: Alpaca-style rows (instruction, optional input, output, optional system) -> one conversation each.

The user message's `content` is the instruction, followed by a blank line and the input when there is one;
the input is also kept on that message under the key `input`, so a template with a separate input section
(alpaca `### Input:`, ko_instruction `###입력:`) can place it (see data_contracts/conversations.py). Text is
kept as written (only outer whitespace is trimmed), so Korean spacing and code indentation survive. A row
with an empty instruction or output is skipped with a reason.
"""

import pandas as pd
from pydantic import ConfigDict, Field

from loraflow.config.base import StrictModel
from loraflow.synthesizers.common import (
    column_text, conversations_frame, provenance, row_ids, skipped_frame, text_or_none,
)
from loraflow.synthesizers.facts import FactType

# The types of the facts this synthesizer renders (loraflow/synthesizers/facts.py): none, it copies text as written.
FACT_TYPES: dict[str, FactType] = {}

KIND = "instruction"


class Options(StrictModel):
    """Options of the instruction synthesizer (Alpaca-style rows)."""

    model_config = ConfigDict(title="InstructionOptions")

    instruction_column: str = Field("instruction", description="Column with the instruction.")
    input_column: str | None = Field("input", description="Optional column with extra input; empty means none.")
    output_column: str = Field("output", description="Column with the reference answer.")
    system_column: str | None = Field(None, description="Optional column with a per-row system prompt.")
    id_column: str | None = Field(None, description="Optional column with a stable row id; else source + row index.")


def required_columns(options: Options) -> dict[str, str]:
    """Config key (under synthesize.instruction) -> source column."""
    keys = ("instruction_column", "input_column", "output_column", "system_column", "id_column")
    return {key: getattr(options, key) for key in keys if getattr(options, key) is not None}


def expansion(options: Options) -> tuple[int, int]:
    """(units per input row, conversations per emitted unit)."""
    return 1, 1


def user_message(instruction: str, input_text: str | None) -> dict:
    """The user turn: content = instruction [+ "\\n\\n" + input], plus `input` when there is one."""
    if not input_text:
        return {"role": "user", "content": instruction}
    return {"role": "user", "content": f"{instruction}\n\n{input_text}", "input": input_text}


def synthesize(rows: pd.DataFrame, options: Options) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Instruction rows -> (conversations, skipped rows with reasons)."""
    sources, source_rows = provenance(rows)
    source_ids = row_ids(rows, options.id_column, sources, source_rows)
    instructions = text_or_none(column_text(rows, options.instruction_column))
    outputs = text_or_none(column_text(rows, options.output_column))
    inputs = text_or_none(column_text(rows, options.input_column)) if options.input_column else [None] * len(rows)
    systems = text_or_none(column_text(rows, options.system_column)) if options.system_column else [None] * len(rows)

    ids, messages, out_sources, out_rows, out_ids = [], [], [], [], []
    skipped_rows, skipped_columns, skipped_reasons = [], [], []
    for row, (instruction, input_text, output, system) in enumerate(zip(instructions, inputs, outputs, systems)):
        required = ((options.instruction_column, instruction), (options.output_column, output))
        empty = [column for column, value in required if value is None]
        if empty:
            skipped_rows.append(row), skipped_columns.append(empty)
            skipped_reasons.append(f"{KIND} skipped: " + ", ".join(f"{column} is empty" for column in empty))
            continue
        turns = [{"role": "system", "content": system}] if system else []
        turns += [user_message(instruction, input_text), {"role": "assistant", "content": output}]
        ids.append(f"{sources[row]}:{source_rows[row]}:{KIND}:0")
        messages.append(turns)
        out_sources.append(sources[row]), out_rows.append(source_rows[row]), out_ids.append(source_ids[row])
    conversations = conversations_frame(
        ids=ids, messages=messages, kind=KIND, source=out_sources, source_row=out_rows, source_id=out_ids,
        phrasing_set="train", facts=[[] for _ in ids],
    )
    return conversations, skipped_frame(skipped_rows, [KIND] * len(skipped_rows), skipped_columns, skipped_reasons)
