"""Tracking through transformers' integrations: TensorBoard event files read back with tensorboard's own reader."""

from transformers import AutoTokenizer

from loraflow.config.train import TrainConfig
from loraflow.tracking.report_to import report_to_value, tracking_variables
from tasks.train import train_adapter
from tests.tiny_llama import build_tiny_llama, tokens_frame


def test_report_to_names_and_variables():
    assert report_to_value([]) == "none" and report_to_value(["wandb-offline", "mlflow"]) == ["wandb", "mlflow"]
    added = tracking_variables(["mlflow", "wandb-offline"], "/x", tracking_uri="http://127.0.0.1:5000", experiment="e",
                               environ={"MLFLOW_TRACKING_URI": "http://from-env"})
    assert "MLFLOW_TRACKING_URI" not in added and added["MLFLOW_EXPERIMENT_NAME"] == "e" and added["WANDB_MODE"] == "offline"


def test_tensorboard_events_hold_the_training_curve(tmp_path):
    import pytest

    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model_dir = build_tiny_llama(tmp_path / "model")
    tokens = tokens_frame(AutoTokenizer.from_pretrained(model_dir))
    config = TrainConfig(max_steps=4, micro_batch_size=2, learning_rate=2e-2, report_to=["tensorboard"])
    result = train_adapter(tokens, model_dir, config, tmp_path / "train")
    event_files = list((tmp_path / "train").rglob("events.out.tfevents.*"))
    assert event_files, "no TensorBoard event file was written"
    events = EventAccumulator(str(event_files[0].parent)).Reload()
    losses = [scalar.value for scalar in events.Scalars("train/loss")]
    assert len(losses) == 4 and all(loss > 0 for loss in losses)
    assert [s.step for s in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert result.adapter_dir


def test_flattened_config_leaves_out_secrets_and_hides_url_credentials():
    from loraflow.tracking.report_to import flatten_config

    flat = flatten_config({"publish": {"hf_token_secret": "hub-token", "repo_id": "me/m"},
                           "sources": [{"kind": "sql", "url": "postgresql://loader:pw@db/x", "password_env": "DB_PW"}],
                           "train": {"target_modules": ["q_proj", "v_proj"], "tracking_uri": "https://u:key@mlflow.example"}})
    assert flat == {"publish.repo_id": "me/m", "sources.0.kind": "sql", "sources.0.url": "postgresql://***@db/x",
                    "sources.0.password_env": "DB_PW", "train.target_modules": "['q_proj', 'v_proj']",
                    "train.tracking_uri": "https://***@mlflow.example"}


def test_register_model_needs_mlflow_in_report_to():
    import pytest

    from loraflow.config.pipeline import PipelineConfig

    base = {"name": "x", "sources": [{"kind": "csv", "path": "a.csv"}], "publish": {"register_model": True}}
    with pytest.raises(ValueError, match="publish.register_model registers under training's MLflow run -> add mlflow"):
        PipelineConfig.model_validate(base)
    assert PipelineConfig.model_validate(base | {"train": {"report_to": ["mlflow"]}}).publish.register_model
