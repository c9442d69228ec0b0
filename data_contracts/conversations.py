"""Conversations made by a synthesizer: the unit every later stage works on.

`messages`: a list of turns `{"role": "system" | "user" | "assistant", "content": str}`, ending with an
assistant turn; no system turn unless the source row had one (the format stage adds the configured one).
A plain-text example (kind "text") is a single assistant turn, rendered raw by the format stage.

`input` (instruction data only): a user turn whose source row had a separate input carries it twice:
    {"role": "user", "content": instruction + "\n\n" + input, "input": input}
so chat templates need nothing special, and templates with their own input section (alpaca `### Input:`,
ko_instruction `###입력:`) recover the instruction as `content[: -len(input) - 2]` and place `input` apart.
A turn without an input has no `input` key; after a Parquet round trip every turn of an artifact that has
one anywhere reads back with `"input": None`, so readers treat a missing, None or "" input alike.

`facts`: a list of `{"column": source column, "value": str}`, each value stated verbatim in the final
assistant turn (the synthesizer checks this before emitting); one entry per item of a list column
(genres, studios, ...). Empty for data without checkable facts (instruction, conversations, text).

`id` is `<source>:<source row>:<kind>:<phrasing index>`; `source_id` groups every example of one source
record (anime_qa: the anime_id) so a split keeps them together; `phrasing_set` is "heldout" for question
wordings kept out of training, "natural" for questions asked the way users ask and "unknown" for questions
about made-up titles (all three evaluation only; the tokenize stage puts them in split "heldout").
"""

import pandas as pd
import pandera.pandas as pa

from data_contracts.base import Contract, RowRule

ROLES = {"system", "user", "assistant"}


def _bad_messages(frame: pd.DataFrame) -> pd.Series:
    def bad(messages) -> bool:
        if messages is None or len(messages) == 0:
            return True
        for message in messages:
            if message.get("role") not in ROLES or not isinstance(message.get("content"), str):
                return True
            if not message["content"].strip():
                return True
            extra_input = message.get("input")
            if extra_input and not message["content"].endswith("\n\n" + extra_input):
                return True
        return messages[-1].get("role") != "assistant"

    return frame["messages"].map(bad)


CONVERSATIONS = Contract(
    name="conversations",
    version=2,
    columns={
        "id": pa.Column(str, nullable=False, description="Unique example id."),
        "messages": pa.Column(object, nullable=False, description="List of {role: system|user|assistant, content}."),
        "kind": pa.Column(str, nullable=False, description="Question kind / example type."),
        "source": pa.Column(str, nullable=False, description="Source name (provenance)."),
        "source_row": pa.Column(int, nullable=False, description="Row index within the source."),
        "source_id": pa.Column(str, nullable=False, description="Id of the source row; the split groups by it."),
        "phrasing_set": pa.Column(str, pa.Check.isin(["train", "heldout", "natural", "unknown"]),
                                  description="train, or heldout / natural / unknown (evaluation only)."),
        "facts": pa.Column(object, nullable=False, description="List of {column, value} the answer states (may be empty)."),
    },
    row_rules=(
        RowRule(
            "bad_messages",
            "messages must be non-empty turns with known roles and text, ending with an assistant turn "
            "(a turn's `input`, if any, must end its content after a blank line)",
            _bad_messages,
        ),
    ),
    unique=("id",),
)
