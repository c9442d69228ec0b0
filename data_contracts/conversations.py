"""Conversations made by a synthesizer: the unit every later stage works on."""

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
        return messages[-1].get("role") != "assistant"

    return frame["messages"].map(bad)


CONVERSATIONS = Contract(
    name="conversations",
    version=1,
    columns={
        "id": pa.Column(str, nullable=False, description="Unique example id."),
        "messages": pa.Column(object, nullable=False, description="List of {role: system|user|assistant, content}."),
        "kind": pa.Column(str, nullable=False, description="Question kind / example type."),
        "source": pa.Column(str, nullable=False, description="Source name (provenance)."),
        "source_row": pa.Column(int, nullable=False, description="Row index within the source."),
        "source_id": pa.Column(str, nullable=False, description="Id of the source row; the split groups by it."),
        "phrasing_set": pa.Column(str, pa.Check.isin(["train", "heldout"]), description="train, or heldout (evaluation only)."),
        "facts": pa.Column(object, nullable=False, description="List of {column, value} the answer states (may be empty)."),
    },
    row_rules=(
        RowRule("bad_messages", "messages must be non-empty turns with known roles and text, ending with an assistant turn", _bad_messages),
    ),
    unique=("id",),
)
