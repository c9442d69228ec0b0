"""Config of the evaluate stage: metrics, generation and the publish gate."""

from pydantic import Field

from loraflow.config.base import StrictModel


class GateConfig(StrictModel):
    """Thresholds the fine-tuned model must meet before publish runs."""

    min_fact_accuracy: float = Field(0.5, ge=0, le=1, description="Minimum fact accuracy on trained phrasings (anime_qa).")
    min_stop_rate: float = Field(0.95, ge=0, le=1, description="Minimum share of generations that end with EOS.")
    must_beat_base: bool = Field(
        True, description="The fine-tuned model must beat the base on the main metric (fact accuracy, else ROUGE-L)."
    )
    must_not_regress_previous: bool = Field(
        True,
        description=(
            "When a model was published before under this run name, the new one is evaluated beside it on the same "
            "questions and must not be worse: main metric (fact accuracy, else ROUGE-L) at least the previous one's "
            "minus previous_tolerance, and validation loss at most the previous one's times (1 + previous_loss_tolerance)."
        ),
    )
    previous_tolerance: float = Field(0.02, ge=0, le=1, description="Drop in the main metric allowed against the previous model.")
    previous_loss_tolerance: float = Field(
        0.05, ge=0, description="Relative rise in validation loss allowed against the previous model (0.05 = 5 %).",
    )
    max_general_regressions: int | None = Field(
        None, ge=0, description="Most general-knowledge answers allowed to go from right to wrong (None: reported, not gated).",
    )


class EvalConfig(StrictModel):
    """Evaluation of the base and the fine-tuned model."""

    max_new_tokens: int = Field(160, ge=1, description="Most tokens generated for any question.")
    answer_margin_tokens: int = Field(
        32, ge=1, description="A question's generation budget: its reference answer's tokens plus this margin (capped by max_new_tokens)."
    )
    batch_size: int = Field(16, ge=1, description="Prompts per generation batch.")
    max_questions: int = Field(300, ge=1, description="Cap on generated questions per model (sampled deterministically).")
    general_questions: list[str] = Field(
        default_factory=lambda: [
            "What is the capital of France?",
            "What is 2 + 2?",
            "What color is the sky on a clear day?",
        ],
        description="General-knowledge prompts whose base answers should survive fine-tuning.",
    )
    general_expected: dict[str, str] = Field(
        default_factory=lambda: {
            "What is the capital of France?": "Paris",
            "What is 2 + 2?": "4|four",
            "What color is the sky on a clear day?": "blue",
        },
        description=(
            "Expected answer per general question ('|' separates alternatives, any case), judged strictly: a number must be "
            "the answer's only value (\"2 + 2 = 5, or 4\" is wrong), a word must be in the answer's first claim. "
            "Questions without an entry count as kept when the fine-tuned answer stays close to the base's (ROUGE-L >= 0.5)."
        ),
    )
    seed: int = Field(0, description="Seed of the deterministic question sample.")
    cpu_threads: int | None = Field(None, ge=1, description="torch threads when generating on CPU (None = torch's default; 1 on a shared CPU).")
    gate: GateConfig = Field(default_factory=GateConfig, description="Publish gate.")
