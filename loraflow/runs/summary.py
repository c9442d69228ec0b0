"""RunSummary: the typed `summary.json` every run writes into its run folder, and the one way to read it back.

    summary = RunSummary(name=config.name, run_dir=str(run_dir), store=store.root)   # flows/prepare.py
    summary.stages["tokenize"] = StageSummary(...)
    summary.write(run_dir)                                                          # run_dir/summary.json
    summary = RunSummary.read(run_dir)                                              # the CLI, `loraflow ask`

Writers: flows/prepare.py (name, sources, stages, warnings, preflight, tokens) and flows/finetune.py (train,
tracking, eval, publish, seconds). Readers: the CLI's tables, the model card's facts (flows/finetune.py
card_facts), the run's markdown artifact (flows/finetune.py summary_markdown) and `loraflow ask`.

To add a field: give it a default (None, or an empty list/dict), so summaries written before it still read, and
run `python -m loraflow.runs.summary > docs/run_summary.md` (tests/test_run_summary.py checks the doc is current).
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, create_model

from loraflow.evaluation.gate import GateDecision
from loraflow.publishing.result import PublishResult
from loraflow.runtime.artifact_store import ArtifactRef
from loraflow.runtime.atomic_files import write_json_atomic
from loraflow.tracking.report_to import TrackingRun
from loraflow.training.result import TrainResult

SUMMARY_FILE = "summary.json"


class _Section(BaseModel):
    """A part of the summary: unknown keys are refused, so a typo in a writer fails where it is made."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceSummary(_Section):
    """One configured source as ingested."""

    name: str = Field(..., description="The source's name (its `name`, or one derived from its location).")
    kind: str = Field(..., description="The source plug-in (csv, json, parquet, sql, hf_hub).")
    fingerprint: str = Field(..., description="What the source's data is now (its ingest cache key's input).")
    location: str = Field(..., description="Where it was read from (paths, URLs or repo ids, comma-separated).")
    rows: int = Field(..., description="Rows ingested (after its quarantine).")


class ShardSummary(_Section):
    """One shard of a sharded stage (prepare.shards > 1)."""

    shard: int
    rows_in: int
    rows_out: int
    rows_quarantined: int
    artifact: str = Field(..., description="URI of the shard's output artifact.")
    sha256: str
    quarantine: str | None = Field(None, description="URI of the shard's quarantine artifact, if rows were set aside.")
    cached: bool


class StageSummary(_Section):
    """One data stage's line: rows in, out and set aside, where its output is, whether it came from the cache."""

    rows_in: int
    rows_out: int
    rows_quarantined: int
    cached: bool = Field(..., description="The output came from the cache (not recomputed).")
    seconds: float
    stats: dict = Field(default_factory=dict, description="The stage's own counts (e.g. tokenize's splits).")
    artifact: str | None = Field(None, description="URI of the output artifact (None for shard and sharded stages).")
    sha256: str | None = None
    quarantine: str | None = Field(None, description="URI of the quarantine artifact, if rows were set aside.")
    quarantine_reasons: list[dict] = Field(
        default_factory=list, description="The top kinds of quarantine reason: [{example, rows, similar}].")
    shards: list[ShardSummary] | None = Field(None, description="Per shard, for a stage run per shard.")


class TrainSummary(TrainResult):
    """The train stage's TrainResult (its TrainPlan included), and whether it came from the cache."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    cached: bool = Field(..., description="The adapter came from the cache (this run did not train).")


class EvalSummary(_Section):
    """Base vs fine-tuned (vs the champion) and the gate step's decision on those metrics."""

    base: dict = Field(..., description="Metrics of the base model.")
    finetuned: dict = Field(..., description="Metrics of base + adapter.")
    previous: dict | None = Field(None, description="Metrics of the model name's champion, if another adapter made it.")
    previous_model_dir: str | None = None
    gate: GateDecision
    report: str = Field(..., description="eval_report.md.")
    table: str = Field(..., description="eval_table.parquet.")
    cached: bool
    seconds: float | None = Field(None, description="Evaluation's wall time.")
    timing: dict | None = Field(None, description="Per model: seconds of loss, answers and general answers, questions "
                                "and generated tokens per second, generation batch size (EvalResult.timing).")


# The publish section is flat: the gate's verdict, then PublishResult's fields when something was published (None
# while the gate refuses), so a new PublishResult field reaches the summary without being written twice.
_PublishedFields = create_model(
    "_PublishedFields", __base__=_Section,
    **{name: (field.annotation | None, Field(None, description=field.description))
       for name, field in PublishResult.model_fields.items()},
)


