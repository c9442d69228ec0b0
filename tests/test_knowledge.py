"""Every row learned by default (validation from held-out phrasings, a row hold-out named), and false refusals of
known titles measured and gated: on the demo's real catalog rows, its config and the real tokenizer."""

from pathlib import Path

import pandas as pd
import pytest

from loraflow.config.evaluate import GateConfig
from loraflow.config.pipeline import PipelineConfig, load_config
from loraflow.config.tokenize import ROW_HOLDOUT_DEFAULT
from loraflow.evaluation.gate import decide_gate
from loraflow.evaluation.metrics import (answers_table, comparison_table, evaluation_rows, loss_sample, refused,
                                         score_answers, summarise)
from loraflow.evaluation.question_stream import evaluation_inputs
from loraflow.evaluation.report import render_report
from tasks.format import format_conversations
from tasks.synthesize import synthesize_frame
from tasks.tokenize import tokenize_formatted
from tests.test_synthesize import raw

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "anime_demo.yaml"


def demo_config(**tokenize) -> PipelineConfig:
    """The demo config as `make demo` loads it, with tokenize keys changed."""
    config = load_config(DEMO)
    return config.model_copy(update={"tokenize": config.tokenize.model_copy(update=tokenize)}) if tokenize else config


def demo_tokens(config: PipelineConfig, tokenizer) -> tuple[pd.DataFrame, dict]:
    """The demo catalog's rows (its max_rows) through synthesize, format and tokenize with `config`."""
    catalog = config.sources[0]
    rows = raw(pd.read_csv(config.resolve(catalog.path), dtype=str, keep_default_na=False).head(catalog.max_rows))
    conversations, _ = synthesize_frame([rows], config.synthesize)
    formatted, quarantined, _ = format_conversations(conversations, config.format, tokenizer)
    assert len(quarantined) == 0
    tokens, _, stats = tokenize_formatted(formatted, config.tokenize, tokenizer)
    return tokens, stats


def test_qa_synthesizers_train_every_row_unless_a_hold_out_is_set():
    sources = [{"kind": "csv", "path": "x.csv"}]
    assert load_config(DEMO).tokenize.validation_fraction == 0.0
    assert load_config(REPO / "configs" / "anime_ko.yaml").tokenize.validation_fraction == 0.0
    assert PipelineConfig(name="t", sources=sources, synthesize={"kind": "instruction"}).tokenize.validation_fraction \
        == ROW_HOLDOUT_DEFAULT
    # a QA source beside instruction data (the demo's replay) still trains every row
    mixed = PipelineConfig(name="t", sources=[{"kind": "csv", "path": "x.csv"},
                                               {"kind": "json", "path": "r.jsonl", "synthesizer": "instruction"}])
    assert mixed.synthesize.kind == "anime_qa" and mixed.tokenize.validation_fraction == 0.0
    explicit = PipelineConfig(name="t", sources=sources, tokenize={"validation_fraction": 0.25})
    assert explicit.tokenize.validation_fraction == 0.25


def test_default_validation_is_the_trained_rows_heldout_and_natural_questions_of_gateable_size(tokenizer):
    config = demo_config()
    tokens, stats = demo_tokens(config, tokenizer)
    catalog_ids = set(tokens["source_id"])
    assert set(tokens.loc[tokens["split"] == "train", "source_id"]) == catalog_ids  # every title trained
    assert stats["splits"]["validation"] == 0 and stats["withheld_rows"] == 0 and stats["withheld_source_ids"] == []
    _, loss_rows, loss_split = evaluation_rows(tokens, config.eval)
    assert loss_split == "heldout"
    assert set(loss_rows["phrasing_set"]) == {"heldout", "natural"}  # made-up titles' probes are not in the loss
    assert set(loss_rows["source_id"]) == catalog_ids
    size = loss_sample(loss_rows)
    _, streamed, streamed_split = evaluation_inputs(tokens, None, config.eval, batch_rows=50)  # what the stage reads
    assert streamed_split == "heldout" and loss_sample(streamed) == size
    gate = config.eval.gate
    assert size["eval_loss_examples"] >= gate.min_loss_examples and size["eval_loss_tokens"] >= gate.min_loss_tokens


def test_a_row_hold_out_withholds_whole_rows_and_names_them(tokenizer):
    config = demo_config(validation_fraction=0.3)
    tokens, stats = demo_tokens(config, tokenizer)
    withheld = set(tokens.loc[tokens["split"] == "validation", "source_id"])
    assert withheld and not withheld & set(tokens.loc[tokens["split"] == "train", "source_id"])
    assert stats["withheld_rows"] == len(withheld) and stats["withheld_source_ids"] == sorted(withheld)
    _, loss_rows, loss_split = evaluation_rows(tokens, config.eval)
    assert loss_split == "validation" and set(loss_rows["source_id"]) == withheld

    from flows.prepare import split_warnings
    from loraflow.runs.summary import StageSummary

    stage = StageSummary(rows_in=len(tokens), rows_out=len(tokens), rows_quarantined=0, cached=False, seconds=0.0, stats=stats)
    warning, = split_warnings({"tokenize": stage}, config)
    assert "will not know them" in warning and all(source_id in warning for source_id in withheld)


