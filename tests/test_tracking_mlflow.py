"""MLflow through transformers' MLflowCallback, against a real `mlflow server` (SQLite) on a loopback port."""

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from transformers import AutoTokenizer

from loraflow.config.train import TrainConfig
from loraflow.tracking import flatten_config, log_run_facts, register_model
from tasks.train import train_adapter
from tests.tiny_llama import build_tiny_llama, tokens_frame

SENTINEL = "hf_SENTINEL_do_not_leak_0123456789"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("mlflow")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts")],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail((root / "server.log").read_text()[-2000:])
        yield uri
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_training_curve_params_metrics_artifacts_and_registry(mlflow_server, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    model_dir = build_tiny_llama(tmp_path / "model")
    tokens = tokens_frame(AutoTokenizer.from_pretrained(model_dir))
    config = TrainConfig(max_steps=4, micro_batch_size=2, learning_rate=2e-2, report_to=["mlflow"],
                         tracking_uri=mlflow_server, tracking_experiment="loraflow-test")
    train_adapter(tokens, model_dir, config, tmp_path / "train")
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("loraflow-test")
    (run,) = client.search_runs([experiment.experiment_id])
    curve = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in curve] == [1, 2, 3, 4] and all(m.value > 0 for m in curve)

    params = flatten_config({"name": "demo", "train": config.model_dump(mode="json"),
                             "publish": {"hf_token_secret": "hub-token", "repo_id": "me/m"}})
    assert "publish.hf_token_secret" not in params and params["train.learning_rate"] == "0.02"
    card = tmp_path / "README.md"
    card.write_text("# card\n")
    log_run_facts(run.info.run_id, params={f"loraflow.{k}": v for k, v in params.items()},
                  metrics={"eval.fine_tuned.fact_accuracy": 0.9, "eval.base.fact_accuracy": 0.0}, artifacts=[card],
                  tracking_uri=mlflow_server)
    stored = client.get_run(run.info.run_id).data
    assert stored.params["loraflow.train.learning_rate"] == "0.02" and stored.metrics["eval.fine_tuned.fact_accuracy"] == 0.9
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["README.md"]
    assert SENTINEL not in repr(stored.params) + repr(stored.tags)

    version = register_model(run.info.run_id, model_dir, "anime-demo", "flow-run-123", tracking_uri=mlflow_server)
    registered = client.get_model_version("anime-demo", version)
    assert registered.tags["prefect_flow_run_id"] == "flow-run-123"
