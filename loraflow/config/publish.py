"""Config of the publish stage: where the merged model goes."""

from typing import Literal

from pydantic import Field, model_validator

from loraflow.config.base import StrictModel


DEFAULT_GGUF_TOLERANCE = {"f16": 1.0, "q8_0": 2.0}


class GGUFConfig(StrictModel):
    """GGUF export of the merged model (llama.cpp / Ollama / LM Studio)."""

    quantization: Literal["f16", "q8_0"] = Field("f16", description="f16 (exact up to float16) or q8_0 (8-bit blocks, about half the size).")
    tolerance: float | None = Field(
        None, gt=0, description="Max |logit difference| allowed between the GGUF (read back by transformers) and the "
        "merged model; default by quantization: f16 1.0, q8_0 2.0 (SmolLM2-135M measured 1.02 in q8_0).")

    @property
    def max_logit_difference(self) -> float:
        """The tolerance in force: the configured one, else the quantization's default."""
        return self.tolerance if self.tolerance is not None else DEFAULT_GGUF_TOLERANCE[self.quantization]


class PublishConfig(StrictModel):
    """Publishing the merged 16-bit model (the adapter is always kept too)."""

    target: Literal["local", "hf_hub"] = Field("local", description="local folder (default) or hf_hub.")
    repo_id: str | None = Field(None, description="Hub repo id, for target=hf_hub.")
    private: bool = Field(True, description="Create the hub repo as private.")
    branch: str = Field("main", description="Hub branch that receives the model once verified.")
    hf_token_secret: str | None = Field(
        None, description="Name of a Prefect Secret block holding the hub token (else the HF_TOKEN environment variable)."
    )
    merge_tolerance: float = Field(1e-2, gt=0, description="Max |logit difference| allowed between merged and base+adapter.")
    merge_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description=(
            "Precision of the merge and its logit check (never 4-bit). float32 makes the check exact up to float "
            "error; bfloat16 halves memory for very large models but needs a looser merge_tolerance. The merged "
            "weights are saved in the base model's own dtype either way, and the saved file is checked bit for bit."
        ),
    )
    gguf: GGUFConfig | None = Field(None, description="Also write model-<quantization>.gguf beside the merged weights (null: no GGUF).")
    register_model: bool = Field(
        False,
        description=(
            "Also register the merged model in the MLflow Model Registry (name: the run name; tags: the Prefect "
            "flow-run id, the adapter fingerprint) under training's MLflow run. Needs mlflow in train.report_to. "
            "Once per adapter and publish config: a cached re-run adds no version."
        ),
    )
    verify_prompts: int = Field(4, ge=1, le=64, description="Validation examples whose logits the merge check compares.")
    hub_retries: int = Field(
        3, ge=0, le=10,
        description="Times a hub request is sent again after a connection error, timeout or 408/429/5xx (never after 4xx).",
    )
    hub_retry_delay: float = Field(2.0, ge=0, le=120, description="Seconds before the first hub retry; doubled for each next one.")

    @model_validator(mode="after")
    def _hub_needs_repo(self):
        if self.target == "hf_hub" and not self.repo_id:
            raise ValueError("publish.target=hf_hub needs publish.repo_id (e.g. 'my-org/my-model')")
        return self
