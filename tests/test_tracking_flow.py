"""The finetune flow with `train.report_to: [mlflow, tensorboard]` and publish.register_model against a real
`mlflow server` (SQLite, loopback), three runs on a tiny model:

1. trains, evaluates, publishes: the MLflow run has the curve, the pipeline config as params, eval metrics for base
   and fine-tuned, the report, curve and model card as files, and a registered version tagged with the flow run id;
   the summary (summary.json and the Prefect markdown) links to the run; TensorBoard's event files hold the curve;
2. unchanged: all cached, no second MLflow run, no metric logged twice, no second registry version;
3. another learning rate: a new run, evaluated beside the published model (eval.previous.* metrics).
The registered model's alias `champion` follows the champion: set by each publish, moved back by `loraflow rollback`.
A sentinel HF_TOKEN is in no param, tag, metric name or file of the tracker (its database and artifact folder).
"""

from pathlib import Path

import pytest

from loraflow.config.pipeline import PipelineConfig
from tests.mlflow_server import mlflow_server as start_mlflow_server
from tests.test_reliability_flow import tiny_pipeline
from tests.tiny_llama import build_tiny_llama

SENTINEL = "hf_SENTINEL_mlflow_must_not_leak_24680"
EXPERIMENT = "loraflow-flow-test"

pytestmark = pytest.mark.slow


def tracked_pipeline(root: Path, model_dir: Path, tracking_uri: str, learning_rate: float = 0.001) -> PipelineConfig:
    """The reliability flow's tiny pipeline, tracked in MLflow and TensorBoard, registering the published model."""
    config = tiny_pipeline(root, model_dir).model_dump()
    config["name"] = "tracked"
    config["train"] |= {"learning_rate": learning_rate, "report_to": ["mlflow", "tensorboard"], "tracking_uri": tracking_uri,
                        "tracking_experiment": EXPERIMENT}
    config["publish"] = {"register_model": True, "hf_token_secret": "hub-token-block"}
    return PipelineConfig.model_validate(config)


@pytest.fixture(scope="module")
def three_runs(prefect_api, tmp_path_factory):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from flows.finetune import finetune_flow

    root = tmp_path_factory.mktemp("tracking-flow")
    model_dir = build_tiny_llama(root / "model")
    with start_mlflow_server(root / "mlflow") as uri, pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_TOKEN", SENTINEL)
        client = MlflowClient(tracking_uri=uri)
        states, seen = [], []
        for learning_rate in (0.001, 0.001, 0.002):
            states.append(finetune_flow(tracked_pipeline(root, model_dir, uri, learning_rate), return_state=True))
            experiment = client.get_experiment_by_name(EXPERIMENT)
            runs = client.search_runs([experiment.experiment_id])
            seen.append({"runs": len(runs), "versions": len(client.search_model_versions("name = 'tracked'")),
                         "eval_history": {run.info.run_id: len(client.get_metric_history(run.info.run_id, "eval.finetuned.fact_accuracy"))
                                          for run in runs}})
        yield {"root": root, "uri": uri, "client": client, "states": states, "seen": seen,
               "summaries": [state.result() for state in states]}