def natural_questions(tokenizer) -> pd.DataFrame:
    """The demo's natural questions about its catalog titles, as evaluation selects them (set "natural")."""
    tokens, _ = demo_tokens(demo_config(), tokenizer)
    natural = tokens[(tokens["split"] == "heldout") & (tokens["phrasing_set"] == "natural")]
    return natural.drop_duplicates("prompt").assign(set="natural").reset_index(drop=True)


def test_false_refusals_are_counted_per_kind_and_gated(tokenizer):
    questions = natural_questions(tokenizer)
    first_of_kind = questions.groupby("kind").head(1).index
    refusal = "I don't know an anime called {}; it is not in the catalog."
    answers = [refusal.format("it") if i in first_of_kind else reference for i, reference in enumerate(questions["reference"])]
    assert all(refused(answers[i]) for i in first_of_kind) and not any(
        refused(a) for i, a in enumerate(answers) if i not in first_of_kind)
    scored = score_answers(questions, [{"text": a, "stopped": True, "n_tokens": 10} for a in answers], tokenizer)
    summary = summarise(scored)
    kinds = questions["kind"].value_counts()
    assert summary["false_refusal_questions"] == len(questions)
    assert summary["false_refusal_rate"] == round(len(first_of_kind) / len(questions), 4)
    assert summary["false_refusal_rate_by_kind"] == {kind: round(1 / count, 4) for kind, count in kinds.items()}

    clean_scored = score_answers(questions, [{"text": r, "stopped": True, "n_tokens": 10} for r in questions["reference"]],
                                 tokenizer)
    report = render_report(comparison_table(summarise(clean_scored), summary), answers_table(clean_scored, scored), pd.DataFrame())
    assert f"### False refusals (natural questions about titles in the data answered with a refusal: {len(first_of_kind)})" in report
    assert "| false_refusal_rate |" in report and all(f"| false_refusal_rate_by_kind[{kind}] |" in report for kind in kinds.index)

    base = {"fact_accuracy": 0.0}
    refused_gate = decide_gate(base, {**summary, "fact_accuracy": 1.0}, GateConfig())
    assert not refused_gate.passed
    fail, = [line for line in refused_gate.failures if "false_refusal_rate" in line]
    assert f"n={len(questions)}" in fail and all(kind in fail for kind in kinds.index)

    clean = summarise(clean_scored)
    assert clean["false_refusal_rate"] == 0.0
    assert any(line.startswith("PASS: false_refusal_rate") for line in decide_gate(base, {**clean, "fact_accuracy": 1.0},
                                                                                     GateConfig()).reasons)
    relaxed = decide_gate(base, {**summary, "fact_accuracy": 1.0}, GateConfig(max_false_refusal_rate=None))
    assert relaxed.passed and any(line.startswith("NOTE: false_refusal_rate") for line in relaxed.reasons)


@pytest.mark.parametrize("limit", [0.02, None])
def test_no_natural_questions_skips_the_false_refusal_gate(limit):
    summary = {"fact_accuracy": 1.0, "false_refusal_rate": None}
    decision = decide_gate({"fact_accuracy": 0.0}, summary, GateConfig(max_false_refusal_rate=limit))
    assert decision.passed
    assert any(line.startswith("SKIP") and "false_refusal_rate" in line for line in decision.reasons) == (limit is not None)


def test_prepare_names_the_rows_a_hold_out_withholds(prefect_api, tmp_path):
    import contextlib
    import io
    import json

    from loraflow.cli.commands import main
    from loraflow.runtime.artifact_store import ArtifactStore
    from loraflow.runs.summary import RunSummary
    from tests.test_cli import write_config

    records = "".join(json.dumps({"instruction": f"Say {n}", "output": str(n)}) + "\n" for n in range(12))
    config = write_config(tmp_path, records, validation_fraction=0.4)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(["prepare", str(config)]) == 0
    out = printed.getvalue()
    summary = RunSummary.read(out.strip().splitlines()[-1])
    tokens = ArtifactStore(summary.store).read(summary.tokens)
    withheld = sorted(set(tokens.loc[tokens["split"] == "validation", "source_id"]))
    assert withheld and summary.untrained_rows == withheld
    assert f"not trained, withheld for validation by tokenize.validation_fraction ({len(withheld)} named" in out
    warning, = [w for w in summary.warnings if "will not know them" in w]
    assert f"withheld {len(withheld)} source row(s)" in warning and all(source_id in warning for source_id in withheld)
