"""The whole finetune flow, twice, publishing to the hub stand-in with a sentinel HF_TOKEN (tiny model):

- the token appears in no log line (console or Prefect API), Prefect artifact, flow or task run parameter,
  result file, model card, summary.json, config dump, Prefect database or uploaded file;
- the unchanged re-run takes every stage from the cache, publishes nothing new, and leaves every file of
  the store (artifacts, adapter, evaluation, merged model) byte-identical (sha256 of each file).
"""

import asyncio
import hashlib
import json
import logging
from pathlib import Path

import pytest

from loraflow.config.pipeline import PipelineConfig
from tests.hub_standin import HubStandIn
from tests.tiny_llama import build_tiny_llama

REPO = Path(__file__).resolve().parent.parent
SENTINEL = "hf_SENTINEL_flow_must_not_leak_987654321"
REPO_ID = "loraflow-test/flow"


def tiny_pipeline(root: Path, model_dir: Path) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "name": "reliability", "store": str(root / "store"), "runs_dir": str(root / "runs"),
        "sources": [{"kind": "csv", "name": "catalog", "path": str(REPO / "data/sample/anime_catalog.csv"), "max_rows": 3}],
        "synthesize": {"anime_qa": {"trained_phrasings": 1, "heldout_phrasings": 1, "max_synopsis_words": 8}},
        "format": {"system_prompt": "You are an anime catalog assistant."},
        "tokenize": {"validation_fraction": 0.25},
        "model": {"base": str(model_dir)},
        "train": {"max_steps": 2, "micro_batch_size": 4, "learning_rate": 0.001, "gradient_checkpointing": False},
        "eval": {"max_questions": 2, "max_new_tokens": 4, "general_questions": ["What is 2 + 2?"],
                 "general_expected": {"What is 2 + 2?": "4|four"},
                 "gate": {"min_fact_accuracy": 0.0, "min_stop_rate": 0.0, "must_beat_base": False,
                          "min_natural_fact_accuracy": None, "min_refusal_rate": None, "max_general_regressions": None}},
        "publish": {"target": "hf_hub", "repo_id": REPO_ID, "hub_retry_delay": 0.01},
    })


