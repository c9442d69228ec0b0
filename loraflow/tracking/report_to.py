"""Experiment tracking through transformers' own `report_to` integrations (TensorBoard, MLflow, W&B offline).

    with tracking_environment(train_config, logs_dir):
        trainer.train()     # TrainingArguments(report_to=report_to_value(train_config.report_to))

TensorBoard's events go to <train output>/tensorboard/ (not its default under the checkpoints, which are removed
after a finished run). Only the variables the integrations read when training begins are set (MLFLOW_TRACKING_URI,
MLFLOW_EXPERIMENT_NAME, MLflow's HTTP retries, WANDB_MODE=offline), for the duration of training, and restored
afterwards; a tracking URI already in the environment wins over the config's. What the later stages add to the
MLflow run, and what happens when the tracker is down: loraflow.tracking.mlflow_run.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from pydantic import BaseModel, Field

# MLflow's HTTP client retries 7 times with backoff up to 120 s by default: minutes of stalled training per call
# while a server is away. Two retries (about 6 s) ride out a restart; the environment's own values win.
QUICK_MLFLOW_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
INTEGRATION_NAMES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb-offline": "wandb"}


class TrackingRun(BaseModel):
    """Where a stage's facts go: one MLflow run (small, JSON; rides in TrainResult and the run summary)."""

    tracking_uri: str = Field(..., description="Tracking URI, any user:password part replaced by ***.")
    experiment_id: str
    run_id: str
    run_name: str | None = None
    url: str | None = Field(None, description="The run's page in the MLflow UI (http(s) tracking URIs).")


def report_to_value(report_to: list[str]) -> list[str] | str:
    """TrainingArguments.report_to for loraflow's names ("none" when the list is empty)."""
    return [INTEGRATION_NAMES[name] for name in report_to] or "none"


def tracking_variables(report_to: list[str], logs_dir: Path, *, tracking_uri: str | None, experiment: str,
                       environ: dict) -> dict[str, str]:
    """The environment variables the chosen integrations read (only those not already set, URI from env first)."""
    wanted = {}
    if "mlflow" in report_to:
        if tracking_uri:
            wanted["MLFLOW_TRACKING_URI"] = tracking_uri
        wanted["MLFLOW_EXPERIMENT_NAME"] = experiment
        wanted |= QUICK_MLFLOW_RETRIES
    if "wandb-offline" in report_to:
        wanted |= {"WANDB_MODE": "offline", "WANDB_DIR": str(Path(logs_dir) / "wandb")}
    return {key: value for key, value in wanted.items() if key not in environ}


@contextlib.contextmanager
def tracking_environment(train_config, logs_dir: Path, resume_run_id: str | None = None):
    """Set the integrations' variables while the block runs, then restore the environment (None config: nothing).
    `resume_run_id`: the MLflow run an interrupted training reported to (MLFLOW_RUN_ID: the resumed run goes on in it)."""
    if train_config is None or not train_config.report_to:
        yield {}
        return
    added = tracking_variables(train_config.report_to, logs_dir, tracking_uri=train_config.tracking_uri,
                               experiment=train_config.tracking_experiment, environ=os.environ)
    if resume_run_id and "mlflow" in train_config.report_to and "MLFLOW_RUN_ID" not in os.environ:
        added["MLFLOW_RUN_ID"] = resume_run_id
    os.environ.update(added)
    try:
        yield added
    finally:
        for key in added:
            os.environ.pop(key, None)


def send_tensorboard_to(trainer, folder: Path) -> None:
    """Point transformers' TensorBoardCallback (if reporting to TensorBoard) at `folder` before training begins."""
    for callback in trainer.callback_handler.callbacks:
        if type(callback).__name__ == "TensorBoardCallback" and callback.tb_writer is None:
            callback.logging_dir = str(folder)


SECRET_WORDS = ("secret", "token", "password", "credential", "api_key")


def flatten_config(values: dict | list, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"train.learning_rate": "0.003", "sources.0.kind": "csv", ...}.

    Keys naming a secret (secret, token, password, credential, api_key) are left out, unless they name where a
    secret comes from (`password_env`); a URL's user:password part is replaced by `***`."""
    flat = {}
    items = values.items() if isinstance(values, dict) else enumerate(values)
    for key, value in items:
        name = f"{prefix}{key}"
        if any(word in str(key).lower() for word in SECRET_WORDS) and not str(key).endswith("_env"):
            continue
        if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(item, dict) for item in value)):
            flat |= flatten_config(value, f"{name}.")
        else:
            flat[name] = redact_url(str(value))[:500]  # MLflow's parameter value limit is generous, keep the form readable
    return flat


def redact_url(text: str) -> str:
    """`scheme://user:password@host` -> `scheme://***@host` wherever it appears in `text`."""
    return re.sub(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@", r"\1***@", text)
