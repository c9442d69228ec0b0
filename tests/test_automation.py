"""A failed run on the server triggers the failure automation, which posts to a webhook."""

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


def test_failed_run_notifies_webhook(tmp_path):
    hook = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    local = LocalPrefect(port=free_port(), home=tmp_path / "home", log_dir=tmp_path / "logs")
    try:
        with local:
            local.ensure_pools()
            assert local.prefect("deploy", "--name", "prepare-only", check=False).returncode == 0
            created = subprocess.run([sys.executable, "-m", "loraflow.cli.commands", "notify-on-failure",
                                      f"http://127.0.0.1:{hook.server_port}/hook"],
                                     env=local.env, capture_output=True, text=True, timeout=120)
            assert created.returncode == 0, created.stderr
            local.start_worker(CPU_POOL)
            config = small_config(tmp_path)
            config["sources"][0]["path"] = "../data/sample/no-such-file.csv"
            deployment = api(local, "GET", "/deployments/name/prepare/prepare-only")
            run = api(local, "POST", f"/deployments/{deployment['id']}/create_flow_run", {"parameters": {"config": config}})
            assert wait_for_terminal_state(local, run["id"])["state"]["type"] == "FAILED"
            deadline = time.time() + 90
            while time.time() < deadline and not Hook.received:
                time.sleep(1)
    finally:
        hook.shutdown()
    assert Hook.received, "the automation did not call the webhook"
    message = json.dumps(Hook.received[0])
    assert run["name"] in message and "Failed" in message and "prepare-only" in message
