"""Config of the tokenize stage: lengths, masking, the train/validation split."""

from typing import Literal

from pydantic import Field

from loraflow.config.base import StrictModel


class TokenizeConfig(StrictModel):
    """Tokenization, label masking and splitting of the formatted examples."""

    max_length: int = Field(512, ge=16, le=131072, description="Longest example in tokens.")
    truncation: Literal["drop", "truncate", "error"] = Field(
        "drop", description="Over-long examples: drop (quarantined), truncate (cut, counted), or error."
    )
    train_on_inputs: bool = Field(False, description="Also train on prompt tokens (default: answers only).")
    validation_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of source ids held out for validation.")
    split_salt: str = Field("loraflow", description="Salt of the hash that assigns a source id to train or validation.")
    dedupe: bool = Field(True, description="Remove exact duplicate examples (same token ids).")
