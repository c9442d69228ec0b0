"""Shared test fixtures: an isolated, offline Prefect, and the real default tokenizer/model folder."""

import os
import tempfile

import pytest

# Before anything imports prefect: an isolated home, no analytics, no hub traffic.
_PREFECT_HOME = tempfile.mkdtemp(prefix="loraflow-prefect-home-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
# Process workers that tests start (loraflow.ops.server.LocalPrefect passes this environment on) look for scheduled
# runs every 2 s instead of Prefect's 10: a run triggered through the API starts up to 8 s sooner.
os.environ.setdefault("PREFECT_WORKER_QUERY_SECONDS", "2")
# Under pytest-xdist (README's `make test`: one worker per core) each worker and the runs it starts use one
# thread: two workers with two threads each on two cores make every matmul wait for a busy core.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


# The longest test files, started before the other `slow` ones: the first to start are the last to end. Seconds: in
# the suite of 2026-12-07 (19 min 21 s), or per file alone (`-n 0`) on the 2-core EPYC on 2026-12-07 after that day's
# cuts, beside other engineers' jobs (load 3 to 13: the order is what counts). The browser test now runs on
# test_server.py's server; test_finetune_flow.py starts one `loraflow run` process instead of seven.
LONGEST_FILES = ("test_orchestration_faults.py",   # alone 308 at load 4: worker kill + 60 s crash window, Cancel, both re-runs
                 "test_finetune_flow.py",          # alone 184 at load 4-5 (331 before at load 3-5): SmolLM2, 1 CLI + 4 in-process runs
                 "test_server.py",                 # alone 134 at load 4-6: a server, `prefect deploy --all`, a worker, runs, Chromium
                 "test_orchestration_restarts.py", # alone 124: its own server and PostgreSQL, restarted mid-run
                 "test_continue_from_champion.py", # alone 100 at load 3-4 (tiny Llama): 1 CLI + 2 in-process runs
                 "test_distributed.py",            # suite 80: DDP launches, a kill -9 and a resume
                 "test_concurrent_runs.py")        # suite 75: two `loraflow run`s at once


def pytest_collection_modifyitems(config, items):
    """Long tests (`slow`) first, the longest files first of all, so that under pytest-xdist's `--dist loadfile
    --no-loadscope-reorder` (README's `make test`: each test file on one worker, so a module's shared fixture, a
    server or a trained adapter, is built once; files in the order of their first test here) the files holding them
    start first and the workers do not end on one of them alone. (xdist's default `--loadscope-reorder` sends the
    files with the most tests first, which put the longest ones, holding one to three tests, at the end.)

    (Not `--dist loadgroup` with xdist_group marks: pytest 9 builds node ids from `Item._id`, and pytest-xdist 3.8
    tags a group by rewriting `item._nodeid`, so the marks were ignored and a module fixture was built per worker.)"""
    def order(item):
        name = item.path.name
        return (item.get_closest_marker("slow") is None, LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES))

    items.sort(key=order)


@pytest.fixture(scope="session")
def prefect_api():
    """One Prefect test API (temporary SQLite) for the whole test session (≈ 12 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def model_dir():
    """Local HF folder of the embedded default model (converted once into the loraflow cache)."""
    from loraflow.config.model import ModelConfig
    from loraflow.modeling.base_model import resolve_model_dir

    return resolve_model_dir(ModelConfig())


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    """The default model's real tokenizer."""
    from loraflow.config.model import ModelConfig
    from loraflow.modeling.base_model import load_tokenizer

    return load_tokenizer(ModelConfig())
