"""CSV source: one file, any encoding, BOM and quoted multi-line fields handled."""

from typing import Literal

from pydantic import Field

from loraflow.config.base import StrictModel


class Config(StrictModel):
    """A CSV file."""

    kind: Literal["csv"] = Field("csv", description="Source kind.")
    name: str | None = Field(None, description="Source name in provenance columns (default: the file name).")
    path: str = Field(..., description="Path of the CSV file (relative to the config file).")
    encoding: str = Field("utf-8", description="Text encoding, e.g. utf-8, cp949, latin-1. A UTF-8 BOM is always accepted.")
    delimiter: str = Field(",", min_length=1, max_length=1, description="Field delimiter.")


def read(config: Config, base_dir):
    """Read the CSV into a DataFrame of strings (types are the synthesizer's business)."""
    raise NotImplementedError
