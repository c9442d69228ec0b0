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
import re

import numpy as np
import pandas as pd

from loraflow.config.synthesize import PHRASINGS_PER_KIND, AnimeQAOptions
from tasks.synthesizers import anime_probes
from tasks.synthesizers.common import column_text, conversations_frame, provenance, skipped_frame, unstated_fact
from tasks.synthesizers.facts import FactType, not_a, parses_as
from tasks.synthesizers.values import cut_synopsis, join_items, split_items

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
LIST_FIELDS = {"genres", "producers", "studios"}
COUNT_FIELDS = {"episodes", "scored_by"}
# The type of every fact this synthesizer renders (tasks/synthesizers/facts.py); the rest is text.
FACT_TYPES: dict[str, FactType] = {
    "id": "text", "name": "text", "english_name": "text", "other_name": "text", "genres": "text", "synopsis": "text",
    "producers": "text", "studios": "text", "rating": "text", "episodes": "count", "scored_by": "count", "score": "score",
}

_INTEGRAL_FLOAT = re.compile(r"^(\d+)\.0+$")
# MyAnimeList appends its credit to synopses: "[Written by MAL Rewrite]", "(Source: Crunchyroll)".
_CREDIT = re.compile(r"\s*[\[(](?:written by|source:)[^\])]*[\])]\s*$", re.IGNORECASE)


def required_columns(options: AnimeQAOptions) -> dict[str, str]:
    """Config key (under synthesize.anime_qa) -> source column, for the fields the configured kinds use."""
    fields = {"id"} | {field for kind in options.kinds for field in KIND_FIELDS[kind]}
    return {f"columns.{field}": getattr(options.columns, field) for field in sorted(fields)}


def expansion(options: AnimeQAOptions) -> tuple[int, int]:
    """(units per input row, conversations per emitted unit): one unit per kind, one conversation per phrasing."""
    return len(options.kinds), options.trained_phrasings + options.heldout_phrasings


def synthesize(rows: pd.DataFrame, options: AnimeQAOptions) -> tuple[pd.DataFrame, pd.DataFrame]:
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
        needed = [field for field in ("id",) + KIND_FIELDS[kind] if field not in options.optional_fields]
        blocked = np.logical_or.reduce([absent[field] | mistyped[field] for field in needed])
        for row in np.flatnonzero(blocked).tolist():
            fields_absent = [field for field in needed if absent[field][row] or mistyped[field][row]]
            columns = [getattr(options.columns, field) for field in fields_absent]
            shown = ", ".join(
                not_a(FACT_TYPES[field], column, values[field][row]) if mistyped[field][row]
                else f"{column} is {shown_value(raw[field][row])}"
                for column, field in zip(columns, fields_absent)
            )
            skipped_rows.append(row), skipped_kinds.append(kind), skipped_columns.append(columns)
            skipped_reasons.append(f"{kind} skipped: {shown}")

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


# ---- questions beyond the phrasings (tasks/synthesizers/anime_probes.py)


def alternative_title(values: dict, row: int, slot: int) -> str:
    """The title a title-variant question asks by: the English title on even slots, the other title on odd ones,
    whichever exists (the main title when neither does)."""
    first, second = ("english_name", "other_name") if slot % 2 == 0 else ("other_name", "english_name")
    return title_value(values, first, row) or title_value(values, second, row) or values["name"][row]


def title_value(values: dict, field: str, row: int) -> str | None:
    """A row's title field, None where it is missing or the configured kinds do not read it."""
    return values[field][row] if field in values else None


