"""summary.json is a RunSummary: written and read through the model, refused clearly when it does not fit, and its
documented schema (docs/run_summary.md) is the model's."""

import json
from pathlib import Path

import pytest

from loraflow.evaluation.metrics import GateDecision
from loraflow.runs.summary import EvalSummary, PublishSummary, RunSummary, StageSummary, schema_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_doc_is_the_models_schema():
    doc = ROOT / "docs" / "run_summary.md"
    assert doc.read_text() == schema_markdown(), "run `python -m loraflow.runs.summary > docs/run_summary.md`"


def test_summary_round_trips_through_its_file(tmp_path):
    summary = RunSummary(name="demo", run_dir=str(tmp_path), store=str(tmp_path / "store"))
    summary.stages["tokenize"] = StageSummary(rows_in=3, rows_out=2, rows_quarantined=1, cached=False, seconds=0.5,
                                              stats={"splits": {"train": 2}}, artifact="file:///t.parquet", sha256="ab")
    summary.eval = EvalSummary(base={"fact_accuracy": 0.0}, finetuned={"fact_accuracy": 1.0},
                               gate=GateDecision(passed=False, reasons=["FAIL: x"]), report="r.md", table="t.parquet",
                               cached=False)
    summary.publish = PublishSummary(gate_passed=False, gate_reasons=["FAIL: x"], adapter_dir="a")
    path = summary.write(tmp_path)
    assert json.loads(path.read_text())["stages"]["tokenize"]["stats"] == {"splits": {"train": 2}}
    assert RunSummary.read(tmp_path) == summary and RunSummary.read(path) == summary
    assert RunSummary.read(tmp_path).publish.model_dir is None  # nothing published: PublishResult's fields are empty


def test_a_file_that_is_not_a_summary_names_itself(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"name": "demo", "run_dir": "x", "store": "y", "stagez": {}}))
    with pytest.raises(ValueError, match=r"(?s)summary\.json: not a loraflow run summary.*stagez"):
        RunSummary.read(tmp_path)


def test_a_writer_typo_fails_where_it_is_made(tmp_path):
    summary = RunSummary(name="demo", run_dir=str(tmp_path), store=str(tmp_path))
    with pytest.raises(ValueError, match="all_cached"):
        summary.all_cached = "maybe"
