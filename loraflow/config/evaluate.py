"""Config of the evaluate stage: metrics, generation and the publish gate."""

from typing import Literal

from pydantic import Field

from loraflow.config.base import StrictModel
from loraflow.config.general_suite import GENERAL_SUITE

# The metrics the console, the run summary and the Prefect UI show first (loraflow.evaluation.metrics.summarise).
HEADLINE_METRICS = ("fact_accuracy", "heldout_fact_accuracy", "natural_fact_accuracy", "refusal_rate",
                    "false_refusal_rate", "general_right", "rouge_l", "stop_rate", "eval_loss")


class GateConfig(StrictModel):
    """Thresholds the fine-tuned model must meet before publish runs."""

    min_fact_accuracy: float = Field(0.5, ge=0, le=1, description="Minimum fact accuracy on trained phrasings (anime_qa, table_qa).")
    min_stop_rate: float = Field(0.95, ge=0, le=1, description="Minimum share of generations that end with EOS.")
    must_beat_base: bool = Field(
        True, description="The fine-tuned model must beat the base on the main metric (fact accuracy, else ROUGE-L)."
    )
    must_not_regress_previous: bool = Field(
        True,
        description=(
            "When a model name has a champion (the published version in force), the candidate is evaluated beside it on "
            "the same questions and must not be worse on any question metric both were asked (at least the champion's "
            "minus previous_tolerance), nor in validation loss (at most the champion's times 1 + previous_loss_tolerance) "
            "where that loss stands on enough examples (min_loss_examples, min_loss_tokens)."
        ),
    )
    previous_tolerance: float = Field(
        0.02, ge=0, le=1,
        description="Drop allowed against the champion in each question metric both models were asked (trained, "
        "held-out and natural fact accuracy, refusal rate, general accuracy; ROUGE-L where the data has no facts).",
    )
    previous_slack_questions: int = Field(
        1, ge=0,
        description="A drop against the champion of at most this many questions is within a sample's noise and never "
        "refuses: the drop allowed in a question metric is the larger of previous_tolerance and this many questions' "
        "share of its sample (1 of 44 general questions = 0.023; 1 of 8 trained facts = 0.125). 0: previous_tolerance "
        "alone.",
    )
    previous_loss_tolerance: float = Field(
        0.05, ge=0, description="Relative rise in validation loss allowed against the champion (0.05 = 5 %); gated only "
        "when the loss stands on at least min_loss_examples examples and min_loss_tokens tokens.",
    )
    min_loss_examples: int = Field(
        20, ge=1, description="Fewest validation examples a loss must stand on to be gated; below it the loss is "
        "reported beside the champion's, never gated.",
    )
    min_loss_tokens: int = Field(
        200, ge=1, description="Fewest scored (answer) tokens a loss must stand on to be gated; below it the loss is "
        "reported, never gated.",
    )
    fail_on_refusal: bool = Field(
        False, description="A refused candidate ends the flow run Failed instead of Completed(name='Refused'). Either "
        "way the event loraflow.model.refused is emitted and `loraflow notify-on-failure` posts it.",
    )
    max_general_regressions: int | None = Field(
        1, ge=0, description="Most general answers the base got right that may turn wrong (None: reported, not gated).",
    )
    min_natural_fact_accuracy: float | None = Field(
        0.5, ge=0, le=1,
        description="Minimum fact accuracy on questions asked the way users ask (anime_qa's natural questions; skipped "
        "when the data has none; None: not gated).",
    )
    min_heldout_fact_accuracy: float | None = Field(
        None, ge=0, le=1,
        description="Minimum fact accuracy on held-out phrasings (wordings never trained; None: reported, not gated). "
        "With table_qa every kind then needs a held-out phrasing, checked when the config loads.",
    )
    min_refusal_rate: float | None = Field(
        0.5, ge=0, le=1,
        description="Minimum share of questions about made-up titles answered with a refusal (skipped when the data has "
        "none; None: not gated).",
    )
    max_false_refusal_rate: float | None = Field(
        0.02, ge=0, le=1,
        description="Most natural questions about titles in the data that may be answered with a refusal (\"I don't "
        "know an anime called ...\"); reported per question kind (skipped when the data has no natural questions; "
        "None: reported, not gated).",
    )


class EvalConfig(StrictModel):
    """Evaluation of the base and the fine-tuned model."""

    max_new_tokens: int = Field(160, ge=1, description="Most tokens generated for any question.")
    answer_margin_tokens: int = Field(
        32, ge=1, description="A question's generation budget: its reference answer's tokens plus this margin (capped by max_new_tokens)."
    )
    batch_size: int | Literal["auto"] = Field(
        "auto",
        description="Prompts per generation batch (and rows per validation-loss batch). auto = on a GPU, as many as "
        "half its free memory holds for the longest prompt and budget (up to 256; loraflow.evaluation.generation), "
        "16 on CPU; 1 = one question at a time, no padding.",
    )
    max_questions: int = Field(300, ge=1, description="Cap on generated questions per model (sampled deterministically).")
    max_loss_rows: int | None = Field(
        1000, ge=1,
        description="Cap on the validation rows the loss is taken on, per model (a deterministic sample by a hash of "
        "id and seed; None = every row). The loss's sample size is reported (eval_loss_examples, eval_loss_tokens); "
        "on an 8B on an H100 the loss pass cost about 4 ms a row per model (issue 31).",
    )
    general_questions: list[str] = Field(
        default_factory=lambda: list(GENERAL_SUITE),
        description="General-ability prompts whose base answers should survive fine-tuning (default: the built-in "
        "suite of 44, loraflow/config/general_suite.py).",
    )
    general_expected: dict[str, str] = Field(
        default_factory=lambda: dict(GENERAL_SUITE),
        description=(
            "Expected answer per general question ('|' separates alternatives, any case), judged strictly: a number must be "
            "the answer's only value (\"2 + 2 = 5, or 4\" is wrong), a word must be in the answer's first claim. "
            "Questions without an entry count as kept when the fine-tuned answer stays close to the base's (ROUGE-L >= 0.5)."
        ),
    )
    general_max_new_tokens: int = Field(48, ge=1, description="Most tokens generated for a general question.")
    seed: int = Field(0, description="Seed of the deterministic question sample.")
    cpu_threads: int | None = Field(None, ge=1, description="torch threads when generating on CPU (None = torch's default; 1 on a shared CPU).")
    gate: GateConfig = Field(default_factory=GateConfig, description="Publish gate.")
