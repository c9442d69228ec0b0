"""The published model's card (README.md), written only from pipeline facts: CardFacts in, markdown out.

The YAML metadata is huggingface_hub's own ModelCardData (base model, library, tags, and the fine-tuned model's
metrics as EvalResults in its model-index), so any value is quoted as YAML needs and the Hub reads it back.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, Field


RAN_SETTINGS = ("device", "precision", "quantization", "optimizer")  # TrainResult fields that train_config also names
TRAIN_RAN_FIELDS = ("device", "device_name", "precision", "precision_reason", "quantization", "quantization_reason", "optimizer")


class SourceFacts(BaseModel):
    """One data source, as the model card lists it."""

    name: str
    kind: str | None = None
    location: str | None = Field(None, description="Path, URL or repo id.")
    sha256: str | None = None
    rows: int | None = None


class CardFacts(BaseModel):
    """Pipeline facts the model card is written from; the flow fills what it knows (no secrets)."""

    run_name: str
    base_model: str = Field(..., description="Hub id or path of the base model.")
    base_revision: str | None = None
    sources: list[SourceFacts] = Field(default_factory=list)
    rows: dict[str, int] = Field(default_factory=dict, description="Row counts per stage/split, e.g. {'raw': 30, 'train': 180}.")
    synthesizer: str | None = None
    template: str | None = None
    system_prompt: str | None = None
    masking: str | None = Field(None, description="e.g. 'answer tokens only; padding masked by position'.")
    tokens_sha256: str | None = None
    preflight: dict = Field(default_factory=dict)
    train_config: dict = Field(default_factory=dict)
    train_metrics: dict = Field(default_factory=dict, description="TrainResult fields worth showing.")
    train_ran: dict = Field(
        default_factory=dict,
        description="What the train stage actually ran (TrainResult's device, precision, quantization and their reasons): "
                    "the card reports these, not the configured values.",
    )
    continued_from: str | None = Field(
        None, description="With train.init_from=champion: the champion version the adapter continued from and what it "
                          "trained on (TrainResult.continuation's ContinuationPlan.describe()); None for a fresh adapter.")
    eval_report_markdown: str | None = Field(None, description="EvalResult's report (table + examples).")
    eval_metrics: dict[str, float] = Field(
        default_factory=dict, description="The fine-tuned model's headline metrics on the validation split: the "
                                          "card's model-index (huggingface_hub EvalResult).")
    gate: dict | None = Field(None, description="GateDecision: passed + reasons.")
    cost_line: str | None = Field(None, description="What preparing, training and evaluating cost (loraflow.runtime.run_cost).")
    library_versions: dict = Field(default_factory=dict, description="Filled in automatically when empty.")


def render_model_card(facts: CardFacts, *, max_logit_diff: float | None = None, tolerance: float | None = None,
                      merge_dtype: str | None = None, model_ref: str | None = None, gguf: dict | None = None) -> str:
    """README.md of the published model, written only from pipeline facts.

    `model_ref`: what the "Use" snippet loads (the Hub repo id, or the folder's path; "." when not given).
    """
    from loraflow.training.outputs import library_versions

    versions = facts.library_versions or library_versions()
    lines = [
        "---",
        card_metadata(facts).to_yaml(),
        "---",
        "",
        f"# {facts.run_name}",
        "",
        f"A LoRA fine-tune of `{facts.base_model}`" + (f" (revision `{facts.base_revision}`)" if facts.base_revision else "")
        + ", trained, evaluated, merged and published by loraflow.",
    ]
    if facts.gate is not None:
        lines += ["", "## Publish gate", "", f"**{'passed' if facts.gate.get('passed') else 'FAILED'}**", ""]
        lines += [f"- {reason}" for reason in facts.gate.get("reasons", [])]
    lines += ["", "## Data", ""]
    if facts.sources:
        lines += ["| source | kind | location | rows | sha256 |", "|---|---|---|---|---|"]
        lines += [f"| {s.name} | {s.kind or ''} | {s.location or ''} | {s.rows if s.rows is not None else ''} | "
                  f"`{(s.sha256 or '')[:16]}` |" for s in facts.sources]
    for label, value in (("Rows", ", ".join(f"{k}: {v}" for k, v in facts.rows.items()) or None),
                         ("Synthesizer", facts.synthesizer), ("Template", facts.template),
                         ("System prompt", facts.system_prompt and f"`{facts.system_prompt}`"),
                         ("Loss masking", facts.masking), ("Tokens artifact", facts.tokens_sha256 and f"`{facts.tokens_sha256}`")):
        if value:
            lines.append(f"- {label}: {value}")
    if facts.preflight:
        lines += ["", "## Pre-flight checks", ""] + [f"- {k}: {v}" for k, v in facts.preflight.items()]
    lines += ["", "## Training", ""]
    if facts.continued_from:
        lines += [f"Not a fresh adapter: {facts.continued_from}.", ""]
    ran = facts.train_ran
    if ran:
        lines += [f"Trained on {ran.get('device')}" + (f" ({ran['device_name']})" if ran.get("device_name") else "")
                  + f", {ran.get('precision')}" + (f" ({ran['precision_reason']})" if ran.get("precision_reason") else "")
                  + f", quantization {ran.get('quantization')}"
                  + (f" ({ran['quantization_reason']})" if ran.get("quantization_reason") else "") + ".", ""]
    if facts.train_config:
        lines += ["| setting | value |", "|---|---|"] + [f"| {k} | {_setting(k, v, ran)} |" for k, v in facts.train_config.items()]
    if facts.train_metrics:
        lines += [""] + [f"- {k}: {v}" for k, v in facts.train_metrics.items()]
    if facts.cost_line:
        lines += ["", facts.cost_line.replace("Cost:", "Cost of this run up to publishing (prepare, train, evaluate):", 1)]
    lines += ["", "Library versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())]
    if facts.eval_report_markdown:
        lines += ["", "## Evaluation", "", facts.eval_report_markdown.replace("## Evaluation", "### Result", 1).strip()]
    if max_logit_diff is not None:
        lines += ["", "## Merge check", "",
                  f"The adapter was merged into the unquantized base ({merge_dtype}); the merged model's logits differ "
                  f"from base + adapter by at most {max_logit_diff:.3g} (tolerance {tolerance:g}) on validation texts."]
    if gguf:
        lines += ["", "## GGUF (llama.cpp / Ollama)", "",
                  f"`{gguf['file']}` ({gguf['quantization']}), with the tokenizer, chat template and EOS / end-of-turn ids. "
                  f"Read back with transformers' GGUF loader, its logits differ from the merged model's by at most "
                  f"{gguf['max_logit_diff']:.3g} on the same validation texts.", "",
                  "```bash", f"llama-cli -m {gguf['file']} -cnv", "```"]
    lines += ["", "## Use", "", "```python", *use_snippet(model_ref or ".", facts.system_prompt), "```", "",
              "The LoRA adapter alone is in `adapter/`."]
    return "\n".join(lines) + "\n"


def card_metadata(facts: CardFacts):
    """The card's YAML metadata as huggingface_hub's ModelCardData: base model, library, tags and, when the run was
    evaluated, the fine-tuned model's metrics as a model-index (EvalResult per metric, on the validation split)."""
    from huggingface_hub import EvalResult, ModelCardData

    dataset = f"{facts.run_name} validation split" + (f" (tokens {facts.tokens_sha256[:12]})" if facts.tokens_sha256 else "")
    results = [EvalResult(task_type="text-generation", dataset_type="loraflow-validation", dataset_name=dataset,
                          dataset_split="validation", metric_type=name, metric_value=value)
               for name, value in facts.eval_metrics.items() if math.isfinite(value)]
    return ModelCardData(base_model=facts.base_model, library_name="transformers", tags=["loraflow", "lora", "peft"],
                         model_name=facts.run_name if results else None, eval_results=results or None)


def _setting(name: str, configured, ran: dict) -> str:
    """A training setting as it ran: "none (configured: 4bit)" where the machine changed it."""
    if name in RAN_SETTINGS and ran.get(name) is not None and str(ran[name]) != str(configured):
        return f"{ran[name]} (configured: {configured})"
    return str(configured)


def use_snippet(model_ref: str, system_prompt: str | None) -> list[str]:
    """Python lines that load the model and answer one question (tests/test_publish.py runs them)."""
    system = [f"{{'role': 'system', 'content': {system_prompt!r}}}, "] if system_prompt else [""]
    return [
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"MODEL = {model_ref!r}  # this folder, or the Hub repo it was pushed to",
        "tokenizer = AutoTokenizer.from_pretrained(MODEL)",
        "model = AutoModelForCausalLM.from_pretrained(MODEL)",
        f"messages = [{system[0]}{{'role': 'user', 'content': 'Who made ...?'}}]",
        "# return_dict=True: input_ids and attention_mask (apply_chat_template returns a BatchEncoding)",
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt', return_dict=True)",
        "output = model.generate(**inputs, max_new_tokens=96, do_sample=False)",
        "print(tokenizer.decode(output[0][inputs['input_ids'].shape[1]:], skip_special_tokens=True))",
    ]
