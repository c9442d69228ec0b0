"""A hub push that fails half-way: nothing half-uploaded reaches main, a retry publishes once; retries happen
only for hub I/O (publish's requests, base model downloads), never for 4xx answers, contract violations or
training.

The real huggingface_hub client talks to the local stand-in (tests/hub_standin.py), which drops connections
mid-upload, loses answers after a commit landed, or answers an HTTP error, on the request the test picks.
"""

from pathlib import Path

import pandas as pd
import pytest

from data_contracts import CONVERSATIONS, ContractViolation, check_structure
from loraflow.config.publish import PublishConfig
from loraflow.publishing.hub import push_folder
from loraflow.runtime.io_retries import is_transient, with_io_retries
from tasks.publish import publish_model
from tests.test_publish import SENTINEL_TOKEN, card_facts, hub, trained, training  # noqa: F401 - fixtures

REPO_ID = "loraflow-test/reliability"


def hub_config(**overrides) -> PublishConfig:
    return PublishConfig(target="hf_hub", repo_id=REPO_ID, hub_retry_delay=0.01, **overrides)


def publish(trained, out, config):
    model_dir, adapter_dir, texts = trained
    return publish_model(model_dir, adapter_dir, config, out, card=card_facts(), verify_texts=texts)


@pytest.fixture(scope="module")
def saved(trained, tmp_path_factory):
    """A merged model folder saved once (merging takes seconds); the push tests upload it again and again."""
    result = publish(trained, tmp_path_factory.mktemp("saved"), PublishConfig())
    return result.model_dir, result.files


def push(saved, **overrides):
    """push_folder as publish_model calls it, with quick retries."""
    folder, files = saved
    settings = {"repo_id": REPO_ID, "token": SENTINEL_TOKEN, "private": True, "branch": "main",
                "run_branch": "loraflow-test-run", "message": "loraflow: test", "retry_delay": 0.01, **overrides}
    return push_folder(Path(folder), files, **settings)


@pytest.fixture
def repo(hub, monkeypatch):
    """An existing repo whose main holds one earlier commit; returns main's head before the publish."""
    from huggingface_hub import CommitOperationAdd, HfApi

    monkeypatch.setenv("HF_TOKEN", SENTINEL_TOKEN)
    api = HfApi(endpoint=hub.endpoint, token=SENTINEL_TOKEN)
    api.create_repo(REPO_ID)
    return api.create_commit(REPO_ID, operations=[CommitOperationAdd("old.txt", b"old")], commit_message="old").oid


@pytest.mark.parametrize("revision, how", [
    ("loraflow-", "drop_request"),  # connection dropped half-way through the upload to the run branch
    ("main", "drop_request"),       # ... through the upload to main
    ("main", "drop_response"),      # main's commit landed, its answer was lost
    ("main", 503),
])
def test_a_push_that_fails_in_transit_is_retried_and_commits_once(saved, hub, repo, revision, how):
    hub.fail("commit", revision, how=how)
    result = push(saved)

    assert hub.faults_hit == 1
    assert hub.commits_on(REPO_ID, "main")[:2] == [result["hub_commit"], repo], "one commit on top of the old main"
    assert hub.commits_on(REPO_ID, "loraflow-test-run")[:2] == [result["hub_run_commit"], repo]
    folder, files = saved
    assert set(hub.files(REPO_ID, "main")) == set(files) | {".gitattributes"}
    assert hub.files(REPO_ID)["model.safetensors"] == (Path(folder) / "model.safetensors").read_bytes()


