"""The pipeline's MLflow run: opened by transformers' MLflowCallback when training begins, found again by the
later stages through its id (TrainResult.tracking, a TrackingRun).

    train      MLflowCallback: TrainingArguments as params, the curve (loss, grad_norm, learning_rate per step);
               loraflow adds the pipeline config flattened as `loraflow.*` params (no secrets: flatten_config),
               and train/loss_curve.png, loss_curve.parquet, metrics.json
    evaluate   metrics eval.<model>.<metric> for base, finetuned and previous (the model published last), and
               eval/eval_report.md, eval_metrics.json, eval_table.parquet
    publish    publish/README.md (the model card); with publish.register_model, the merged folder (model/) as a
               Model Registry version named after the run, tagged with the Prefect flow-run id

When the tracker is down (a tracker must never cost a finished training run):
- when training starts: `check_tracker` fails before the model loads, naming the URI and the fix; nothing is lost.
- while training: BestEffortTracking logs one warning and stops the callback; training goes on and the adapter
  is saved. The run keeps the steps it got.
- a training resumed from a checkpoint goes on in the interrupted run (its id is kept beside the checkpoints).
- files and evaluation metrics: best effort too, a warning (the files stay in the store).
- registration is asked for, so it is not best effort: it fails the publish, and is idempotent (a version is
  found again by run id and model hash), so the re-run that follows adds no second version.
Each stage logs inside its cached task, so a cached re-run logs nothing twice and registers no new version.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path

from transformers import TrainerCallback

from loraflow.tracking.report_to import QUICK_MLFLOW_RETRIES, TrackingRun, flatten_config, redact_url

log_default = logging.getLogger("loraflow.tracking.report_to")
RUN_FILE = "loraflow-mlflow-run.json"  # in the checkpoints folder: the run a resumed training goes on in


class TrackerError(RuntimeError):
    """The configured tracker cannot be used (not installed, or not answering when training starts)."""


def pipeline_params(config: dict) -> dict[str, str]:
    """The pipeline config (model_dump(mode="json")) as MLflow params `loraflow.<key>`, without secrets; the
    prefix keeps them apart from the TrainingArguments that MLflowCallback logs. Characters MLflow refuses in a
    key (a general question's "?" or "+") become "_"."""
    return {re.sub(r"[^0-9A-Za-z_\-. /:]", "_", f"loraflow.{key}")[:250]: value for key, value in flatten_config(config).items()}


def resolved_tracking_uri(config_uri: str | None) -> str | None:
    """MLFLOW_TRACKING_URI from the environment, else the config's (None: MLflow's default)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or config_uri


def client_uri(run: TrackingRun) -> str:
    """The URI to talk to `run`'s server: the environment's when it is the same one (it may hold credentials
    that the stored, redacted URI leaves out)."""
    from_env = os.environ.get("MLFLOW_TRACKING_URI")
    return from_env if from_env and redact_url(from_env) == run.tracking_uri else run.tracking_uri


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The MLflow UI's page of a run, for a server URI."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


@contextlib.contextmanager
def quick_retries():
    """MLflow's client with loraflow's short retries (unless the environment sets its own) for the block."""
    added = {key: value for key, value in QUICK_MLFLOW_RETRIES.items() if key not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def check_tracker(train_config) -> None:
    """With mlflow in train.report_to: refuse before any model is loaded when mlflow is missing or its server
    does not answer (a run that cannot be tracked costs nothing yet)."""
    if "mlflow" not in train_config.report_to:
        return
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as error:
        raise TrackerError("train.report_to has mlflow but mlflow is not installed -> `make setup` installs it "
                           "(docs/tracking-and-export.md, 'Watch it in MLflow'), or drop mlflow from train.report_to") from error
    uri = resolved_tracking_uri(train_config.tracking_uri)
    try:
        with quick_retries():
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as error:
        shown = redact_url(uri or "MLflow's default tracking URI")
        raise TrackerError(f"MLflow at {shown} did not answer ({type(error).__name__}: {redact_url(str(error))[:300]}); "
                           "nothing was trained -> start the server (docs/tracking-and-export.md, 'Watch it in MLflow'), fix "
                           "MLFLOW_TRACKING_URI / train.tracking_uri, or drop mlflow from train.report_to") from error


class BestEffortTracking(TrainerCallback):
    """Wraps transformers' MLflowCallback so that a tracker failure while training is one warning, not a lost run;
    records the run the callback opened (`run`) and adds `params` (the flattened pipeline config) to it."""

    EVENTS = ("on_train_begin", "on_log", "on_save", "on_train_end")

    def __init__(self, inner, *, params: dict[str, str] | None = None, log=None):
        self.inner = inner
        self.params = params or {}
        self.log = log or log_default
        self.failure: str | None = None
        self.run: TrackingRun | None = None

    def _call(self, event: str, args, state, control, **kwargs) -> None:
        if self.failure is not None:
            return
        try:
            getattr(self.inner, event)(args, state, control, **kwargs)
        except Exception as error:  # any tracker failure; training itself is unaffected
            self.failure = f"{event} at step {state.global_step}: {type(error).__name__}: {redact_url(str(error))[:300]}"
            self.log.warning("train: MLflow stopped recording (%s); training goes on without it", self.failure)

    def on_train_begin(self, args, state, control, **kwargs):
        import mlflow

        if os.environ.get("MLFLOW_TRACKING_URI"):  # the fluent API keeps a URI set earlier in this process
            mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        self._call("on_train_begin", args, state, control, **kwargs)
        active = mlflow.active_run() if self.failure is None and state.is_world_process_zero else None
        if active is None:
            return
        uri = mlflow.get_tracking_uri()
        self.run = TrackingRun(tracking_uri=redact_url(uri), experiment_id=active.info.experiment_id,
                               run_id=active.info.run_id, run_name=active.info.run_name,
                               url=run_url(redact_url(uri), active.info.experiment_id, active.info.run_id))
        from loraflow.runtime.atomic_files import write_json_atomic

        write_json_atomic(Path(args.output_dir) / RUN_FILE, self.run.model_dump())
        if self.params:
            self._call_client("params", lambda: log_facts(self.run, params=self.params))

    def _call_client(self, what: str, call) -> None:
        try:
            call()
        except Exception as error:
            self.log.warning("train: MLflow run %s did not take the %s (%s)", self.run.run_id, what, redact_url(str(error))[:300])

    def on_log(self, args, state, control, **kwargs):
        self._call("on_log", args, state, control, **kwargs)

    def on_save(self, args, state, control, **kwargs):
        self._call("on_save", args, state, control, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        self._call("on_train_end", args, state, control, **kwargs)


def interrupted_run_id(checkpoints_dir: Path) -> str | None:
    """The MLflow run an interrupted training in `checkpoints_dir` reported to (None: none recorded)."""
    path = Path(checkpoints_dir) / RUN_FILE
    return json.loads(path.read_text())["run_id"] if path.exists() else None


def wrap_tracking_callbacks(trainer, params: dict[str, str] | None, log=None) -> None:
    """Replace the Trainer's MLflowCallback (report_to has mlflow) by BestEffortTracking around it."""
    for callback in list(trainer.callback_handler.callbacks):
        if type(callback).__name__ == "MLflowCallback":
            trainer.remove_callback(callback)
            trainer.add_callback(BestEffortTracking(callback, params=params, log=log))


def tracked_run(trainer) -> TrackingRun | None:
    """The MLflow run this Trainer's training reported to (None: not reporting to MLflow, or it failed early)."""
    return next((callback.run for callback in trainer.callback_handler.callbacks
                 if isinstance(callback, BestEffortTracking)), None)


# ---- the later stages' facts ---------------------------------------------------------------------------

def log_facts(run: TrackingRun, *, params: dict[str, str] | None = None, metrics: dict[str, float] | None = None,
              files: list[Path | str] | None = None, folder: str | None = None) -> None:
    """Params, metrics (step 0) and files (under `folder`) to `run`; raises what MLflow raises."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    with quick_retries():
        client = MlflowClient(tracking_uri=client_uri(run))
        now = int(time.time() * 1000)
        params, metrics = list((params or {}).items()), list((metrics or {}).items())
        for start in range(0, max(len(params), len(metrics), 1), 100):  # MLflow takes 100 params per batch
            client.log_batch(run.run_id, params=[Param(k, v) for k, v in params[start:start + 100]],
                             metrics=[Metric(k, float(v), now, 0) for k, v in metrics[start:start + 100]])
        for path in files or []:
            if path and Path(path).exists():
                client.log_artifact(run.run_id, str(path), artifact_path=folder)


def log_best_effort(run: TrackingRun | None, stage: str, log=None, **facts) -> bool:
    """log_facts, with a warning instead of an error when the tracker fails; False when nothing was logged."""
    log = log or log_default
    if run is None:
        return False
    try:
        log_facts(run, **facts)
    except Exception as error:
        log.warning("%s: MLflow run %s at %s was not updated (%s: %s); the files stay in the store", stage, run.run_id,
                    run.tracking_uri, type(error).__name__, redact_url(str(error))[:300])
        return False
    return True


def evaluation_metrics(per_model: dict[str, dict | None], gate_passed: bool | None = None) -> dict[str, float]:
    """{"eval.finetuned.fact_accuracy": 0.9, ...} for every numeric metric of every model evaluated, and
    eval.gate_passed when the gate was decided (the gate step logs it: tasks/gate.py)."""
    metrics = {f"eval.{model}.{name}": float(value) for model, summary in per_model.items() if summary
               for name, value in summary.items() if isinstance(value, (int, float))}
    return metrics | ({"eval.gate_passed": float(gate_passed)} if gate_passed is not None else {})


def register_model(run: TrackingRun, model_dir: Path, name: str, *, files: dict[str, str], tags: dict[str, str]) -> str:
    """Log the merged folder under the run's model/ and register it as a version of `name`; returns the version.

    Idempotent: a version of `name` from this run whose loraflow_model_sha256 tag is this folder's (the hash of
    its file list) is returned as it is, so a publish retried after a failure registers once."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    model_sha = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    with quick_retries():
        client = MlflowClient(tracking_uri=client_uri(run))
        try:
            client.create_registered_model(name)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        for version in client.search_model_versions(f"name = '{name}' and run_id = '{run.run_id}'"):
            if version.tags.get("loraflow_model_sha256") == model_sha:
                return version.version
        client.log_artifacts(run.run_id, str(model_dir), artifact_path="model")
        version = client.create_model_version(name, f"runs:/{run.run_id}/model", run_id=run.run_id,
                                              tags={**tags, "loraflow_model_sha256": model_sha})
    return version.version


def set_champion_alias(record: dict) -> str:
    """Point the alias `champion` of the registered model at `record`'s registry version, when its publish
    registered one (publish.register_model); returns a note for the console ("" when there is nothing to move).
    Best effort: the local record has already moved; a tracker that is down is named, not raised."""
    tracking, name, number = record.get("tracking"), record.get("registered_model"), record.get("registered_version")
    if not (tracking and name and number):
        return ""
    from mlflow.tracking import MlflowClient

    run = TrackingRun(**tracking)
    try:
        with quick_retries():
            MlflowClient(tracking_uri=client_uri(run)).set_registered_model_alias(name, "champion", str(number))
    except Exception as error:
        return (f"; MLflow alias not moved ({type(error).__name__}: {redact_url(str(error))[:200]}) -> run the same "
                "command again once the tracker is up")
    return f"; MLflow {name} alias champion -> version {number}"
