"""Source registry: `kind` -> module with a `Config` model and a `read(config, base_dir)` function.

Adding a source is one module in this folder plus one line in SOURCES (docs/add_a_source.md walks through
it). `read` returns the rows as a DataFrame, one row per record in source order; a format whose single
records can be broken (JSON Lines) returns `(rows, rejected)` instead: rows indexed by record position and a
list of `Rejected`, which the ingest stage quarantines with their reasons.
"""

from typing import Annotated, Union

from pydantic import Field

from tasks.sources import csv_file, hf_hub, json_file, parquet_file
from tasks.sources.common import Rejected, SourceError

SOURCES = {
    "csv": csv_file,
    "json": json_file,
    "hf_hub": hf_hub,
    "parquet": parquet_file,
}

SourceConfig = Annotated[Union[tuple(module.Config for module in SOURCES.values())], Field(discriminator="kind")]

__all__ = ["SOURCES", "SourceConfig", "Rejected", "SourceError"]
