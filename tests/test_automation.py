"""A failed run on the server triggers the failure automation, which posts to a webhook; so does a run whose
candidate model the gate refused (state Refused), which also emits the event loraflow.model.refused."""

import json
import subprocess
import sys
import time
from http.server import HTTPServer

import pytest

from loraflow.ops.server import CPU_POOL, LocalPrefect
from tests.test_server import api, free_port, small_config, stop_workers, wait_for_terminal_state
from tests.webhook import Hook, start_hook, wait_for_hook

pytestmark = pytest.mark.slow


def wait_for_events(local: LocalPrefect, name: str, seconds: float = 60) -> list[dict]:
    """The server's events of that name, once it has stored any (it writes events in batches)."""
    deadline = time.time() + seconds
    while True:
        events = api(local, "POST", "/events/filter", {"filter": {"event": {"name": [name]}}})["events"]
        if events or time.time() > deadline:
            return events
        time.sleep(1)


def notify_on_failure(local: LocalPrefect, hook: HTTPServer) -> None:
    created = subprocess.run([sys.executable, "-m", "loraflow.cli.commands", "notify-on-failure",
                              f"http://127.0.0.1:{hook.server_port}/hook"],
                             env=local.env, capture_output=True, text=True, timeout=120)
    assert created.returncode == 0, created.stderr


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for both tests (its start, the deploys, the automation and the worker are most of their time): the
    prepare-only and finetune deployments, the failure automation posting to a webhook here, a worker."""
    home = tmp_path_factory.mktemp("automation-home")
    hook = start_hook()
    local = LocalPrefect(port=free_port(), home=home, log_dir=home / "logs")
    try:
        with local:
            local.ensure_pools()
            deployed = local.prefect("deploy", "--name", "prepare-only", "--name", "finetune", check=False)
            assert deployed.returncode == 0, deployed.stdout + deployed.stderr
            notify_on_failure(local, hook)
            local.start_worker(CPU_POOL)
            yield local
            stop_workers(local)
    finally:
        hook.shutdown()


def test_failed_run_notifies_webhook(server, tmp_path):
    config = small_config(tmp_path)
    config["sources"][0]["path"] = "../data/sample/no-such-file.csv"
    deployment = api(server, "GET", "/deployments/name/prepare/prepare-only")
    run = api(server, "POST", f"/deployments/{deployment['id']}/create_flow_run", {"parameters": {"config": config}})
    assert wait_for_terminal_state(server, run["id"])["state"]["type"] == "FAILED"
    messages = wait_for_hook(run["name"])
    assert messages, f"the automation did not call the webhook for {run['name']}: {Hook.received}"
    assert "Failed" in messages[0] and "prepare-only" in messages[0]


def test_a_refused_model_ends_refused_emits_its_event_and_notifies_webhook(server, tmp_path):
    from tests.tiny_llama import build_tiny_llama

    config = {  # a random 2-layer model learns no facts in two steps: a gate that asks for 90 % refuses it
        **small_config(tmp_path), "name": "nightly", "model": {"base": str(build_tiny_llama(tmp_path / "tiny-llama"))},
        "train": {"max_steps": 2, "micro_batch_size": 4, "gradient_checkpointing": False},
        "eval": {"max_questions": 2, "max_new_tokens": 4, "general_questions": ["What is 2 + 2?"],
                 "general_max_new_tokens": 4, "gate": {"min_fact_accuracy": 0.9}},
    }
    config["sources"][0]["max_rows"] = 4
    deployment = api(server, "GET", "/deployments/name/finetune/finetune")
    run = api(server, "POST", f"/deployments/{deployment['id']}/create_flow_run", {"parameters": {"config": config}})
    ended = wait_for_terminal_state(server, run["id"], timeout=600)
    messages = wait_for_hook(run["name"])
    events = wait_for_events(server, "loraflow.model.refused")
    assert (ended["state"]["type"], ended["state"]["name"]) == ("COMPLETED", "Refused"), ended["state"]
    assert "FAIL: fact accuracy" in ended["state"]["message"]
    (event,) = events
    assert event["resource"]["prefect.resource.id"] == "loraflow.model.nightly"
    assert any(reason.startswith("FAIL: fact accuracy") for reason in event["payload"]["failures"])
    assert run["id"] in json.dumps(event["related"])  # Prefect relates the event to the flow run that emitted it
    assert messages, f"the automation did not post the refusal of {run['name']} to the webhook: {Hook.received}"
    assert "Refused" in messages[0] and "FAIL: fact accuracy" in messages[0]
