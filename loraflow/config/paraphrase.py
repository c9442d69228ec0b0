"""Config of table_qa's optional paraphrase augmentation: a local model rewrites each kind's trained question
phrasings into extra trained phrasings, once per config (tasks/paraphrase.py does it, docs/table_qa.md measures it)."""

from pydantic import Field

from loraflow.config.base import StrictModel


class ParaphraseOptions(StrictModel):
    """Extra trained question phrasings per kind, written by a local model and filtered before use."""

    enabled: bool = Field(
        False, description="Generate extra trained phrasings per kind with a local model (off by default: measured "
        "on the anime data, no reliable gain in natural-question fact accuracy at equal training steps and fewer "
        "general answers right, docs/table_qa.md).",
    )
    model: str | None = Field(
        None, description="Local folder or Hub id of the model that writes the paraphrases; None: the base model "
        "being trained (model.base), run offline.",
    )
    per_kind: int = Field(4, ge=1, le=32, description="At most this many accepted paraphrases per kind (the first "
                          "that pass every filter, in template order).")
    candidates_per_template: int = Field(
        4, ge=1, le=32, description="Samples drawn per trained phrasing; the filters then keep at most per_kind per kind.",
    )
    temperature: float = Field(0.8, gt=0.0, le=2.0, description="Sampling temperature of the paraphraser.")
    max_new_tokens: int = Field(40, ge=8, le=256, description="Longest paraphrase generated, in tokens.")
    seed: int = Field(0, description="Sampling seed: the same seed, templates and model give the same paraphrases.")
