"""Paraphrase: table_qa's trained question phrasings -> extra trained phrasings written by a local model (PARAPHRASES).

Runs once per config, over the templates (never over rows): each kind's trained phrasings are rewritten
`candidates_per_template` times by the paraphraser (the base model unless `paraphrase.model` names another), offline,
and every sample is judged by tasks/paraphrase_filters.py. Accepted ones are the artifact; refused
ones go to the stage's quarantine with their rule, so rows_in (samples) = rows_out (accepted) + rows_quarantined.
The Prefect task is cached on the options, the paraphraser's fingerprint and this code: an unchanged re-run loads
no model. The synthesize stage reads the artifact (tasks/synthesize.py: read_paraphrases) and adds its phrasings to the
kinds' trained ones.
"""

from collections import Counter
from pathlib import Path

import pandas as pd

from data_contracts import PARAPHRASES
from data_contracts.base import quarantine_rows
from loraflow.config.pipeline import config_hash
from loraflow.synthesizers.table_qa_options import TableQAOptions
from loraflow.evaluation.generation import load_for_inference, stop_token_ids
from loraflow.modeling.paraphrasing import sample_paraphrases
from loraflow.runtime.stage_output import StageResult, write_stage_output
from loraflow.runtime.artifact_store import ArtifactStore
from loraflow.runtime.stage_task import stage_task
from tasks.paraphrase_filters import accepted_by_kind, judge

__all__ = ["paraphrase_inputs", "paraphrase_requests", "generate_candidates", "paraphrase_frames", "run_paraphrase", "paraphrase_task"]


def paraphrase_inputs(options: TableQAOptions) -> TableQAOptions:
    """The options with what paraphrasing does not read reset (row ids, per-row choices, missing values), so the
    task's cache key changes with the fields, templates and paraphrase settings only."""
    defaults = TableQAOptions.model_fields
    return options.model_copy(update={name: defaults[name].get_default(call_default_factory=True)
                                      for name in ("id_column", "trained_per_row", "heldout_per_row", "missing_values", "seed")})


def paraphrase_requests(options: TableQAOptions) -> list[dict]:
    """What to rewrite: every trained phrasing of every kind, with the key placeholders it must keep."""
    return [{"kind": kind, "template": template, "keys": sorted(options.key_fields(kind))}
            for kind, spec in options.kinds.items() for template in spec.questions]


def generate_candidates(requests: list[dict], options: TableQAOptions, model_dir: str | Path,
                        trust_remote_code: bool = False) -> list[dict]:
    """Sample the rewrites with the paraphraser: one {kind, template, sample, text} per sample, in request order."""
    from transformers import AutoTokenizer

    settings = options.paraphrase
    # The tokenizer first: its end-of-turn ids stop generation, and its chat template builds the prompt.
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model = load_for_inference(model_dir, trust_remote_code=trust_remote_code)
    samples = sample_paraphrases(
        model, tokenizer, [(r["template"], r["keys"]) for r in requests], count=settings.candidates_per_template,
        temperature=settings.temperature, max_new_tokens=settings.max_new_tokens, seed=settings.seed,
        stop_ids=stop_token_ids(tokenizer, model_dir),
    )
    return [{"kind": r["kind"], "template": r["template"], "sample": index, "text": text}
            for r, texts in zip(requests, samples) for index, text in enumerate(texts)]


def paraphrase_frames(verdicts: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(accepted paraphrases as PARAPHRASES, refused samples as quarantine rows with kind and rule)."""
    accepted = [v for v in verdicts if v["accepted"]]
    frame = pd.DataFrame({
        "kind": pd.Series([v["kind"] for v in accepted], dtype=str),
        "template": pd.Series([v["template"] for v in accepted], dtype=str),
        "sample": pd.Series([v["sample"] for v in accepted], dtype="int64"),
        "paraphrase": pd.Series([v["paraphrase"] for v in accepted], dtype=str),
    })
    refused = [(position, v) for position, v in enumerate(verdicts) if not v["accepted"]]
    rows = pd.DataFrame([{"kind": v["kind"], "template": v["template"], "sample": v["sample"], "text": v["text"]}
                         for _, v in refused], index=[position for position, _ in refused],
                        columns=["kind", "template", "sample", "text"])
    quarantine = quarantine_rows(rows, pd.Series([v["reason"] for _, v in refused], index=rows.index), "paraphrase")
    quarantine["kind"] = [v["kind"] for _, v in refused]
    quarantine["rule"] = [v["rule"] for _, v in refused]
    return frame, quarantine


def run_paraphrase(options: TableQAOptions, model_dir: str | Path, store: ArtifactStore,
                   trust_remote_code: bool = False) -> StageResult:
    """Generate, judge and write the paraphrases of every kind (runs without Prefect)."""
    requests = paraphrase_requests(options)
    candidates = generate_candidates(requests, options, model_dir, trust_remote_code)
    verdicts = judge(candidates, options)
    frame, quarantine = paraphrase_frames(verdicts)
    accepted = accepted_by_kind(verdicts, options.kinds)
    stats = {
        "templates": len(requests),
        "samples": len(candidates),
        "accepted_by_kind": {kind: len(phrasings) for kind, phrasings in accepted.items()},
        "refused_by_rule": dict(Counter(v["rule"] for v in verdicts if not v["accepted"]).most_common()),
        "accepted": accepted,
    }
    return write_stage_output(store, stage="paraphrase", contract=PARAPHRASES, frame=frame, rows_in=len(candidates),
                              config_hash=config_hash(options), quarantined=quarantine, stats=stats)


@stage_task(name="paraphrase")
def paraphrase_task(options: TableQAOptions, model_dir: str, model_fingerprint: str, store_root: str,
                    trust_remote_code: bool = False) -> StageResult:
    """Prefect task around run_paraphrase; cached on the options, the paraphraser's fingerprint and this code
    (model_fingerprint only feeds the cache key)."""
    return run_paraphrase(options, model_dir, ArtifactStore(store_root), trust_remote_code)