def test_a_push_failing_half_way_leaves_main_untouched_and_a_rerun_publishes_once(trained, tmp_path, hub, repo):
    hub.fail("commit", "main", how="drop_request", times=3)  # more than the retries allow
    with pytest.raises(Exception) as failed:
        publish(trained, tmp_path / "out", hub_config(hub_retries=2))
    assert is_transient(failed.value), failed.value  # the transport error itself, after the last retry
    assert hub.faults_hit == 3
    assert hub.repos[REPO_ID]["branches"]["main"] == repo, "main is where it was"
    assert set(hub.files(REPO_ID, "main")) == {".gitattributes", "old.txt"}
    (run_branch,) = [b for b in hub.repos[REPO_ID]["branches"] if b.startswith("loraflow-")]
    run_commit = hub.repos[REPO_ID]["branches"][run_branch]

    result = publish(trained, tmp_path / "out", hub_config())
    assert result.hub_run_branch == run_branch and result.hub_run_commit == run_commit, "the verified upload is reused"
    assert hub.commits_on(REPO_ID, "main")[:2] == [result.hub_commit, repo]
    assert "old.txt" not in hub.files(REPO_ID, "main")

    # The same model pushed once more: nothing new is committed anywhere.
    again = push((result.model_dir, result.files), run_branch=run_branch)
    assert again["hub_commit"] == result.hub_commit and again["hub_run_commit"] == run_commit


@pytest.mark.parametrize("status", [401, 403, 422])
def test_a_4xx_answer_is_not_retried_and_main_is_untouched(saved, hub, repo, status):
    hub.fail("commit", "main", how=status, times=5)
    with pytest.raises(Exception, match=str(status)):
        push(saved)
    assert hub.faults_hit == 1
    assert hub.repos[REPO_ID]["branches"]["main"] == repo


def test_prefect_tasks_never_retry():
    """Every task in tasks/ (stages, training, evaluation, publish) fails at once: its errors are facts about the
    input. The hub I/O inside them retries per request (loraflow.runtime.io_retries)."""
    import importlib
    import pkgutil

    from prefect import Task

    import tasks

    found = {}
    for module in pkgutil.walk_packages(tasks.__path__, "tasks."):
        for value in vars(importlib.import_module(module.name)).values():
            if isinstance(value, Task):
                found[value.name] = value
    assert {"ingest", "synthesize", "format", "tokenize", "preflight", "train", "evaluate", "publish"} <= set(found)
    assert {name: (task.retries, task.retry_condition_fn) for name, task in found.items()} == \
        dict.fromkeys(found, (0, None))


def test_a_contract_violation_is_not_retried():
    calls = []

    def check():
        calls.append(1)
        check_structure(pd.DataFrame({"id": ["a"]}), CONVERSATIONS)

    with pytest.raises(ContractViolation):
        with_io_retries(check, "check", retries=3, delay=0)
    assert len(calls) == 1


# ---- downloads: the base model from the hub


@pytest.fixture
def model_repo(hub, monkeypatch, tmp_path):
    """A model repo on the stand-in, an empty hub cache, and quick download retries."""
    import huggingface_hub.constants
    from huggingface_hub import CommitOperationAdd, HfApi

    import loraflow.modeling.base_model

    monkeypatch.setenv("HF_TOKEN", SENTINEL_TOKEN)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))  # read at import
    monkeypatch.setattr(loraflow.modeling.base_model, "DOWNLOAD_RETRY_DELAY", 0.01)
    api = HfApi(endpoint=hub.endpoint, token=SENTINEL_TOKEN)
    api.create_repo("loraflow-test/base")
    files = {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"weights", "notes.bin": b"not wanted"}
    api.create_commit("loraflow-test/base", operations=[CommitOperationAdd(n, c) for n, c in files.items()], commit_message="base")
    return files


@pytest.mark.parametrize("how", ["drop_request", 503])
def test_a_model_download_that_fails_in_transit_is_retried(hub, model_repo, how):
    from loraflow.config.model import ModelConfig
    from loraflow.modeling.base_model import resolve_model_dir

    hub.fail("resolve", "", how=how, method="GET")  # snapshot_download resolves files by commit id
    folder = resolve_model_dir(ModelConfig(base="loraflow-test/base"))
    assert hub.faults_hit == 1
    assert (folder / "model.safetensors").read_bytes() == b"weights" and not (folder / "notes.bin").exists()


def test_a_missing_model_is_not_retried(hub, model_repo):
    from loraflow.config.model import ModelConfig
    from loraflow.modeling.base_model import ModelSourceError, resolve_model_dir

    hub.fail("revision", "main", how=404, method="GET", times=5)
    with pytest.raises(ModelSourceError, match="neither a local folder nor downloadable"):
        resolve_model_dir(ModelConfig(base="loraflow-test/base"))
    assert hub.faults_hit == 1
