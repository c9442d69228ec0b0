"""Hugging Face Hub source: `datasets.load_dataset` on a repo id or a local dataset folder."""

from typing import Literal

from pydantic import Field

from loraflow.config.base import StrictModel


class Config(StrictModel):
    """A dataset on the Hugging Face Hub (or a local folder laid out like one)."""

    kind: Literal["hf_hub"] = Field("hf_hub", description="Source kind.")
    name: str | None = Field(None, description="Source name in provenance columns (default: the repo id).")
    repo: str = Field(..., description="Dataset repo id (e.g. 'tatsu-lab/alpaca') or a local dataset folder.")
    config_name: str | None = Field(None, description="Dataset config (subset) name.")
    split: str = Field("train", description="Split to load.")
    revision: str | None = Field(None, description="Branch, tag or commit to pin.")


def read(config: Config, base_dir):
    """Load the split with `datasets.load_dataset` and return it as a DataFrame."""
    raise NotImplementedError
