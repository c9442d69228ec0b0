"""Source registry: `kind` -> module that implements the source interface (loraflow/sources/common.py).

Adding a source is one module in this folder plus one line in SOURCES (docs/add_a_source.md walks through
it). The module defines `Config`, `read`, `default_name`, `locations`, `fingerprint` and `check`; a module
missing one is refused here, on import, by name. `read` returns the rows as a DataFrame, one row per record
in source order; a format whose single records can be broken (JSON Lines) returns `(rows, rejected)` instead:
rows indexed by record position and a list of `Rejected`, which the ingest stage quarantines with their reasons.
Core code asks these functions (below) and never looks at a source's field names.
"""

from typing import Annotated, Union

from pydantic import Field

from loraflow.sources import csv_file, hf_hub, json_file, parquet_file, sql
from loraflow.sources.common import Location, Rejected, SourceError

SOURCES = {
    "csv": csv_file,
    "json": json_file,
    "hf_hub": hf_hub,
    "parquet": parquet_file,
    "sql": sql,
}

INTERFACE = ("Config", "read", "default_name", "locations", "fingerprint", "check")


def missing_interface(module) -> list[str]:
    """The names of the source interface `module` does not define."""
    return [name for name in INTERFACE if not callable(getattr(module, name, None))]


for _kind, _module in SOURCES.items():
    if missing_interface(_module):
        raise TypeError(f"source {_kind!r} ({_module.__name__}) lacks {missing_interface(_module)} -> define them "
                        f"(docs/add_a_source.md; file sources can import the file_* ones from loraflow.sources.common)")

SourceConfig = Annotated[Union[tuple(module.Config for module in SOURCES.values())], Field(discriminator="kind")]


def source_name(source) -> str:
    """The provenance name of a source: its `name:`, else the source's own default (a file name, a repo id)."""
    return source.name or SOURCES[source.kind].default_name(source)


def source_locations(source, base_dir) -> list[Location]:
    """Every place the source reads (local files and folders are confined; addresses go into the summary)."""
    return SOURCES[source.kind].locations(source, base_dir)


def source_fingerprint(source, base_dir) -> str:
    """What the source's data is now, for the ingest cache key: it changes whenever the rows read would."""
    return SOURCES[source.kind].fingerprint(source, base_dir)


def check_source(source, base_dir) -> list[str]:
    """Problems reading the source (missing, unreachable, unreadable), each with its fix; [] when it can be read."""
    try:
        return SOURCES[source.kind].check(source, base_dir)
    except SourceError as error:
        return [str(error)]


def source_columns(source, base_dir) -> list[str] | None:
    """The columns the source's rows will have, where its module can tell without reading the rows (an optional
    `column_names(config, base_dir)`: csv, parquet); None when it cannot be known before ingest."""
    names = getattr(SOURCES[source.kind], "column_names", None)
    if names is None:
        return None
    try:
        return names(source, base_dir)
    except (SourceError, OSError, ValueError):
        return None  # check_source reports a source it cannot read


__all__ = ["SOURCES", "INTERFACE", "SourceConfig", "Location", "Rejected", "SourceError", "check_source",
           "missing_interface", "source_columns", "source_fingerprint", "source_locations", "source_name"]
