"""Config of the tokenize stage: lengths, masking, the train/validation split."""

from typing import Literal

from pydantic import Field

from loraflow.config.base import StrictModel

# Synthesizers that write held-out phrasings and natural questions of every row they train: with them the validation
# set is those questions (split "heldout"), so no row needs to be withheld from training.
PHRASING_VALIDATED = ("anime_qa", "table_qa")
ROW_HOLDOUT_DEFAULT = 0.1  # the share of source ids withheld when no synthesizer in use writes held-out questions


def default_validation_fraction(synthesizer_kinds) -> float:
    """tokenize.validation_fraction when the config leaves it unset: 0 (every row trained) when a synthesizer in use
    writes held-out phrasings, else ROW_HOLDOUT_DEFAULT."""
    return 0.0 if any(kind in PHRASING_VALIDATED for kind in synthesizer_kinds) else ROW_HOLDOUT_DEFAULT


class TokenizeConfig(StrictModel):
    """Tokenization, label masking and splitting of the formatted examples."""

    max_length: int = Field(512, ge=16, le=131072, description="Longest example in tokens.")
    truncation: Literal["drop", "truncate", "error"] = Field(
        "drop", description="Over-long examples: drop (quarantined), truncate (cut, counted), or error."
    )
    train_on_inputs: bool = Field(False, description="Also train on prompt tokens (default: answers only).")
    validation_fraction: float | None = Field(
        None, ge=0.0, lt=1.0,
        description="Share of source ids held out whole for validation: their rows are never trained, so the model "
        "will not know them (the run's summary names them in untrained_rows). Unset: 0 when a source uses anime_qa or "
        "table_qa (every row trained; the validation loss is taken on the trained rows' held-out phrasings and natural "
        "questions), else 0.1.",
    )
    split_salt: str = Field("loraflow", description="Salt of the hash that assigns a source id to train or validation.")
    dedupe: bool = Field(True, description="Remove exact duplicate examples (same token ids).")

    def rows_held_out(self) -> float:
        """The share of source ids withheld: the set fraction, else ROW_HOLDOUT_DEFAULT (PipelineConfig sets it
        from the synthesizers in use before any stage runs)."""
        return ROW_HOLDOUT_DEFAULT if self.validation_fraction is None else self.validation_fraction