class Recorder(logging.Handler):
    """Every log line, formatted, from the loggers the console shows (Prefect's do not propagate to root)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record))


def store_hashes(store: Path) -> dict[str, str]:
    """sha256 of every file in the store but the lock files (which only say who holds a lock now)."""
    return {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store.rglob("*")) if p.is_file() and "locks" not in p.relative_to(store).parts}


@pytest.fixture(scope="module")
def two_runs(prefect_api, tmp_path_factory):
    """Run the finetune flow twice with the same config; returns what each run left behind."""
    import huggingface_hub.constants

    from flows.finetune import finetune_flow

    root = tmp_path_factory.mktemp("reliability-flow")
    hub = HubStandIn()
    recorder, loggers = Recorder(), [logging.getLogger(), logging.getLogger("prefect")]
    for logger in loggers:
        logger.addHandler(recorder)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_ENDPOINT", hub.start())
        patch.setenv("HF_HUB_OFFLINE", "0")
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        patch.setenv("HF_TOKEN", SENTINEL)
        config = tiny_pipeline(root, build_tiny_llama(root / "model"))
        first = finetune_flow(config, return_state=True)
        store = Path(config.store_root())
        after_first = {"hashes": store_hashes(store), "branches": dict(hub.repos[REPO_ID]["branches"]),
                       "commits": len(hub.repos[REPO_ID]["commits"])}
        second = finetune_flow(config, return_state=True)
    hub.stop()
    for logger in loggers:
        logger.removeHandler(recorder)
    yield {"root": root, "hub": hub, "store": store, "states": (first, second), "log_lines": recorder.lines,
           "summaries": (first.result(), second.result()), "after_first": after_first}


def test_unchanged_rerun_is_all_cached_publishes_nothing_and_is_byte_identical(two_runs):
    first, second = two_runs["summaries"]
    assert first["publish"]["published"] and first["publish"]["hub_commit"]
    assert not first["train"]["cached"]
    assert second["all_cached"] and second["train"]["cached"] and second["eval"]["cached"]
    assert all(stage["cached"] for stage in second["stages"].values()), second["stages"]
    assert second["publish"]["reused"] and not second["publish"]["published"]
    hub, before = two_runs["hub"], two_runs["after_first"]
    # Published as the champion: the Hub's `champion` tag is on that commit, and the version record says so.
    assert hub.tags(REPO_ID) == {"champion": first["publish"]["hub_commit"]}
    record = json.loads((two_runs["store"] / "published" / "reliability" / "versions" / "0001.json").read_text())
    assert record["hub_tag"] == {"repo": REPO_ID, "tag": "champion", "commit": first["publish"]["hub_commit"], "moved_from": None}
    assert hub.repos[REPO_ID]["branches"] == before["branches"] and len(hub.repos[REPO_ID]["commits"]) == before["commits"]

    after = store_hashes(two_runs["store"])
    assert any(name.endswith(".parquet") for name in after) and any(name.endswith("model.safetensors") for name in after)
    assert after == before["hashes"], {name for name in after.keys() | before["hashes"].keys()
                                       if after.get(name) != before["hashes"].get(name)}


def test_hub_token_is_in_no_log_artifact_parameter_result_or_file(two_runs):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

    hub = two_runs["hub"]
    assert hub.requests and all(r["headers"].get("authorization") == f"Bearer {SENTINEL}" for r in hub.requests), \
        "the token did reach the hub client"
    flow_run_ids = [state.state_details.flow_run_id for state in two_runs["states"]]

    async def read_back():
        async with get_client() as client:
            # These runs' logs, every page (a shared test API holds other tests' logs too; the database file
            # itself is searched below for everything else).
            from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

            only_these = LogFilter(flow_run_id=LogFilterFlowRunId(any_=flow_run_ids))
            logs, page = [], None
            while page is None or len(page) == 200:
                page = await client.read_logs(log_filter=only_these, limit=200, offset=len(logs))
                logs += page
            artifacts = await client.read_artifacts()
            flow_runs = [await client.read_flow_run(run_id) for run_id in flow_run_ids]
            task_runs = await client.read_task_runs()
            return logs, artifacts, flow_runs, task_runs

    logs, artifacts, flow_runs, task_runs = asyncio.run(read_back())
    assert any(log.flow_run_id in flow_run_ids and "publish:" in log.message for log in logs), "logs were read back"
    assert any("publish:" in line for line in two_runs["log_lines"]), "log records were captured"
    assert any(a.key and a.key.endswith("model-card") for a in artifacts)
    places = {
        "logs": "\n".join(log.message for log in logs),
        "artifacts": "\n".join(a.model_dump_json() for a in artifacts),
        "flow run parameters": "\n".join(run.model_dump_json() for run in flow_runs),
        "task runs": "\n".join(run.model_dump_json() for run in task_runs),
        "log records": "\n".join(two_runs["log_lines"]),
        "summaries": repr(two_runs["summaries"]),
    }
    assert {place: SENTINEL in text for place, text in places.items()} == dict.fromkeys(places, False)

    # Every file the runs wrote (store, results, adapter, model card, summary.json, config dumps), the Prefect
    # database itself and every file uploaded to the hub.
    database = Path(PREFECT_API_DATABASE_CONNECTION_URL.value().split("///", 1)[1])
    files = [p for p in two_runs["root"].rglob("*") if p.is_file()] + list(database.parent.glob(database.name + "*"))
    assert any(p.name == "summary.json" for p in files) and any(p.name == "README.md" for p in files)
    assert [p for p in files if SENTINEL.encode() in p.read_bytes()] == []
    uploaded = hub.files(REPO_ID)
    assert "README.md" in uploaded and [name for name, content in uploaded.items() if SENTINEL.encode() in content] == []
