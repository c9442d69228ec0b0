"""Raw rows from one source, as read, plus provenance columns."""

import pandera.pandas as pa

from data_contracts.base import Contract

RAW = Contract(
    name="raw",
    version=1,
    columns={
        "_source": pa.Column(str, nullable=False, description="Source name (provenance)."),
        "_row": pa.Column(int, nullable=False, description="Row index within the source (provenance)."),
    },
    unique=(),
    extra_columns=True,  # a source's own columns, whatever they are
)
