"""anime_qa: three question kinds per catalog row (overview, production, reception), checked against the row.

What the recipe users copy today gets wrong, and what this does instead:
- `UNKNOWN`, empty, NaN, None, ... (options.missing_values, compared trimmed and ignoring case) never reach a
  text. A kind that needs a missing value is skipped for that row and reported with the column; only the
  fields in options.optional_fields (default: the English and other titles) drop their clause instead.
- One answer template per kind, short and always phrased the same way, so a 135M model can learn the facts;
  several question templates per kind, of which `trained_phrasings` go to training and `heldout_phrasings`
  (different wordings for the same row) are kept for evaluation. Which is which is a seeded hash of the
  row's id, so it does not change when the catalog is re-ordered or grows.
- Every answer is checked before it is emitted: each fact value must appear verbatim in it.
- Facts are typed (FACT_TYPES): a count or a score that does not parse (`Scored By` = `abc`) skips the kind
  for that row with the reason, like a missing value.

Values are written as in the source, trimmed and with runs of whitespace collapsed; counts that a float
column turned into "12.0" are written "12". List columns (genres, producers, studios) are split on commas
and joined as "A, B and C"; each item is its own fact.
"""

import hashlib
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import ConfigDict, Field, model_validator

from loraflow.config.base import StrictModel
from loraflow.synthesizers import anime_probes
from loraflow.synthesizers.anime_answers import ANSWERS, clean_field, facts_per_row, mistyped_values, shown_value
from loraflow.synthesizers.common import column_text, conversations_frame, provenance, skipped_frame, unstated_fact
from loraflow.synthesizers.facts import FactType, not_a

# Each kind has wordings that ask one of its facts alone ("How many episodes ...", "Which genres ..."): with only
# multi-fact wordings trained, "how many episodes is X?" drew the overview answer (docs/results.md, "Natural questions").
QUESTIONS = {
    "overview": (
        "What is the anime {name} about?",
        "Tell me about the anime {name}.",
        "Can you give me an overview of {name}?",
        "What kind of anime is {name}, and what is its story?",
        "Describe the anime {name}.",
        "I'd like to know about {name}. What is it?",
        "Which genres is the anime {name} in?",
        "What should I know about the anime {name}?",
    ),
    "production": (
        "Who produced the anime {name}?",
        "Which studio animated {name}, and who produced it?",
        "Tell me about the production of {name}.",
        "Who made the anime {name}, and how many episodes does it have?",
        "What are the producers, studios and episode count of {name}?",
        "How many episodes does the anime {name} have?",
        "What is the episode count of {name}?",
        "Give me the production details of the anime {name}.",
    ),
    "reception": (
        "How was the anime {name} received?",
        "What is the score of {name}?",
        "How do viewers rate the anime {name}?",
        "What age rating and user score does {name} have?",
        "Tell me about the reviews of {name}.",
        "Is {name} well rated?",
        "How many people scored {name}, and what score did it get?",
        "What are the rating and score of the anime {name}?",
    ),
}
PHRASINGS_PER_KIND = 8
assert all(len(templates) == PHRASINGS_PER_KIND for templates in QUESTIONS.values())
# (text before the name, text after it): concatenation is several times faster than str.format per question.
QUESTION_PARTS = {kind: [tuple(template.split("{name}")) for template in templates] for kind, templates in QUESTIONS.items()}
assert all(len(parts) == 2 for templates in QUESTION_PARTS.values() for parts in templates)

# The fields each kind states (besides `id`, which every kind needs as the row's split group).
KIND_FIELDS = {
    "overview": ("name", "english_name", "other_name", "genres", "synopsis"),
    "production": ("name", "producers", "studios", "episodes"),
    "reception": ("name", "rating", "score", "scored_by"),
}
# The type of every fact this synthesizer renders (loraflow/synthesizers/facts.py); the rest is text.
FACT_TYPES: dict[str, FactType] = {
    "id": "text", "name": "text", "english_name": "text", "other_name": "text", "genres": "text", "synopsis": "text",
    "producers": "text", "studios": "text", "rating": "text", "episodes": "count", "scored_by": "count", "score": "score",
}

# ---- options (synthesize.anime_qa)

QuestionKind = Literal[tuple(QUESTIONS)]
OptionalAnimeField = Literal["english_name", "other_name"]


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


class Options(StrictModel):
    """Options of the anime_qa synthesizer (three question kinds per catalog row)."""

    model_config = ConfigDict(title="AnimeQAOptions")

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


# ---- the synthesizer


def required_columns(options: Options) -> dict[str, str]:
    """Config key (under synthesize.anime_qa) -> source column, for the fields the configured kinds use."""
    fields = {"id"} | {field for kind in options.kinds for field in KIND_FIELDS[kind]}
    return {f"columns.{field}": getattr(options.columns, field) for field in sorted(fields)}


def expansion(options: Options) -> tuple[int, int]:
    """(units per input row, conversations per emitted unit): one unit per kind, one conversation per phrasing."""
    return len(options.kinds), options.trained_phrasings + options.heldout_phrasings


