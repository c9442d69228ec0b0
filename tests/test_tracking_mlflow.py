"""MLflow through transformers' MLflowCallback, against a real `mlflow server` (SQLite) on a loopback port: the run
training opens is found again (TrainResult.tracking), takes params / metrics / files, registers once; a server that
is down when training starts fails before anything loads, one that goes away mid-run costs only the tracking."""

import logging

import pytest
from transformers import AutoTokenizer, TrainerCallback

from loraflow.config.train import TrainConfig
from loraflow.tracking.mlflow_run import (BestEffortTracking, TrackerError, check_tracker, evaluation_metrics, log_facts,
                                 pipeline_params, register_model)
from tasks.train import train_adapter
from tests.mlflow_server import free_port
from tests.mlflow_server import mlflow_server as start_mlflow_server
from tests.tiny_llama import build_tiny_llama, tokens_frame

SENTINEL = "hf_SENTINEL_do_not_leak_0123456789"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    pytest.importorskip("mlflow")
    with start_mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    model_dir = build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")
    return model_dir, tokens_frame(AutoTokenizer.from_pretrained(model_dir))


def test_training_curve_params_metrics_artifacts_and_registry(mlflow_server, tiny_model, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    model_dir, tokens = tiny_model
    config = TrainConfig(max_steps=4, micro_batch_size=2, learning_rate=2e-2, report_to=["mlflow"],
                         tracking_uri=mlflow_server, tracking_experiment="loraflow-test")
    params = pipeline_params({"name": "demo", "train": config.model_dump(mode="json"),
                              "eval": {"general_expected": {"What is 2 + 2?": "4|four"}},
                              "publish": {"hf_token_secret": "hub-token", "repo_id": "me/m"}})
    assert "loraflow.publish.hf_token_secret" not in params and params["loraflow.train.learning_rate"] == "0.02"
    result = train_adapter(tokens, model_dir, config, tmp_path / "train", run_name="demo", tracking_params=params)
    run = result.tracking
    assert run and run.run_name == "demo" and run.url == f"{mlflow_server}/#/experiments/{run.experiment_id}/runs/{run.run_id}"
    client = MlflowClient(tracking_uri=mlflow_server)
    curve = client.get_metric_history(run.run_id, "loss")
    assert [m.step for m in curve] == [1, 2, 3, 4] and all(m.value > 0 for m in curve)
    stored = client.get_run(run.run_id).data
    assert stored.params["loraflow.train.learning_rate"] == "0.02"
    assert stored.params["loraflow.eval.general_expected.What is 2 _ 2_"] == "4|four"  # "+" and "?" are refused in keys
    assert {a.path for a in client.list_artifacts(run.run_id, "train")} == {
        "train/loss_curve.png", "train/loss_curve.parquet", "train/metrics.json"}

    card = tmp_path / "README.md"
    card.write_text("# card\n")
    log_facts(run, metrics=evaluation_metrics({"base": {"fact_accuracy": 0.0, "eval_loss_split": "validation"},
                                               "finetuned": {"fact_accuracy": 0.9}, "previous": None}, True),
              files=[card], folder="publish")
    stored = client.get_run(run.run_id).data
    assert stored.metrics["eval.finetuned.fact_accuracy"] == 0.9 and stored.metrics["eval.gate_passed"] == 1.0
    assert "eval.base.eval_loss_split" not in stored.metrics
    assert [a.path for a in client.list_artifacts(run.run_id, "publish")] == ["publish/README.md"]
    assert SENTINEL not in repr(stored.params) + repr(stored.tags)

    files = {"model.safetensors": "ab" * 32}
    version = register_model(run, model_dir, "anime-demo", files=files, tags={"prefect_flow_run_id": "flow-run-123"})
    assert register_model(run, model_dir, "anime-demo", files=files, tags={"prefect_flow_run_id": "again"}) == version
    assert len(client.search_model_versions("name = 'anime-demo'")) == 1  # a retried registration adds none
    assert client.get_model_version("anime-demo", version).tags["prefect_flow_run_id"] == "flow-run-123"


def test_a_tracker_down_when_training_starts_fails_before_loading(tiny_model, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    model_dir, tokens = tiny_model
    config = TrainConfig(max_steps=2, report_to=["mlflow"], tracking_uri=f"http://user:pw@127.0.0.1:{free_port()}")
    with pytest.raises(TrackerError, match=r"MLflow at http://\*\*\*@127\.0\.0\.1:\d+ did not answer.*nothing was trained") as error:
        check_tracker(config)
    assert "pw" not in str(error.value)
    with pytest.raises(TrackerError):
        train_adapter(tokens, model_dir, config, tmp_path / "train")
    assert not (tmp_path / "train" / "checkpoints").exists()


def test_a_tracker_that_goes_away_mid_run_costs_only_the_tracking(tiny_model, tmp_path, monkeypatch, caplog):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    model_dir, tokens = tiny_model
    with start_mlflow_server(tmp_path / "mlflow") as uri:
        class StopTheServer(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == 2:
                    uri.stop()

        config = TrainConfig(max_steps=4, micro_batch_size=2, learning_rate=2e-2, report_to=["mlflow"], tracking_uri=uri)
        with caplog.at_level(logging.WARNING, logger="loraflow"):
            result = train_adapter(tokens, model_dir, config, tmp_path / "train", callbacks=[StopTheServer()])
    assert result.global_step == 4 and (tmp_path / "train" / "adapter" / "adapter_model.safetensors").exists()
    assert result.tracking is not None  # the run it had; a restarted server still holds its first steps
    assert "was not updated" in caplog.text, caplog.text  # the curve files, after training; a warning, not an error
    with start_mlflow_server(tmp_path / "mlflow", port=int(uri.rsplit(":", 1)[1])) as again:
        kept = MlflowClient(tracking_uri=again).get_run(result.tracking.run_id)  # the run it had is still there
    assert kept.info.run_name == result.tracking.run_name


def test_best_effort_wrapper_stops_after_the_first_failure(caplog):
    class Failing:
        calls = 0

        def on_log(self, *args, **kwargs):
            Failing.calls += 1
            raise ConnectionError("http://user:secret@host refused")

    class State:
        global_step = 3

    wrapper = BestEffortTracking(Failing(), log=logging.getLogger("loraflow.test"))
    with caplog.at_level(logging.WARNING, logger="loraflow.test"):
        wrapper.on_log(None, State(), None, logs={"loss": 1.0})
        wrapper.on_log(None, State(), None, logs={"loss": 1.0})
    assert Failing.calls == 1 and "on_log at step 3" in wrapper.failure and "secret" not in caplog.text
