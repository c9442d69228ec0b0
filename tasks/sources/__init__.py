"""Source registry: `kind` -> module with a `Config` model and a `read(config, base_dir)` function.

Adding a source is one module in this folder plus one line in SOURCES (see README, "Add a source").
"""

from typing import Annotated, Union

from pydantic import Field

from tasks.sources import csv_file, hf_hub, json_file

SOURCES = {
    "csv": csv_file,
    "json": json_file,
    "hf_hub": hf_hub,
}

SourceConfig = Annotated[Union[tuple(module.Config for module in SOURCES.values())], Field(discriminator="kind")]
