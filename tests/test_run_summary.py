"""summary.json is a RunSummary: written and read through the model, refused clearly when it does not fit, and its
documented schema (docs/run_summary.md) is the model's."""

import json
from pathlib import Path

import pytest

from loraflow.evaluation.gate import GateDecision
from loraflow.runs.summary import EvalSummary, PublishSummary, RunSummary, StageSummary, TrainSummary, schema_markdown
from loraflow.training.plan import TrainPlan

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
    plan = TrainPlan(device="cpu", device_name="CPU, 2 threads", precision="fp32", precision_reason="fp32 requested",
                     quantization="none", quantization_reason="no CUDA device", optimizer="adamw_torch", packing=False,
                     fast_path=False, fast_path_reason="packing is off").with_micro_batch(2, "train.micro_batch_size")
    summary.train = TrainSummary(
        adapter_dir="a", metrics_path="m.json", loss_curve_path="c.parquet", global_step=2, train_rows=4, train_tokens=99,
        final_loss=1.5, tokens_per_second=10.0, peak_memory_bytes=1, peak_memory_kind="process_max_rss", seconds=1.0,
        device="cpu", quantization="none", precision="fp32", optimizer="adamw_torch", data_sha256="ab", fingerprint="cd",
        plan=plan, cached=False)
    path = summary.write(tmp_path)
    written = json.loads(path.read_text())
    assert written["stages"]["tokenize"]["stats"] == {"splits": {"train": 2}}
    assert written["train"]["plan"]["rows_per_micro_batch"] == 2 and written["train"]["plan"]["fast_path"] is False
    assert RunSummary.read(tmp_path).train.plan == plan
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
