"""evaluate: the base model against base + adapter (and the champion), the metrics the gate decides on.

Measured for both models:
- validation loss and perplexity (split "validation"; "heldout" when there is no validation split);
- greedy, batched generation (left padding) on trained phrasings (split "train") and held-out phrasings
  (split "heldout") of the same facts, capped at eval.max_questions by a deterministic sample:
  fact accuracy per question kind (every fact value of the row appears in the answer, after normalising
  case, whitespace and thousands separators), ROUGE-L F1 against the reference, stop rate (the answer
  ended with EOS / end-of-turn before max_new_tokens) and answer length vs. reference length;
- general-knowledge questions: both answers are kept; a right base answer that turns wrong is a regression;
- with `previous_model_dir` (the model name's champion), the same for that model, so the gate (tasks/gate.py)
  can compare like with like.

Every metric comes with its sample size. The evaluation does not read eval.gate, and the flow keys it without it:
changing a threshold re-decides the gate on these cached metrics without generating an answer again.

The metrics are pure functions in loraflow.evaluation.metrics, the model work (generation, loss) in
loraflow.evaluation.generation, the report in loraflow.evaluation.report; this module is the recipe and the task.

Writes eval_table.parquet (metric, base, finetuned), eval_answers.parquet (every answer side by side),
eval_report.md and eval_metrics.json; returns an EvalResult.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pandas as pd
from pydantic import BaseModel, Field

from loraflow.runtime.atomic_files import write_json_atomic, write_text_atomic
from loraflow.runtime.store_folders import ship_folder
from loraflow.config.evaluate import EvalConfig
from loraflow.evaluation.answer_cache import (answers_key, asked_digest, load_answers, model_identity, published_identity,
                                              save_answers)
from loraflow.evaluation.generation import answer_budgets, evaluate_models, question_prompts, stop_token_ids
from loraflow.evaluation.metrics import (answers_table, comparison_table, general_table, loss_sample,
                                         summarise_runs)
from loraflow.evaluation.report import render_report
from loraflow.tracking.mlflow_run import evaluation_metrics, log_best_effort
from loraflow.modeling.precision import choose_precision
from loraflow.modeling.prompt_encoding import question_prompt_ids
from loraflow.runtime.artifact_store import ArtifactRef, ArtifactStore
from loraflow.evaluation.question_stream import evaluation_inputs
from loraflow.tracking.report_to import TrackingRun
from loraflow.training.checkpoints import base_model_fingerprint

log_default = logging.getLogger("loraflow.evaluate")


class EvalResult(BaseModel):
    """Evaluation outputs: metrics per model (with sample sizes) and where the tables are; the gate decides on them."""

    base: dict = Field(..., description="Metrics of the base model.")
    finetuned: dict = Field(..., description="Metrics of base + adapter.")
    previous: dict | None = Field(None, description="Metrics of the champion (the published version in force), when there is one.")
    general_regressions: int = Field(0, description="General answers the base got right and the fine-tuned model gets wrong.")
    table_path: str = Field(..., description="eval_table.parquet: metric, base, finetuned, delta.")
    answers_path: str = Field(..., description="eval_answers.parquet: every question with both answers.")
    report_path: str = Field(..., description="eval_report.md: table, general answers, examples.")
    metrics_path: str = Field(..., description="eval_metrics.json.")
    questions: int
    seconds: float
    precision: str | None = Field(None, description="bf16 or fp32, as loraflow.modeling.precision chose for this device.")
    precision_reason: str | None = None
    timing: dict | None = Field(None, description="Per model: seconds of loss, answers and general answers, questions "
                                "and generated tokens per second, generation batch size.")


def evaluate_adapter(
    tokens: ArtifactRef | pd.DataFrame,
    model_dir: str | Path,
    adapter_dir: str | Path,
    eval_config: EvalConfig,
    output_dir: str | Path,
    *,
    store: ArtifactStore | None = None,
    system_prompt: str | None = None,
    previous_model_dir: str | Path | None = None,
    trust_remote_code: bool = False,
    answers_dir: str | Path | None = None,
    log: logging.Logger | logging.LoggerAdapter | None = None,
) -> EvalResult:
    """Evaluate the base model and base + adapter on the TOKENS artifact's questions (eval.gate is not read).

    `system_prompt` must be the one the format stage used (None = the template's default), so general
    questions are asked the way the trained questions were. `previous_model_dir`: the model name's champion,
    evaluated on the same questions so the gate can refuse a regression. `answers_dir`: where each model's
    generations are kept (loraflow.evaluation.answer_cache); a model asked the same prompts before is not asked again.
    """
    import torch
    from transformers import AutoTokenizer

    log = log or log_default
    started = time.perf_counter()
    if eval_config.cpu_threads and not torch.cuda.is_available():
        torch.set_num_threads(eval_config.cpu_threads)
    # ---- questions and loss rows ----
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    questions, loss_rows, loss_split = evaluation_inputs(tokens, store, eval_config)  # a batch at a time
    log.info("evaluate: %d questions (%d trained, %d held-out phrasings); loss on %d %s rows", len(questions),
             int((questions["set"] == "trained").sum()), int((questions["set"] == "heldout").sum()), len(loss_rows), loss_split)

    # ---- every model answers the same questions ----
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    stop_ids = stop_token_ids(tokenizer, model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    general_prompts = [question_prompt_ids(tokenizer, q, system_prompt) for q in eval_config.general_questions]
    choice = choose_precision("auto", "cuda" if torch.cuda.is_available() else "cpu")
    log.info("evaluate: precision %s (%s)", choice.precision, choice.reason)
    keys = answer_keys(model_dir, adapter_dir, previous_model_dir, questions, loss_rows, general_prompts, tokenizer,
                       eval_config, stop_ids=stop_ids, precision=choice.precision,
                       device="cuda" if torch.cuda.is_available() else "cpu") if answers_dir else {}
    reuse = {name: run for name, key in keys.items() if (run := load_answers(answers_dir, key)) is not None}
    runs = evaluate_models(model_dir, adapter_dir, tokenizer, questions, loss_rows, general_prompts, eval_config,
                           stop_ids=stop_ids, pad_id=pad_id, precision=choice.precision,
                           previous_model_dir=previous_model_dir, trust_remote_code=trust_remote_code, reuse=reuse,
                           log=log)
    for name, key in keys.items():
        if name not in reuse:
            save_answers(answers_dir, key, runs[name])

    # ---- metrics, each with its sample size ----
    general = general_table(eval_config, runs)
    summaries = summarise_runs(runs, general, loss_split, loss_sample(loss_rows))
    answers = answers_table(runs["base"]["scored"], runs["finetuned"]["scored"])
    table = comparison_table(*({k: v for k, v in summaries[name].items() if k != "eval_loss_split"}
                               for name in ("base", "finetuned", "previous") if name in summaries))

    # ---- outputs: tables, report, then the metrics (the flow's sign that evaluation finished) ----
    paths = {name: output_dir / name for name in ("eval_table.parquet", "eval_answers.parquet", "eval_report.md", "eval_metrics.json")}
    table.to_parquet(paths["eval_table.parquet"], index=False)
    answers.to_parquet(paths["eval_answers.parquet"], index=False)
    general.to_parquet(output_dir / "eval_general.parquet", index=False)
    write_text_atomic(paths["eval_report.md"], render_report(table, answers, general))
    result = EvalResult(
        base=summaries["base"], finetuned=summaries["finetuned"], previous=summaries.get("previous"),
        general_regressions=int(general["regression"].sum()),
        table_path=str(paths["eval_table.parquet"]), answers_path=str(paths["eval_answers.parquet"]),
        report_path=str(paths["eval_report.md"]), metrics_path=str(paths["eval_metrics.json"]),
        questions=len(questions), seconds=round(time.perf_counter() - started, 2),
        precision=choice.precision, precision_reason=choice.reason,
        timing={name: run["timing"] for name, run in runs.items()},
    )
    write_json_atomic(paths["eval_metrics.json"], {**result.model_dump(), "general": general.to_dict("records")})
    log.info("evaluate: %d questions per model in %.0f s", len(questions), result.seconds)
    return result


def answer_keys(model_dir, adapter_dir, previous_model_dir, questions: pd.DataFrame, loss_rows, general_prompts: list,
                tokenizer, eval_config: EvalConfig, *, stop_ids: list[int], precision: str, device: str) -> dict[str, str]:
    """The answer-cache key of each model this evaluation asks (loraflow.evaluation.answer_cache); a model whose
    weights cannot be identified gets none."""
    base = base_model_fingerprint(Path(model_dir))
    identities = {"base": model_identity(base), "finetuned": model_identity(base, adapter_dir)}
    if previous_model_dir:
        identities["previous"] = published_identity(previous_model_dir)
    asked = asked_digest(prompts=question_prompts(questions), budgets=answer_budgets(questions, tokenizer, eval_config),
                         general_prompts=general_prompts, loss_rows=loss_rows,
                         settings={"general_max_new_tokens": eval_config.general_max_new_tokens,
                                   "batch_size": eval_config.batch_size, "stop_ids": stop_ids, "precision": precision,
                                   "device": device})
    return {name: answers_key(identity, asked) for name, identity in identities.items() if identity}


# ---- Prefect wrapper -----------------------------------------------------------------------------------

try:
    from prefect import task
except ImportError:  # the GPU machine has no Prefect
    task = None

if task is not None:

    @task(name="evaluate")  # cached and locked by the flow (loraflow.runtime.stage_task.run_locked)
    def evaluate_task(
        tokens: ArtifactRef, model_dir: str, adapter_dir: str, eval_config: EvalConfig, output_dir: str, store_root: str,
        adapter_fingerprint: str, system_prompt: str | None = None, previous_model_dir: str | None = None,
        trust_remote_code: bool = False, tracking: TrackingRun | None = None, eval_settings: str = "",
        previous_fingerprint: str = "",
    ) -> EvalResult:
        """Prefect task around `evaluate_adapter`; also publishes the report as a markdown artifact and, with
        `tracking` (training's MLflow run, TrainResult.tracking), logs the metrics per model and the report there
        (best effort: a warning when the tracker is down; loraflow.tracking.mlflow_run).

        adapter_fingerprint (TrainResult.fingerprint) only feeds the cache key: a new adapter re-evaluates. So does
        `tracking`, which comes with the adapter: a cached evaluation logs nothing twice. So does `eval_settings`
        (the eval config's hash without eval.gate), which the flow keys on in place of eval_config: a changed gate
        threshold does not re-evaluate; and `previous_fingerprint` (the champion's adapter), which it keys on in place
        of the champion's folder. A new champion re-runs this task, but a model already asked the same prompts on this
        host (the base, a candidate evaluated before it was published) is not asked again (answers_dir, in the
        store's local folder). A URL store gets a copy of the output folder for other hosts.
        """
        from prefect import get_run_logger
        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        from loraflow.runtime.stage_task import local_root

        result = evaluate_adapter(
            tokens, model_dir, adapter_dir, eval_config, output_dir, store=ArtifactStore(store_root),
            system_prompt=system_prompt, previous_model_dir=previous_model_dir, trust_remote_code=trust_remote_code,
            answers_dir=local_root(store_root) / "eval-answers", log=get_run_logger(),
        )
        create_markdown_artifact(Path(result.report_path).read_text(), key="evaluation", description="base vs fine-tuned")
        table = pd.read_parquet(result.table_path)
        create_table_artifact(json.loads(table.to_json(orient="records")), key="evaluation-table")
        per_model = {"base": result.base, "finetuned": result.finetuned, "previous": result.previous}
        log_best_effort(tracking, "evaluate", get_run_logger(), metrics=evaluation_metrics(per_model),
                        files=[result.report_path, result.metrics_path, result.table_path], folder="eval")
        ship_folder(store_root, output_dir)  # a URL store: other hosts reuse this evaluation
        return result
