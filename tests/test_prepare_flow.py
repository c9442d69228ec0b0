"""The data half end to end through Prefect: artifacts, summary, caching, recompute on change/corruption."""

import json
import shutil
from pathlib import Path

import pytest

from loraflow.config.pipeline import load_config

REPO = Path(__file__).resolve().parent.parent
CATALOG = REPO / "data" / "sample" / "anime_catalog.csv"


def write_prepare_config(folder: Path, *, name: str, store: str, catalog_rows: int) -> Path:
    """The first `catalog_rows` of the sample catalog and a small prepare config using them, in `folder`."""
    import pandas as pd

    pd.read_csv(CATALOG, dtype=str, keep_default_na=False).head(catalog_rows).to_csv(folder / "catalog.csv", index=False)
    (folder / "config.yaml").write_text(
        f"name: {name}\n"
        f"store: {store}\nruns_dir: {folder / 'runs'}\n"
        "sources:\n  - {kind: csv, name: catalog, path: catalog.csv}\n"
        "synthesize: {kind: anime_qa}\n"
        "format: {template: chat_template, system_prompt: 'You are an anime catalog assistant.'}\n"
        "tokenize: {max_length: 384, validation_fraction: 0.2}\n"
    )
    return folder / "config.yaml"


@pytest.fixture
def demo_config(tmp_path):
    """A copy of the demo config and the first catalog rows in a temp folder, with its own store."""
    assert CATALOG.read_text(encoding="utf-8").splitlines()  # the shipped sample exists
    return write_prepare_config(tmp_path, name="flow-test", store=str(tmp_path / "store"), catalog_rows=12)


def run_prepare(path):
    from flows.prepare import prepare_flow

    return prepare_flow(load_config(path))


def test_prepare_then_cached_then_changed_row(prefect_api, demo_config):
    first = run_prepare(demo_config)
    stages = first["stages"]
    assert set(stages) >= {"synthesize", "format", "tokenize"}
    assert not any(stage["cached"] for stage in stages.values())
    for name, stage in stages.items():
        assert Path(stage["artifact"]).exists(), name
        accounted = stage["rows_out"] + stage["rows_quarantined"] - stage["stats"].get("rows_expanded", 0)
        assert stage["stats"]["unaccounted_rows"] == 0, (name, stage)
        assert accounted == stage["rows_in"], (name, stage)
    summary_path = Path(first["run_dir"]) / "summary.json"
    assert json.loads(summary_path.read_text())["stages"].keys() == stages.keys()
    assert first["preflight"]

    second = run_prepare(demo_config)
    assert all(stage["cached"] for stage in second["stages"].values()), second["stages"]
    assert second["tokens"]["sha256"] == first["tokens"]["sha256"]

    # Change one row: everything downstream of that source recomputes, with a new tokens artifact.
    catalog = demo_config.parent / "catalog.csv"
    text = catalog.read_text(encoding="utf-8")
    catalog.write_text(text.replace(",TV,", ",Movie,", 1) if ",TV," in text else text + "\n", encoding="utf-8")
    third = run_prepare(demo_config)
    ingest = [stage for name, stage in third["stages"].items() if name.startswith("ingest")]
    assert not ingest[0]["cached"]


def test_corrupt_artifact_is_recomputed(prefect_api, demo_config):
    first = run_prepare(demo_config)
    tokens_path = Path(first["stages"]["tokenize"]["artifact"])
    tokens_path.write_bytes(tokens_path.read_bytes()[:100])  # truncated by a crash or a bad disk
    second = run_prepare(demo_config)
    assert not second["stages"]["tokenize"]["cached"]
    assert second["tokens"]["sha256"] == first["tokens"]["sha256"]
    assert tokens_path.stat().st_size > 100


def test_cli_prepare_prints_summary_last(prefect_api, demo_config, capsys):
    from loraflow.cli.commands import main

    assert main(["prepare", str(demo_config)]) == 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line.endswith("summary.json") and Path(last_line).exists()
