"""Config of the synthesize stage: which synthesizer turns source rows into conversations."""

from typing import Literal

from pydantic import Field, model_validator

from loraflow.config.base import StrictModel
from loraflow.config.table_qa import TableQAOptions

QuestionKind = Literal["overview", "production", "reception"]
SynthesizerKind = Literal["anime_qa", "table_qa", "instruction", "conversations", "text"]
OptionalAnimeField = Literal["english_name", "other_name"]

# Question templates per kind in tasks/synthesizers/anime_qa.py (a test keeps the two in step).
PHRASINGS_PER_KIND = 8


class AnimeColumns(StrictModel):
    """Which source column holds each fact the anime_qa synthesizer asks about."""

    id: str = Field("anime_id", description="Unique id of the title (groups its questions for the split).")
    name: str = Field("Name", description="Main (romanised) title.")
    english_name: str = Field("English name", description="English title.")
    other_name: str = Field("Other name", description="Alternative / native title.")
    genres: str = Field("Genres", description="Comma-separated genres.")
    synopsis: str = Field("Synopsis", description="Plot summary.")
    type: str = Field("Type", description="TV, Movie, OVA, ...")
    episodes: str = Field("Episodes", description="Number of episodes.")
    producers: str = Field("Producers", description="Comma-separated producers.")
    studios: str = Field("Studios", description="Comma-separated studios.")
    rating: str = Field("Rating", description="Age rating, e.g. 'PG-13 - Teens 13 or older'.")
    score: str = Field("Score", description="Mean user score.")
    scored_by: str = Field("Scored By", description="Number of users who scored the title.")


class AnimeQAOptions(StrictModel):
    """Options of the anime_qa synthesizer (three question kinds per catalog row)."""

    columns: AnimeColumns = Field(default_factory=AnimeColumns, description="Column names in the source.")
    kinds: list[QuestionKind] = Field(
        default_factory=lambda: ["overview", "production", "reception"],
        description="Question kinds to make for every row.",
    )
    trained_phrasings: int = Field(2, ge=1, le=PHRASINGS_PER_KIND, description="Phrasings per kind used for training.")
    heldout_phrasings: int = Field(1, ge=0, le=4, description="Other phrasings per kind, only asked at evaluation.")
    missing_values: list[str] = Field(
        default_factory=lambda: ["UNKNOWN", "Unknown", "", "nan", "NaN", "None", "N/A", "n/a", "-"],
        description="Values treated as missing (compared after trimming, ignoring case; empty/NaN/None always are): "
        "a question that needs one is skipped for that row and counted.",
    )
    optional_fields: list[OptionalAnimeField] = Field(
        default_factory=lambda: ["english_name", "other_name"],
        description="Title fields (english_name, other_name) whose missing value only drops their clause from the "
        "overview answer; listed or not, a missing value in any other field a kind needs skips that kind for the row.",
    )
    max_synopsis_words: int = Field(
        60, ge=5, description="Synopses are cut to this many words (at a sentence end when possible)."
    )
    seed: int = Field(0, description="Seed for choosing phrasings per row (deterministic).")
    trained_title_variants: int = Field(
        0, ge=0, le=PHRASINGS_PER_KIND,
        description="Of the trained phrasings per kind, how many ask by the English title or alias instead of the main "
        "title (the answer is the same), so the model also knows a title by its other names.",
    )
    natural_questions: int = Field(
        3, ge=0, le=10,
        description="Questions per row asked the way users ask (by English title or alias, a few facts in a new "
        "combination, short or chatty), none of them a training wording: evaluation only (natural fact accuracy).",
    )
    unknown_titles: int = Field(
        2, ge=0, le=10,
        description="Made-up titles per row (in no row of the source) asked at evaluation; the right answer is a "
        "refusal (refusal rate).",
    )
    refusal_examples: int = Field(
        0, ge=0, le=20,
        description="Other made-up titles per row trained with a refusal answer, so the model says it does not know "
        "a title instead of inventing its facts.",
    )

    @model_validator(mode="after")
    def _enough_templates(self):
        if self.trained_title_variants > self.trained_phrasings:
            raise ValueError(f"trained_title_variants = {self.trained_title_variants} > trained_phrasings = "
                             f"{self.trained_phrasings} -> lower trained_title_variants")
        if self.trained_phrasings + self.heldout_phrasings > PHRASINGS_PER_KIND:
            raise ValueError(
                f"trained_phrasings + heldout_phrasings = {self.trained_phrasings + self.heldout_phrasings}, but each "
                f"question kind has {PHRASINGS_PER_KIND} templates -> lower one of them"
            )
        return self


class InstructionOptions(StrictModel):
    """Options of the instruction synthesizer (Alpaca-style rows)."""

    instruction_column: str = Field("instruction", description="Column with the instruction.")
    input_column: str | None = Field("input", description="Optional column with extra input; empty means none.")
    output_column: str = Field("output", description="Column with the reference answer.")
    system_column: str | None = Field(None, description="Optional column with a per-row system prompt.")
    id_column: str | None = Field(None, description="Optional column with a stable row id; else source + row index.")


class ConversationsOptions(StrictModel):
    """Options of the conversations synthesizer (ShareGPT-style multi-turn rows)."""

    column: str = Field("conversations", description="Column holding the list of turns.")
    role_key: str = Field("from", description="Key of a turn's speaker.")
    content_key: str = Field("value", description="Key of a turn's text.")
    role_map: dict[str, Literal["system", "user", "assistant"]] = Field(
        default_factory=lambda: {
            "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
        },
        description="Speaker names in the data -> chat roles.",
    )
    id_column: str | None = Field(None, description="Optional column with a stable row id.")


class TextOptions(StrictModel):
    """Options of the text synthesizer (plain language modelling on one column)."""

    column: str = Field("text", description="Column with the text to train on.")
    id_column: str | None = Field(None, description="Optional column with a stable row id.")


class SynthesizeConfig(StrictModel):
    """Which synthesizer to run, and its options."""

    kind: SynthesizerKind = Field(
        "anime_qa", description="Synthesizer: anime_qa | table_qa | instruction | conversations | text."
    )
    anime_qa: AnimeQAOptions = Field(default_factory=AnimeQAOptions, description="Options for kind=anime_qa.")
    table_qa: TableQAOptions | None = Field(
        None, description="Options for kind=table_qa: fields, question kinds and templates, or a preset "
        "(docs/table_qa.md). Required when any source uses table_qa.",
    )
    instruction: InstructionOptions = Field(default_factory=InstructionOptions, description="Options for kind=instruction.")
    conversations: ConversationsOptions = Field(
        default_factory=ConversationsOptions, description="Options for kind=conversations."
    )
    text: TextOptions = Field(default_factory=TextOptions, description="Options for kind=text.")
    duplicate_ids: Literal["first", "last", "none"] = Field(
        "first", description="Rows that share a source id but state different facts (e.g. two episode counts): keep "
        "the first in input order, the last, or none; the others are quarantined with the reason "
        "'duplicate id with different facts'. Rows of one id that agree are kept (tokenize removes exact duplicates).",
    )

    @model_validator(mode="after")
    def _table_qa_declared(self):
        if self.kind == "table_qa" and self.table_qa is None:
            raise ValueError("kind is table_qa but synthesize.table_qa is not set -> declare its fields and kinds, or "
                             "a preset (docs/table_qa.md)")
        return self
