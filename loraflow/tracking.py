"""Experiment tracking through transformers' own `report_to` integrations (TensorBoard, MLflow, W&B offline).

    with tracking_environment(train_config, logs_dir):
        trainer.train()     # TrainingArguments(report_to=report_to_value(train_config.report_to))

TensorBoard's events go to <train output>/tensorboard/ (not its default under the checkpoints, which are removed
after a finished run). Only the variables the integrations read when training
begins are set (MLFLOW_TRACKING_URI,
MLFLOW_EXPERIMENT_NAME, WANDB_MODE=offline), for the duration of training, and restored afterwards; a tracking URI
already in the environment wins over the config's.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

INTEGRATION_NAMES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb-offline": "wandb"}


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
    if "wandb-offline" in report_to:
        wanted |= {"WANDB_MODE": "offline", "WANDB_DIR": str(Path(logs_dir) / "wandb")}
    return {key: value for key, value in wanted.items() if key not in environ}


@contextlib.contextmanager
def tracking_environment(train_config, logs_dir: Path):
    """Set the integrations' variables while the block runs, then restore the environment (None config: nothing)."""
    if train_config is None or not train_config.report_to:
        yield {}
        return
    added = tracking_variables(train_config.report_to, logs_dir, tracking_uri=train_config.tracking_uri,
                               experiment=train_config.tracking_experiment, environ=os.environ)
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


def flatten_config(values: dict, prefix: str = "") -> dict[str, str]:
    """Nested config dict -> {"train.learning_rate": "0.003", ...}; keys naming a secret or token are left out."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if any(word in key.lower() for word in ("secret", "token", "password")) and not key.endswith("_env"):
            continue
        if isinstance(value, dict):
            flat |= flatten_config(value, f"{name}.")
        else:
            flat[name] = str(value)[:500]  # MLflow's parameter value limit is generous, keep the form readable
    return flat


def log_run_facts(run_id: str, *, params: dict[str, str] | None = None, metrics: dict[str, float] | None = None,
                  artifacts: list[Path] | None = None, tracking_uri: str | None = None) -> None:
    """Add pipeline facts (flattened config, eval metrics per model, report / curve / card files) to an MLflow run."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    import time

    now = int(time.time() * 1000)
    client.log_batch(run_id, params=[Param(k, v) for k, v in (params or {}).items()],
                     metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()])
    for path in artifacts or []:
        client.log_artifact(run_id, str(path))


def register_model(run_id: str, model_dir: Path, name: str, flow_run_id: str | None, tracking_uri: str | None = None) -> str:
    """Log the merged folder as run artifacts and register it in the Model Registry; returns the version."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    client.log_artifacts(run_id, str(model_dir), artifact_path="model")
    try:
        client.create_registered_model(name)
    except Exception:  # already registered: a new version is added below
        pass
    version = client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id,
                                          tags={"prefect_flow_run_id": flow_run_id or "none"})
    return version.version
