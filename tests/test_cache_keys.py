"""A stage's cache key covers the code that shapes its output, and only that (loraflow.runtime.code_graph,
loraflow.runtime.cache_keys).

- Every project module a stage imports, directly or through others, at module level or inside a function, is in
  its code hash: checked against the standard library's own import finder (`modulefinder`, which reads the
  bytecode of every function), not against the walk under test.
- Editing precision.py, gguf.py or paraphrasing.py in a copy of the project changes exactly the hashes of the
  stages that use them.
- The hash is the same in every process, whatever else that process imported (sharded prepare runs a stage on
  Dask workers and, with `task_runner: none`, in the flow's process, which has imported every stage).
"""

import ast
import json
import shutil
import subprocess
import sys
from modulefinder import ModuleFinder
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from loraflow.runtime.cache_keys import STAGE_CACHE
from loraflow.runtime.code_graph import (PROJECT_PACKAGES, UndeclaredDynamicImport, code_hash, covered_modules,
                                         is_ops_only)

REPO = Path(__file__).resolve().parent.parent


def stage_modules(root: Path = REPO) -> list[str]:
    """The modules of tasks/ that define a Prefect task (decorated with `stage_task(...)` or `task(...)`)."""
    stages = []
    for path in sorted((root / "tasks").glob("*.py")):
        decorators = [node.func for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call)]
        if any(isinstance(func, ast.Name) and func.id in ("stage_task", "task") for func in decorators):
            stages.append(f"tasks.{path.stem}")
    return stages


STAGES = stage_modules()


def test_the_stage_list_is_the_pipeline():
    assert {"tasks.ingest", "tasks.synthesize", "tasks.paraphrase", "tasks.format", "tasks.tokenize", "tasks.shard",
            "tasks.train", "tasks.evaluate", "tasks.publish"} <= set(STAGES)


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_hash_covers_every_project_module_it_imports(stage):
    finder = ModuleFinder(path=[str(REPO)])  # the project only: third-party imports stay unresolved, and fast
    finder.run_script(str(REPO / (stage.replace(".", "/") + ".py")))
    imported = {name for name in finder.modules if name.split(".")[0] in PROJECT_PACKAGES and not is_ops_only(name)}
    covered = covered_modules(stage)
    print(f"{stage} ({code_hash(stage)}) covers {len(covered)} modules:\n  " + "\n  ".join(covered))
    assert imported - set(covered) == set()


def test_the_walk_follows_function_imports_submodules_relative_imports_and_registries(tmp_path):
    write(tmp_path / "tasks/__init__.py", "")
    write(tmp_path / "tasks/stage.py", "import os\n\ndef run():\n    from loraflow.lib import tool\n    return tool\n")
    write(tmp_path / "loraflow/__init__.py", "")
    write(tmp_path / "loraflow/lib/__init__.py", "from . import registry\n")
    write(tmp_path / "loraflow/lib/tool.py", "from .helpers import helper\n")
    write(tmp_path / "loraflow/lib/helpers.py", "")
    write(tmp_path / "loraflow/lib/registry.py",
          "import importlib\nPLUGIN = importlib.import_module('loraflow.plugin')\n")
    write(tmp_path / "loraflow/plugin.py", "")
    write(tmp_path / "loraflow/cli/__init__.py", "")
    write(tmp_path / "loraflow/unused.py", "")
    assert list(covered_modules("tasks.stage", tmp_path)) == [
        "loraflow", "loraflow.lib", "loraflow.lib.helpers", "loraflow.lib.registry", "loraflow.lib.tool",
        "loraflow.plugin", "tasks", "tasks.stage"]

    write(tmp_path / "loraflow/lib/registry.py", "import importlib\n\ndef load(kind):\n"
                                                  "    return importlib.import_module(f'loraflow.plugins.{kind}')\n")
    with pytest.raises(UndeclaredDynamicImport, match=r"registry.py:4: .*DYNAMIC_IMPORTS\['loraflow.lib.registry'\]"):
        covered_modules("tasks.stage", tmp_path)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# Who uses them (grep): precision picks the dtype for every stage that loads the model (DPO too); gguf.py is publish's
