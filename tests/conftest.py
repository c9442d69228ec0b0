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
# Under pytest-xdist (README's `make test`: one worker per core) each worker and the runs it starts use one
# thread: two workers with two threads each on two cores make every matmul wait for a busy core.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which turns the xdist_group marks into node ids
def pytest_collection_modifyitems(config, items):
    """For pytest-xdist's `--dist loadgroup`: long tests (`slow`) first, so parallel workers do not end on one
    of them alone; the tests of a module that shares a module-scoped fixture (a server, a trained adapter) stay
    on one worker, so that fixture is built once."""
    for item in items:
        definitions = item._fixtureinfo.name2fixturedefs.values()
        if any(defs[-1].scope == "module" for defs in definitions):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


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
    from loraflow.models import resolve_model_dir

    return resolve_model_dir(ModelConfig())


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    """The default model's real tokenizer."""
    from loraflow.config.model import ModelConfig
    from loraflow.models import load_tokenizer

    return load_tokenizer(ModelConfig())