def synthesize(rows: pd.DataFrame, options: Options) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Catalog rows -> (question/answer conversations, skipped (row, kind) units with reasons)."""
    sources, source_rows = provenance(rows)
    missing = {value.strip().casefold() for value in options.missing_values} | {""}
    fields = {"id"} | {field for kind in options.kinds for field in KIND_FIELDS[kind]}
    raw = {field: column_text(rows, getattr(options.columns, field)) for field in fields}
    values = {field: clean_field(field, raw[field], missing, options.max_synopsis_words) for field in fields}
    absent = {field: np.array([value is None for value in values[field]], dtype=bool) for field in fields}
    mistyped = {field: mistyped_values(FACT_TYPES[field], values[field]) for field in fields}
    field_facts = {field: facts_per_row(getattr(options.columns, field), values[field]) for field in fields - {"id", "name"}}
    source_ids = [value or "" for value in values["id"]]
    order = phrasing_order(source_ids, options.seed, len(options.kinds))
    trained, slots = options.trained_phrasings, options.trained_phrasings + options.heldout_phrasings
    extras_per_row = options.natural_questions + options.unknown_titles + options.refusal_examples
    per_row = len(options.kinds) * slots + extras_per_row  # order keys: a row's questions, then its extras
    alternative_titles = [alternative_title(values, row, slot) for row in range(len(rows)) for slot in (0, 1)]

    parts, answered = [], {}  # one column dict per (kind, phrasing slot), concatenated and put in row order at the end
    skipped_rows, skipped_kinds, skipped_columns, skipped_reasons = [], [], [], []
    for kind_index, kind in enumerate(options.kinds):
        # ---- which rows can be asked this kind: every needed value present and of its fact type
        blocked, skips = blocked_rows(kind, options, raw, values, absent, mistyped)
        for row, columns, reason in skips:
            skipped_rows.append(row), skipped_kinds.append(kind), skipped_columns.append(columns)
            skipped_reasons.append(reason)

        # ---- answers, each checked against its row before it is emitted
        candidates = np.flatnonzero(~blocked).tolist()
        kind_columns = [values[field] for field in KIND_FIELDS[kind]] + [field_facts[field] for field in KIND_FIELDS[kind][1:]]
        arguments = zip(*([column[row] for row in candidates] for column in kind_columns))
        answers = [ANSWERS[kind](*row_values) for row_values in arguments]
        good_rows, good_answers = [], []
        for row, (answer, facts) in zip(candidates, answers):
            unstated = unstated_fact(answer, facts)
            if unstated is None:
                good_rows.append(row), good_answers.append((answer, facts))
                continue
            skipped_rows.append(row), skipped_kinds.append(kind), skipped_columns.append([unstated["column"]])
            skipped_reasons.append(f"{kind} skipped: the answer does not state {unstated['column']} {unstated['value']!r}")

        for row, answer in zip(good_rows, good_answers):
            answered.setdefault(row, {})[kind] = answer

        # ---- one conversation per phrasing slot; the last trained_title_variants trained ones ask by another title
        templates = QUESTION_PARTS[kind]
        for slot in range(slots):
            chosen = order[kind_index][good_rows, slot].tolist() if good_rows else []
            variant = trained - options.trained_title_variants <= slot < trained
            names = [alternative_titles[2 * row + slot % 2] if variant else values["name"][row] for row in range(len(rows))]
            parts.append({
                "order": [row * per_row + kind_index * slots + slot for row in good_rows],
                "ids": [f"{sources[row]}:{source_rows[row]}:{kind}:{template}" for row, template in zip(good_rows, chosen)],
                "messages": [
                    [{"role": "user", "content": templates[template][0] + names[row] + templates[template][1]},
                     {"role": "assistant", "content": answer}]
                    for row, template, (answer, _) in zip(good_rows, chosen, good_answers)
                ],
                "kind": [kind] * len(good_rows),
                "phrasing_set": ["train" if slot < trained else "heldout"] * len(good_rows),
                "facts": [facts for _, facts in good_answers],
                "rows": good_rows,
            })

    if extras_per_row:
        parts.append(extra_part(values, answered, options, sources, source_rows, source_ids, per_row - extras_per_row, per_row))

    def gathered(key):
        return [item for part in parts for item in part[key]]

    out_rows = gathered("rows")
    conversations = conversations_frame(
        ids=gathered("ids"), messages=gathered("messages"), kind=gathered("kind"),
        source=[sources[row] for row in out_rows], source_row=[source_rows[row] for row in out_rows],
        source_id=[source_ids[row] for row in out_rows], phrasing_set=gathered("phrasing_set"), facts=gathered("facts"),
    )
    # Catalog order: a row's kinds and phrasings together, as a reader of the artifact expects.
    conversations = conversations.take(np.argsort(np.array(gathered("order"), dtype=np.int64), kind="stable"))
    conversations = conversations.reset_index(drop=True)
    conversations.attrs["stats"] = {"rows_expanded": len(parts[-1]["rows"]) if extras_per_row else 0}
    return conversations, skipped_frame(skipped_rows, skipped_kinds, skipped_columns, skipped_reasons)


def blocked_rows(kind: str, options: Options, raw: dict, values: dict, absent: dict, mistyped: dict):
    """Rows that cannot be asked `kind` (a needed value missing or not of its fact type): the boolean mask, and
    (row, columns, reason) for each."""
    needed = [field for field in ("id",) + KIND_FIELDS[kind] if field not in options.optional_fields]
    blocked = np.logical_or.reduce([absent[field] | mistyped[field] for field in needed])
    skips = []
    for row in np.flatnonzero(blocked).tolist():
        fields_absent = [field for field in needed if absent[field][row] or mistyped[field][row]]
        columns = [getattr(options.columns, field) for field in fields_absent]
        shown = ", ".join(
            not_a(FACT_TYPES[field], column, values[field][row]) if mistyped[field][row]
            else f"{column} is {shown_value(raw[field][row])}"
            for column, field in zip(columns, fields_absent)
        )
        skips.append((row, columns, f"{kind} skipped: {shown}"))
    return blocked, skips

# ---- questions beyond the phrasings (loraflow/synthesizers/anime_probes.py)


def alternative_title(values: dict, row: int, slot: int) -> str:
    """The title a title-variant question asks by: the English title on even slots, the other title on odd ones,
    whichever exists (the main title when neither does)."""
    first, second = ("english_name", "other_name") if slot % 2 == 0 else ("other_name", "english_name")
    return title_value(values, first, row) or title_value(values, second, row) or values["name"][row]


def title_value(values: dict, field: str, row: int) -> str | None:
    """A row's title field, None where it is missing or the configured kinds do not read it."""
    return values[field][row] if field in values else None