# export; paraphrasing.py is the paraphrase stage's prompt and generation.
EDITS = {
    # tasks.gate reads tasks.evaluate's EvalResult, so it follows evaluate's modules (it is not cached: no key to change)
    "loraflow/modeling/precision.py": {"tasks.paraphrase", "tasks.train", "tasks.dpo", "tasks.evaluate", "tasks.gate", "tasks.publish"},
    "loraflow/publishing/gguf.py": {"tasks.publish"},
    "loraflow/modeling/paraphrasing.py": {"tasks.paraphrase"},
}


def test_editing_a_library_module_changes_exactly_the_hashes_of_the_stages_that_use_it(tmp_path):
    copy = tmp_path / "project"
    for package in PROJECT_PACKAGES:
        shutil.copytree(REPO / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    before = {stage: code_hash.__wrapped__(stage, copy) for stage in STAGES}
    assert before == {stage: code_hash(stage) for stage in STAGES}  # names and sources, not where they lie

    for relative, users in EDITS.items():
        edited = copy / relative
        original = edited.read_text()
        edited.write_text(original + "\n# an edit that changes the file\n")
        after = {stage: code_hash.__wrapped__(stage, copy) for stage in STAGES}
        edited.write_text(original)
        assert {stage for stage in STAGES if after[stage] != before[stage]} == users, relative


HASH_SCRIPT = """
import importlib, json, sys
for name in sys.argv[2:]:
    importlib.import_module(name)
from loraflow.runtime.code_graph import code_hash
print(json.dumps({stage: code_hash(stage) for stage in json.loads(sys.argv[1])}))
"""


def _hashes(*imports: str) -> dict:
    done = subprocess.run([sys.executable, "-c", HASH_SCRIPT, json.dumps(STAGES), *imports], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_stage_code_hashes_do_not_depend_on_what_else_the_process_imported():
    nothing_else = _hashes()
    worker_like = _hashes("tasks.synthesize", "tasks.format", "tasks.tokenize", "tasks.shard")  # a Dask worker
    flow_like = _hashes("flows.prepare", "flows.finetune")  # the flow's process: every stage
    assert nothing_else == worker_like == flow_like


# ---- the policy: what goes into the key, and when there is none

def test_the_key_is_none_when_an_input_artifact_is_missing(tmp_path):
    from loraflow.runtime.artifact_store import ArtifactStore
    from tasks.format import format_task

    store = ArtifactStore(str(tmp_path / "store"))
    ref = store.write(pd.DataFrame({"id": ["a"]}), stage="synthesize", contract="c", schema_version=1, config_hash="h")
    context = SimpleNamespace(task=format_task)
    key = STAGE_CACHE.compute_key(context, {"conversations_ref": ref, "store_root": store.root}, {})
    assert key.startswith("format-")
    assert STAGE_CACHE.compute_key(context, {"conversations_ref": ref, "store_root": "elsewhere"}, {}) != key
    assert (STAGE_CACHE - "store_root").compute_key(context, {"conversations_ref": ref, "store_root": "elsewhere"},
                                                    {}) == (STAGE_CACHE - "store_root").compute_key(
        context, {"conversations_ref": ref, "store_root": store.root}, {})
    Path(ref.uri.removeprefix("file://")).unlink()
    assert STAGE_CACHE.compute_key(context, {"conversations_ref": ref, "store_root": store.root}, {}) is None


def test_the_policy_refuses_to_be_combined():
    """Prefect's CompoundCachePolicy ignores a part's None: combined, a missing input would be a stale hit."""
    from prefect.cache_policies import INPUTS

    with pytest.raises(TypeError, match="missing input"):
        STAGE_CACHE + INPUTS

