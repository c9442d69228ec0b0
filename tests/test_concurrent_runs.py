"""Two identical `loraflow run`s at once (each its own process and ephemeral Prefect API, one store): one trains
and publishes, the other reuses that adapter and that published model."""

import multiprocessing

import pytest

from tests.test_finetune_flow import run_cli, tiny_config

pytestmark = pytest.mark.slow


def test_two_identical_runs_at_once_train_and_publish_once(tmp_path):
    from tests.tiny_llama import build_tiny_llama

    config = tiny_config(tmp_path, build_tiny_llama(tmp_path / "tiny-llama"))  # concurrency, not the model, is the point
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        summaries = pool.starmap(run_cli, [(config, tmp_path / "home-a"), (config, tmp_path / "home-b")])
    trained = [not s["train"]["cached"] for s in summaries]
    published = [s["publish"]["published"] for s in summaries]
    assert sorted(trained) == [False, True], trained
    assert sorted(published) == [False, True], published
    assert summaries[0]["publish"]["model_dir"] == summaries[1]["publish"]["model_dir"]
