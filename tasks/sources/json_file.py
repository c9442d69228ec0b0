"""JSON source: a JSON array of objects, or JSON Lines (one object per line)."""

from typing import Literal

from pydantic import Field

from loraflow.config.base import StrictModel


class Config(StrictModel):
    """A JSON or JSONL file."""

    kind: Literal["json"] = Field("json", description="Source kind.")
    name: str | None = Field(None, description="Source name in provenance columns (default: the file name).")
    path: str = Field(..., description="Path of the .json / .jsonl file (relative to the config file).")
    lines: bool | None = Field(None, description="JSON Lines? None = guess from the first non-blank character.")
    encoding: str = Field("utf-8", description="Text encoding.")


def read(config: Config, base_dir):
    """Read the file into a DataFrame; bad lines are reported by line number."""
    raise NotImplementedError
