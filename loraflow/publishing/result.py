"""What the publish stage returns (PublishResult): where the merged model went and how it was checked.

Shared by the publish stage (tasks/publish.py) and the run summary (loraflow.runs.summary), whose publish section
carries these fields.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class PublishResult(BaseModel):
    """Where the merged model went and how it was checked."""

    model_dir: str
    files: dict[str, str] = Field(..., description="Relative path -> sha256 of every published file.")
    max_logit_diff: float
    merge_dtype: str
    saved_dtype: str
    target: str
    gguf_file: str | None = None
    gguf_max_logit_diff: float | None = None
    hub_repo: str | None = None
    hub_run_branch: str | None = None
    hub_run_commit: str | None = None
    hub_branch: str | None = None
    hub_commit: str | None = None
    registered_model: str | None = Field(None, description="MLflow Model Registry name (publish.register_model).")
    registered_version: str | None = Field(None, description="Its version holding this merged model.")
    timing: dict[str, float] = Field(default_factory=dict, description="Seconds of publish's steps: load (the base, "
                                     "unquantized), merge (load, reference logits, merge, check), save (write, verify, hashes), gguf_export, gguf_check.")
    seconds: float
