"""anime_qa's questions beyond its phrasings: asked as users ask, about made-up titles, and refusals to train.

- Natural questions (phrasing_set "natural", evaluation only): by main title, English title or alias, asking a
  few of a kind's facts in a new combination or order, in short and chatty forms. None of their wordings is a
  training template. The reference is the kind's answer; the facts are only those asked.
- Unknown-title probes (phrasing_set "unknown", evaluation only): the same natural wordings about titles made
  up from syllables or words that appear in no row of the source; the right answer is a refusal.
- Refusal examples (phrasing_set "train", `refusal_examples` per row): training questions about other made-up
  titles, answered with REFUSAL, so the model learns to say it does not know a title instead of inventing one.
Refusals are kind "refusal" with one fact, the made-up title (which the refusal states), column UNKNOWN_TITLE.
"""

import hashlib
import random

# (wording, the title it asks by, the kind whose answer holds the facts, the fields it asks for)
NATURAL = (
    ("Which studio animated {title}, and how many episodes does it have?", "english_name", "production", ("studios", "episodes")),
    ("how many episodes is {title}?", "name", "production", ("episodes",)),
    ("Who were the producers behind {title}?", "other_name", "production", ("producers",)),
    ("{title} - what studio made it?", "name", "production", ("studios",)),
    ("What genres does {title} belong to?", "english_name", "overview", ("genres",)),
    ("hey! what kind of show is {title}? genres please", "other_name", "overview", ("genres",)),
    ("Is {title} a comedy or what? Which genres is it?", "name", "overview", ("genres",)),
    ("What's the user score of {title}, and how many people rated it?", "english_name", "reception", ("score", "scored_by")),
    ("What is {title} rated for age?", "name", "reception", ("rating",)),
    ("Quick question: what score did {title} get?", "other_name", "reception", ("score",)),
)
NATURAL_KINDS = ("production", "overview", "reception")
UNKNOWN_TITLE = "unknown_title"
REFUSAL = "I don't know an anime called {title}: it is not in the catalog I was trained on."

_SYLLABLES = ("ka", "ki", "ku", "ko", "sa", "shi", "su", "so", "ta", "chi", "tsu", "to", "na", "ni", "no", "ha", "hi",
              "fu", "ho", "ma", "mi", "mu", "mo", "ya", "yu", "yo", "ra", "ri", "ru", "ro", "wa", "ga", "gi", "zu", "do")
_ADJECTIVES = ("Silent", "Crimson", "Hidden", "Last", "Broken", "Golden", "Wandering", "Frozen", "Distant", "Hollow")
_NOUNS = ("Lantern", "Orchard", "Compass", "Harbor", "Tide", "Archive", "Garden", "Signal", "Bridge", "Meadow")
_PLACES = ("Orvey", "Kestral", "Mirrowen", "Talbrine", "Quensa", "Dalvory", "Ithren", "Brenmoor")


def row_random(seed: int, source_id: str, purpose: str) -> random.Random:
    """A generator that depends only on the seed, the row's id and what it is for (not on row order)."""
    key = hashlib.blake2b(f"{seed}\x1f{source_id}\x1f{purpose}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(key, "little"))


def made_up_title(rng: random.Random) -> str:
    """A title in the catalog's styles: romanised words ("Kotaru Mimeki") or English ("The Silent Lantern of Orvey")."""
    if rng.random() < 0.5:
        return " ".join("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))).capitalize()
                        for _ in range(rng.randint(1, 2)))
    return f"The {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} of {rng.choice(_PLACES)}"


def word_spans(title: str) -> set[str]:
    """Every run of whole words of a title, case-folded ("The Silent Lantern" -> "the", "the silent", ...)."""
    words = title.casefold().split()
    return {" ".join(words[start:end]) for start in range(len(words)) for end in range(start + 1, len(words) + 1)}


class KnownTitles:
    """Real titles (a row's own), to check a made-up one against (case-insensitive, whole words)."""

    def __init__(self, titles: list[str]):
        self.titles = {title.casefold() for title in titles}
        self.spans = set().union(*(word_spans(title) for title in titles)) if titles else set()

    def is_unknown(self, title: str) -> bool:
        """True when no known title equals the made-up one, holds it, or is held by it (as whole words)."""
        return title.casefold() not in self.spans and not word_spans(title) & self.titles


def made_up_titles(count: int, rng: random.Random, known: KnownTitles, taken: set[str]) -> list[str]:
    """`count` made-up titles, none known (KnownTitles.is_unknown) and none already taken (taken is updated)."""
    titles = []
    while len(titles) < count:
        title = made_up_title(rng)
        if title.casefold() not in taken and known.is_unknown(title):
            taken.add(title.casefold())
            titles.append(title)
    return titles


def natural_choices(count: int, rng: random.Random) -> list[int]:
    """Indexes into NATURAL: one wording per kind in turn (production, overview, reception, ...), seeded."""
    by_kind = {kind: [i for i, item in enumerate(NATURAL) if item[2] == kind] for kind in NATURAL_KINDS}
    for indexes in by_kind.values():
        rng.shuffle(indexes)
    chosen = []
    while len(chosen) < min(count, len(NATURAL)):
        for kind in NATURAL_KINDS:
            if by_kind[kind] and len(chosen) < count:
                chosen.append(by_kind[kind].pop())
    return chosen


def title_for(field: str, name: str, english_name: str | None, other_name: str | None) -> str:
    """The title a wording asks by: the English title or alias it names, else the main title."""
    title = {"name": name, "english_name": english_name, "other_name": other_name}[field]
    return title or name


def natural_questions(row_values: dict, answers: dict, count: int, rng: random.Random, columns) -> list[dict]:
    """Up to `count` natural questions about one row, each {question, kind, answer, facts (the asked ones)}.

    `answers`: kind -> (answer, facts) of the kinds emitted for this row; a wording whose kind was skipped, or
    whose asked facts the answer does not hold, is left out."""
    questions = []
    for index in natural_choices(count, rng):
        wording, field, kind, asked = NATURAL[index]
        if kind not in answers:
            continue
        answer, facts = answers[kind]
        wanted = {getattr(columns, name) for name in asked}
        asked_facts = [fact for fact in facts if fact["column"] in wanted]
        if {fact["column"] for fact in asked_facts} != wanted:
            continue
        title = title_for(field, row_values["name"], row_values["english_name"], row_values["other_name"])
        questions.append({"question": wording.replace("{title}", title), "kind": kind, "answer": answer, "facts": asked_facts})
    return questions


def refusal(question: str, title: str) -> dict:
    """A question about a made-up title and its refusal, as natural_questions' items are."""
    return {"question": question, "kind": "refusal", "answer": REFUSAL.replace("{title}", title),
            "facts": [{"column": UNKNOWN_TITLE, "value": title}]}


def unknown_probes(count: int, rng: random.Random, known: KnownTitles, taken: set[str]) -> list[dict]:
    """`count` natural questions about made-up titles (evaluation only)."""
    titles = made_up_titles(count, rng, known, taken)
    return [refusal(NATURAL[rng.randrange(len(NATURAL))][0].replace("{title}", title), title) for title in titles]


def refusal_examples(count: int, rng: random.Random, known: KnownTitles, taken: set[str], templates: dict) -> list[dict]:
    """`count` training questions (the synthesizer's own templates, any kind) about made-up titles, refused."""
    titles = made_up_titles(count, rng, known, taken)
    wordings = [parts for kind_parts in templates.values() for parts in kind_parts]
    return [refusal(before + title + after, title) for title, (before, after) in
            ((title, wordings[rng.randrange(len(wordings))]) for title in titles)]
