"""anime_qa's values and answers: a catalog cell cleaned into a value (or None where missing), its facts, and the
one fixed answer sentence per question kind."""

import re

import numpy as np

from loraflow.synthesizers.facts import FactType, parses_as
from loraflow.synthesizers.values import cut_synopsis, join_items, split_items

LIST_FIELDS = {"genres", "producers", "studios"}
COUNT_FIELDS = {"episodes", "scored_by"}

_INTEGRAL_FLOAT = re.compile(r"^(\d+)\.0+$")
# MyAnimeList appends its credit to synopses: "[Written by MAL Rewrite]", "(Source: Crunchyroll)".
_CREDIT = re.compile(r"\s*[\[(](?:written by|source:)[^\])]*[\])]\s*$", re.IGNORECASE)


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