class PublishSummary(_PublishedFields):
    """The gate's verdict and, when it passed, where the model went (PublishResult's fields)."""

    gate_passed: bool
    gate_reasons: list[str] = Field(default_factory=list)
    adapter_dir: str
    published: bool = Field(False, description="This run published the model (False: refused, or reused).")
    reused: bool = Field(False, description="This adapter had been published already; that model is the run's.")
    run_model_link: str | None = Field(None, description="The run folder's `model` link (or model.txt) to it.")
    version: int | None = Field(None, description="The model name's version this publish recorded (it became the "
                                                  "champion); None when nothing new was published.")


class CandidateSummary(_Section):
    """The candidate this run trained: what `loraflow ask RUN_DIR` answers from when the gate refused it."""

    base_model_dir: str
    adapter_dir: str
    system_prompt: str | None = None


class CostSummary(_Section):
    """What the run cost (loraflow.runtime.run_cost): this run's device-seconds per stage and, with a price, money."""

    device_seconds: dict[str, float] = Field(..., description="Per stage: seconds this run spent on it x its devices.")
    total_device_seconds: float
    device_hours: float
    price_per_device_hour: float | None = Field(None, description="cost.price_per_device_hour (None: not set).")
    currency: str
    cost: float | None = Field(None, description="total device-hours x price (None without a price).")


class RunSummary(_Section):
    """One run's `summary.json`: prepare's stages, then (a whole run) training, evaluation and publish."""

    name: str = Field(..., description="The pipeline config's name.")
    run_dir: str = Field(..., description="This run's folder (summary.json, config, `model` link).")
    store: str = Field(..., description="The artifact store's root.")
    sources: list[SourceSummary] = Field(default_factory=list)
    stages: dict[str, StageSummary] = Field(default_factory=dict, description="Per data stage, in run order.")
    warnings: list[str] = Field(default_factory=list, description="What to know about the data before training.")
    untrained_rows: list[str] = Field(
        default_factory=list, description="Source ids of the rows tokenize.validation_fraction withheld whole for "
        "validation: never trained, so the model will not know them (empty when every row is trained; the first 100, "
        "the count is the tokenize stage's stats.withheld_rows).")
    preflight: dict = Field(default_factory=dict, description="The pre-flight checks' report.")
    tokens: ArtifactRef | None = Field(None, description="The TOKENS artifact training reads.")
    formatted: ArtifactRef | None = Field(None, description="The FORMATTED artifact.")
    model_dir: str | None = Field(None, description="The base model's folder (tokenizer and weights).")
    prepare_seconds: float | None = None
    all_cached: bool | None = Field(None, description="Every data stage came from the cache.")
    train: TrainSummary | None = None
    tracking: TrackingRun | None = Field(None, description="The adapter's MLflow run (train.report_to has mlflow).")
    preference: dict | None = Field(None, description="The DPO step after SFT (preference.enabled): "
                                                      "loraflow.training.preference.PreferenceResult and `cached`.")
    eval: EvalSummary | None = None
    publish: PublishSummary | None = None
    candidate: CandidateSummary | None = Field(None, description="The adapter this run trained, askable when refused.")
    cost: CostSummary | None = Field(None, description="What the run cost.")
    seconds: float | None = Field(None, description="The whole run's wall time.")

    def to_json(self) -> dict:
        """The summary as summary.json holds it (what the flows return)."""
        return self.model_dump(mode="json")

    def write(self, run_dir: str | Path) -> Path:
        """Write `run_dir/summary.json` atomically; returns its path."""
        return write_json_atomic(Path(run_dir) / SUMMARY_FILE, self.to_json(), indent=2)

    @classmethod
    def read(cls, path: str | Path) -> RunSummary:
        """The summary in `path` (a run folder or its summary.json); a file that does not fit says which and why."""
        path = Path(path)
        path = path / SUMMARY_FILE if path.is_dir() else path
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except ValueError as error:  # JSON or validation
            raise ValueError(f"{path}: not a loraflow run summary ({error}); pass the run folder `loraflow run` "
                             "printed, written by this version of loraflow") from None


def schema_markdown() -> str:
    """docs/run_summary.md: how to read summary.json, then RunSummary's JSON schema."""
    schema = json.dumps(RunSummary.model_json_schema(), indent=2)
    return (
        "# summary.json (RunSummary)\n\n"
        "Every run writes `summary.json` into its run folder (`<runs_dir>/<name>/<time>-<flow run>/`); `loraflow run` and\n"
        "`loraflow prepare` print its path last. It is `loraflow.runs.summary.RunSummary`: read it with\n"
        "`RunSummary.read(run_dir)`. A `loraflow prepare` run fills the data half (`sources` to `all_cached`); a whole run\n"
        "adds `train` (with the TrainPlan it ran), `tracking`, `eval`, `publish` and `seconds`.\n\n"
        "Generated by `python -m loraflow.runs.summary > docs/run_summary.md` (tests/test_run_summary.py checks it is\n"
        "current).\n\n"
        f"```json\n{schema}\n```\n"
    )


if __name__ == "__main__":
    print(schema_markdown(), end="")