def extra_part(values: dict, answered: dict, options: Options, sources: list, source_rows: list,
               source_ids: list, first_slot: int, per_row: int) -> dict:
    """Natural questions, unknown-title probes and refusal examples of every row, as one part of the output."""
    part = {key: [] for key in ("order", "ids", "messages", "kind", "phrasing_set", "facts", "rows")}
    for row in range(len(source_ids)):
        if row not in answered:
            continue  # every kind was skipped: the row is quarantined, ask nothing about it
        rng = anime_probes.row_random(options.seed, source_ids[row], "probes")
        row_values = {field: title_value(values, field, row) for field in ("name", "english_name", "other_name")}
        # Made-up titles are checked against this row's own titles only, so a row's probes are the same whichever
        # shard synthesizes it; evaluation drops any probe whose title another row holds (metrics.without_known_titles).
        known = anime_probes.KnownTitles([title for title in row_values.values() if title])
        taken: set[str] = set()
        items = (
            [(item, "natural") for item in anime_probes.natural_questions(
                row_values, answered[row], options.natural_questions, rng, options.columns)]
            + [(item, "unknown") for item in anime_probes.unknown_probes(options.unknown_titles, rng, known, taken)]
            + [(item, "train") for item in anime_probes.refusal_examples(
                options.refusal_examples, rng, known, taken, QUESTION_PARTS)]
        )
        for position, (item, phrasing_set) in enumerate(items):
            part["order"].append(row * per_row + first_slot + position)
            part["ids"].append(f"{sources[row]}:{source_rows[row]}:{item['kind']}:{phrasing_set}{position}")
            part["messages"].append([{"role": "user", "content": item["question"]},
                                     {"role": "assistant", "content": item["answer"]}])
            part["kind"].append(item["kind"])
            part["phrasing_set"].append(phrasing_set)
            part["facts"].append(item["facts"])
            part["rows"].append(row)
    return part


# ---- phrasings


def phrasing_order(source_ids: list[str], seed: int, kinds: int) -> list[np.ndarray]:
    """Per kind, an (rows, templates) array: each row's template indexes in a seeded, row-specific order.

    The first `trained_phrasings` columns are the row's training wordings, the next ones its held-out
    wordings, so a row is never evaluated on a wording it was trained on. The order depends only on the
    seed, the row's id and the kind (blake2b, then splitmix64 in numpy), not on the row's position.
    """
    row_keys = np.array(
        [int.from_bytes(hashlib.blake2b(f"{seed}\x1f{sid}".encode(), digest_size=8).digest(), "little") for sid in source_ids],
        dtype=np.uint64,
    ).reshape(-1, 1)
    orders = []
    for kind in range(kinds):
        salt = (np.arange(PHRASINGS_PER_KIND, dtype=np.uint64) + np.uint64(kind * PHRASINGS_PER_KIND + 1)).reshape(1, -1)
        orders.append(np.argsort(splitmix64(row_keys ^ (salt * np.uint64(0x9E3779B97F4A7C15))), axis=1, kind="stable"))
    return orders


def splitmix64(keys: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on a uint64 array (wrapping arithmetic is intended)."""
    keys = keys + np.uint64(0x9E3779B97F4A7C15)
    keys = (keys ^ (keys >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    keys = (keys ^ (keys >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return keys ^ (keys >> np.uint64(31))