def test_the_run_holds_curve_config_eval_files_and_a_registered_version(three_runs):
    from flows.finetune import summary_markdown
    from loraflow.runs.summary import RunSummary

    client, (first, _, _) = three_runs["client"], three_runs["summaries"]
    tracking = first["tracking"]
    assert tracking["tracking_uri"] == three_runs["uri"] and tracking["url"].endswith(f"/runs/{tracking['run_id']}")
    assert first["train"]["tracking"] == tracking and f"]({tracking['url']})" in summary_markdown(RunSummary.model_validate(first))
    run = client.get_run(tracking["run_id"])
    assert run.info.run_name == "tracked"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    assert run.data.params["loraflow.train.learning_rate"] == "0.001" and run.data.params["loraflow.name"] == "tracked"
    assert "learning_rate" in run.data.params  # MLflowCallback's TrainingArguments, beside loraflow's
    for model in ("base", "finetuned"):
        for metric in ("fact_accuracy", "rouge_l", "stop_rate", "eval_loss"):
            assert f"eval.{model}.{metric}" in run.data.metrics, sorted(run.data.metrics)
    files = {a.path for folder in ("train", "eval", "publish") for a in client.list_artifacts(run.info.run_id, folder)}
    assert {"train/loss_curve.png", "eval/eval_report.md", "eval/eval_metrics.json", "publish/README.md"} <= files
    assert "model/model.safetensors" in {a.path for a in client.list_artifacts(run.info.run_id, "model")}

    (version,) = [v for v in client.search_model_versions("name = 'tracked'") if v.run_id == run.info.run_id]
    assert version.tags["prefect_flow_run_id"] == str(three_runs["states"][0].state_details.flow_run_id)
    assert first["publish"]["registered_model"] == "tracked" and first["publish"]["registered_version"] == version.version

    # TensorBoard beside MLflow: the same curve in the train folder's event files, read by tensorboard's reader.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = {p.parent for p in Path(first["train"]["adapter_dir"]).parent.rglob("events.out.tfevents.*")}
    assert [s.step for s in EventAccumulator(str(events)).Reload().Scalars("train/loss")] == [1, 2]


def test_a_cached_rerun_logs_nothing_twice_and_registers_no_new_version(three_runs):
    first, second, _ = three_runs["summaries"]
    after_first, after_second, _ = three_runs["seen"]
    assert second["all_cached"] and second["train"]["cached"] and second["eval"]["cached"] and second["publish"]["reused"]
    assert second["tracking"] == first["tracking"]
    assert after_first == after_second and after_first["runs"] == 1 and after_first["versions"] == 1
    assert after_first["eval_history"] == {first["tracking"]["run_id"]: 1}


def test_a_retrained_adapter_is_a_new_run_with_the_published_models_metrics(three_runs):
    client, (first, _, third) = three_runs["client"], three_runs["summaries"]
    assert not third["train"]["cached"] and third["tracking"]["run_id"] != first["tracking"]["run_id"]
    metrics = client.get_run(third["tracking"]["run_id"]).data.metrics
    assert {"eval.base.fact_accuracy", "eval.finetuned.fact_accuracy", "eval.previous.fact_accuracy"} <= set(metrics)
    assert three_runs["seen"][2]["runs"] == 2
    if third["publish"].get("registered_version"):  # the gate let it through: a second version, its own flow run
        version = client.get_model_version("tracked", third["publish"]["registered_version"])
        assert version.tags["prefect_flow_run_id"] == str(three_runs["states"][2].state_details.flow_run_id)


def test_the_token_is_in_no_param_tag_or_file_of_the_tracker(three_runs):
    client = three_runs["client"]
    for summary in three_runs["summaries"]:
        run = client.get_run(summary["tracking"]["run_id"])
        assert SENTINEL not in repr(run.data.params) + repr(run.data.tags) + repr(run.data.metrics)
        assert not any("token_secret" in key for key in run.data.params)  # a secret's name is config, still left out
    # Everything the server stored: its database (params, tags, registry) and every artifact file.
    stored = [p for p in (three_runs["root"] / "mlflow").rglob("*") if p.is_file()]
    assert any(p.name == "eval_report.md" for p in stored) and any(p.name == "mlflow.db" for p in stored)
    assert [p for p in stored if SENTINEL.encode() in p.read_bytes()] == []


def test_the_champion_alias_follows_publish_and_rollback(three_runs):
    from loraflow.cli.commands import main

    client, summaries = three_runs["client"], three_runs["summaries"]
    published = [summary["publish"]["registered_version"] for summary in summaries if summary["publish"]["published"]]
    assert client.get_model_version_by_alias("tracked", "champion").version == published[-1]
    store = str(three_runs["root"] / "store")
    if len(published) == 2:  # the third run's candidate passed the gate: roll back to the first
        assert main(["rollback", "tracked", "--store", store, "--why", "test"]) == 0
    else:
        assert main(["promote", "tracked", "1", "--store", store, "--why", "test"]) == 0
    assert client.get_model_version_by_alias("tracked", "champion").version == published[0]