def extra_part(values: dict, answered: dict, options: AnimeQAOptions, sources: list, source_rows: list,
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


# ---- values


def clean_field(field: str, raw: list[str | None], missing: set[str], max_synopsis_words: int) -> list:
    """One field's values, cleaned: None where missing; a tuple of items for list fields."""
    # Trim and collapse whitespace runs; the test lets most values (printable, no double space) skip the work.
    collapsed = [
        None if value is None
        else value if value.isprintable() and "  " not in value and value[:1] != " " and value[-1:] != " "
        else " ".join(value.split())
        for value in raw
    ]
    if field in LIST_FIELDS:
        # Catalogs repeat the same genre/studio lists a lot: split each distinct text once.
        split = {}
        return [
            None if value is None else split[value] if value in split else split.setdefault(value, split_items(value, missing))
            for value in collapsed
        ]
    if field in COUNT_FIELDS:
        collapsed = [value[: value.index(".")] if value and _INTEGRAL_FLOAT.match(value) else value for value in collapsed]
    if field == "synopsis":
        collapsed = [None if value is None else synopsis_text(value, max_synopsis_words) for value in collapsed]
    # casefold() never shortens a text, so values longer than every missing marker need no check.
    longest = max(map(len, missing))
    return [None if value is None or (len(value) <= longest and value.casefold() in missing) else value for value in collapsed]


def mistyped_values(fact_type: FactType, values: list) -> np.ndarray:
    """True where a present value does not parse as `fact_type` (list fields are text, so never)."""
    if fact_type == "text":
        return np.zeros(len(values), dtype=bool)
    return np.array([value is not None and not parses_as(fact_type, value) for value in values], dtype=bool)


def synopsis_text(text: str, max_words: int) -> str:
    """A synopsis without MyAnimeList's trailing credit, cut to `max_words`."""
    if text.endswith(("]", ")")):
        text = _CREDIT.sub("", text)
    # Counting spaces (C speed) first: most synopses need no cut.
    return cut_synopsis(text, max_words) if text.count(" ") >= max_words else text


def shown_value(raw: str | None) -> str:
    """How a missing value is named in a skip reason."""
    return "empty (no value)" if raw is None else repr(raw)


def facts_per_row(column: str, values: list) -> list[list[dict] | None]:
    """Per row, the {column, value} facts of one field (one per item of a list field); None where missing.

    Rows with the same value share one list of fact dicts (built once); treat facts as read-only.
    """
    built = {}

    def facts(value):
        items = value if isinstance(value, tuple) else (value,)
        return built.setdefault(value, [{"column": column, "value": item} for item in items])

    return [None if value is None else built[value] if value in built else facts(value) for value in values]


# ---- answers: one fixed sentence shape per kind; arguments are the kind's values, then their facts


def overview_answer(name, english_name, other_name, genres, synopsis, english_facts, other_facts, genre_facts, synopsis_facts):
    folded = name.casefold()
    titles, facts = [], []
    if english_name is not None and english_name.casefold() != folded:
        titles.append(f"English title: {english_name}")
        facts += english_facts
    if other_name is not None and other_name.casefold() not in (folded, (english_name or "").casefold()):
        titles.append(f"also known as {other_name}")
        facts += other_facts
    aka = f" ({'; '.join(titles)})" if titles else ""
    genre_word = "genre" if len(genres) == 1 else "genres"
    answer = f"{name}{aka} is an anime in the {genre_word} {join_items(genres)}. Synopsis: {synopsis}"
    return answer, facts + genre_facts + synopsis_facts


def production_answer(name, producers, studios, episodes, producer_facts, studio_facts, episode_facts):
    unit = "episode" if episodes == "1" else "episodes"
    answer = f"{name} was produced by {join_items(producers)}, animated by {join_items(studios)}, and runs for {episodes} {unit}."
    return answer, producer_facts + studio_facts + episode_facts


def reception_answer(name, rating, score, scored_by, rating_facts, score_facts, scored_by_facts):
    unit = "voter" if scored_by == "1" else "voters"
    answer = f"{name} is rated {rating} and has a user score of {score} from {scored_by} {unit}."
    return answer, rating_facts + score_facts + scored_by_facts


ANSWERS = {"overview": overview_answer, "production": production_answer, "reception": reception_answer}


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
