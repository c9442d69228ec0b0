"""A failed run on the server triggers the failure automation, which posts to a webhook; so does a run whose
candidate model the gate refused (state Refused), which also emits the event loraflow.model.refused."""

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from loraflow.ops.server import CPU_POOL, LocalPrefect
from tests.test_server import api, free_port, small_config, wait_for_terminal_state

pytestmark = pytest.mark.slow


class Hook(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        Hook.received.append(json.loads(body or b"{}"))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def start_hook() -> HTTPServer:
    Hook.received = []
    hook = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    return hook


def wait_for_hook(seconds: float = 90) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and not Hook.received:
        time.sleep(1)


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


def test_failed_run_notifies_webhook(tmp_path):
    hook = start_hook()
    local = LocalPrefect(port=free_port(), home=tmp_path / "home", log_dir=tmp_path / "logs")
    try:
        with local:
            local.ensure_pools()
            assert local.prefect("deploy", "--name", "prepare-only", check=False).returncode == 0
            notify_on_failure(local, hook)
            local.start_worker(CPU_POOL)
            config = small_config(tmp_path)
            config["sources"][0]["path"] = "../data/sample/no-such-file.csv"
            deployment = api(local, "GET", "/deployments/name/prepare/prepare-only")
            run = api(local, "POST", f"/deployments/{deployment['id']}/create_flow_run", {"parameters": {"config": config}})
            assert wait_for_terminal_state(local, run["id"])["state"]["type"] == "FAILED"
            wait_for_hook()
    finally:
        hook.shutdown()
    assert Hook.received, "the automation did not call the webhook"
    message = json.dumps(Hook.received[0])
    assert run["name"] in message and "Failed" in message and "prepare-only" in message


def test_a_refused_model_ends_refused_emits_its_event_and_notifies_webhook(tmp_path):
    from tests.tiny_llama import build_tiny_llama

    hook = start_hook()
    local = LocalPrefect(port=free_port(), home=tmp_path / "home", log_dir=tmp_path / "logs")
    config = {  # a random 2-layer model learns no facts in two steps: a gate that asks for 90 % refuses it
        **small_config(tmp_path), "name": "nightly", "model": {"base": str(build_tiny_llama(tmp_path / "tiny-llama"))},
        "train": {"max_steps": 2, "micro_batch_size": 4, "gradient_checkpointing": False},
        "eval": {"max_questions": 2, "max_new_tokens": 4, "general_questions": ["What is 2 + 2?"],
                 "general_max_new_tokens": 4, "gate": {"min_fact_accuracy": 0.9}},
    }
    config["sources"][0]["max_rows"] = 4
    try:
        with local:
            local.ensure_pools()
            assert local.prefect("deploy", "--name", "finetune", check=False).returncode == 0
            notify_on_failure(local, hook)
            local.start_worker(CPU_POOL)
            deployment = api(local, "GET", "/deployments/name/finetune/finetune")
            run = api(local, "POST", f"/deployments/{deployment['id']}/create_flow_run", {"parameters": {"config": config}})
            ended = wait_for_terminal_state(local, run["id"], timeout=600)
            wait_for_hook()
            events = wait_for_events(local, "loraflow.model.refused")
    finally:
        hook.shutdown()
    assert (ended["state"]["type"], ended["state"]["name"]) == ("COMPLETED", "Refused"), ended["state"]
    assert "FAIL: fact accuracy" in ended["state"]["message"]
    (event,) = events
    assert event["resource"]["prefect.resource.id"] == "loraflow.model.nightly"
    assert any(reason.startswith("FAIL: fact accuracy") for reason in event["payload"]["failures"])
    assert run["id"] in json.dumps(event["related"])  # Prefect relates the event to the flow run that emitted it
    assert Hook.received, "the automation did not post the refusal to the webhook"
    message = json.dumps(Hook.received[0])
    assert run["name"] in message and "Refused" in message and "FAIL: fact accuracy" in message
