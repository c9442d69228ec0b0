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
