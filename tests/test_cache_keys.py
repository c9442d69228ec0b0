"""A stage's code hash is the same in every process, whatever else that process imported.

Sharded prepare runs a stage on Dask workers and, with `task_runner: none`, in the flow's process, which has
imported every stage: a code hash that followed modules only because some other stage had imported them would
make those runs miss each other's cache (it did: the paraphrase filters, imported by the paraphrase stage, were a
submodule of tasks.synthesizers and so counted in synthesize's hash in the flow's process only)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGES = ["tasks.synthesize", "tasks.format", "tasks.tokenize", "tasks.shard"]
SCRIPT = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
from loraflow.runtime.cache_keys import code_hash
print(json.dumps({stage: code_hash(stage) for stage in %r}))
""" % STAGES


def _hashes(*imports: str) -> dict:
    done = subprocess.run([sys.executable, "-c", SCRIPT, *imports], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_stage_code_hashes_do_not_depend_on_what_else_the_process_imported():
    worker_like = _hashes(*STAGES)  # a Dask worker: only the stage it runs
    flow_like = _hashes("flows.prepare", "flows.finetune", *STAGES)  # the flow's process: every stage
    assert worker_like == flow_like
