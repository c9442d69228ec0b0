"""Quarantine: rows set aside by any stage, kept verbatim with the reason."""

import pandera.pandas as pa

from data_contracts.base import Contract

QUARANTINE = Contract(
    name="quarantine",
    version=1,
    columns={
        "contract": pa.Column(str, description="Contract or stage that set the row aside."),
        "reason": pa.Column(str, description="Why: rule name and explanation."),
        "row_index": pa.Column(int, description="Row position in the stage's input."),
        "row_json": pa.Column(str, description="The row itself, as JSON."),
    },
    allow_empty=True,
    extra_columns=True,  # stages add context columns (kind, columns, ...)
)
