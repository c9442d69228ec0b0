"""A local HTTP listener standing in for a webhook (`loraflow notify-on-failure URL` posts to it): it keeps every JSON
body posted. Used by tests/test_automation.py and benchmarks/retrain_scenario.py."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer


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
    """A listener on a free loopback port that keeps every JSON body posted to it in Hook.received (emptied here)."""
    Hook.received = []
    hook = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    return hook


def wait_for_hook(run_name: str, seconds: float = 90) -> list[str]:
    """The webhook's messages (as JSON text) that name the flow run `run_name`, once one came."""
    deadline = time.time() + seconds
    while True:
        messages = [json.dumps(message) for message in Hook.received if run_name in json.dumps(message)]
        if messages or time.time() > deadline:
            return messages
        time.sleep(1)
