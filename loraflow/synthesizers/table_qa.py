"""table_qa: grounded questions about any table, from templates declared in the config (table_qa_options.py).

Per row and question kind: the kind's trained phrasings (phrasing_set "train"; accepted paraphrases from
tasks/paraphrase.py join them, with ids ending `:p<j>`), held-out ones ("heldout", evaluation only) and natural
questions ("natural", evaluation only, ids ending `:n<j>`, scored on the facts they ask for), all with the same
answer, in the row's order. What the answer may say comes from the row only:
- A missing value (options.missing_values, trimmed, any case; empty/NaN/None always) or one that does not parse as
  its field's type skips the kind for that row, with the reason and the column, unless the field is optional for
  the kind: then the next answer template that does without it is used.
- Every value the answer states that the question does not already give is a fact of the example
  ({column, value}; one per item of a list field), and each must appear verbatim in the answer, or the kind is
  skipped for the row with the reason. Evaluation scores fact accuracy from these facts, for any table.
Values are trimmed and whitespace runs collapsed; counts a float column turned into "12.0" are written "12".
Templates are rendered by concatenating their pieces: a value holding braces stays text.
"""

import hashlib
import random
import re

from loraflow.synthesizers.table_qa_options import TableField, TableQAOptions, placeholders, template_parts
from loraflow.synthesizers.common import column_text, conversations_frame, provenance, row_ids, skipped_frame, unstated_fact
from loraflow.synthesizers.facts import FactType, not_a, parses_as
from loraflow.synthesizers.values import cut_synopsis, join_items, split_items

# The options (synthesize.table_qa): a module of their own beside this one, with the presets they read; the
# paraphrase stage reads them too.
Options = TableQAOptions

# Fact types are declared per field in the config (fields.<name>.type), not by this module.
FACT_TYPES: dict[str, FactType] = {}
_INTEGRAL_FLOAT = re.compile(r"^(\d+)\.0+$")


def used_fields(options: TableQAOptions) -> list[str]:
    """The fields any kind's templates name, in first-use order."""
    return list(dict.fromkeys(name for kind in options.kinds for name in options.kind_fields(kind)))


def required_columns(options: TableQAOptions) -> dict[str, str]:
    """Config key (under synthesize.table_qa) -> source column, for the id and every field a template names."""
    columns = {"id_column": options.id_column} if options.id_column else {}
    return columns | {f"fields.{name}.column": options.fields[name].column for name in used_fields(options)}


def expansion(options: TableQAOptions, paraphrases: dict[str, list[str]] | None = None) -> tuple[int, dict[str, int]]:
    """(units per input row, conversations per emitted unit of each kind): one unit per kind, one per phrasing."""
    return len(options.kinds), {kind: sum(phrasing_counts(options, kind, (paraphrases or {}).get(kind, [])))
                                for kind in options.kinds}


def phrasing_counts(options: TableQAOptions, kind: str, paraphrases: list[str]) -> tuple[int, int, int]:
    """(trained, held-out, natural) phrasings each row gets: paraphrases join the trained pool (trained_per_row
    still caps it), natural questions are all asked."""
    spec = options.kinds[kind]
    pool = len(spec.questions) + len(paraphrases)
    trained = pool if options.trained_per_row is None else min(pool, options.trained_per_row)
    return trained, options.per_row(kind)[1], len(spec.natural_questions)


def synthesize(rows, options: TableQAOptions, paraphrases: dict[str, list[str]] | None = None):
    """RAW rows -> (question/answer conversations, skipped (row, kind) units with reasons).

    `paraphrases`: kind -> accepted extra trained phrasings (the paraphrase stage's output; None: none)."""
    sources, source_rows = provenance(rows)
    source_ids = row_ids(rows, options.id_column, sources, source_rows)
    missing = {value.strip().casefold() for value in options.missing_values} | {""}
    fields = used_fields(options)
    raw = {name: column_text(rows, options.fields[name].column) for name in fields}
    values = {name: clean_values(raw[name], options.fields[name], missing) for name in fields}
    kinds = [(kind, KindPlan(options, kind, (paraphrases or {}).get(kind, []))) for kind in options.kinds]

    out = {key: [] for key in ("ids", "messages", "kind", "rows", "phrasing_set", "facts")}
    skipped = {key: [] for key in ("rows", "kinds", "columns", "reasons")}
    for row in range(len(rows)):
        row_values = {name: values[name][row] for name in fields}
        for kind, plan in kinds:
            # ---- can this row be asked this kind: every required value present and of its type
            blocked = [name for name in plan.required if row_values[name] is None or not of_type(plan.types[name], row_values[name])]
            if blocked:
                skip(skipped, row, kind, [options.fields[name].column for name in blocked],
                     ", ".join(blocked_reason(options.fields[name], raw[name][row], row_values[name]) for name in blocked))
                continue
            # ---- the answer: the first template whose fields all have a value, checked against the row
            usable = [name for name in plan.optional if row_values[name] is not None and of_type(plan.types[name], row_values[name])]
            answer_parts = next(parts for parts, needs in plan.answers if needs <= set(plan.required) | set(usable))
            answer = render(answer_parts, row_values, options.fields)
            facts = answer_facts(answer_parts, row_values, options.fields, plan.asked)
            unstated = unstated_fact(answer, facts)
            if unstated is not None:
                skip(skipped, row, kind, [unstated["column"]], f"the answer does not state {unstated['column']} {unstated['value']!r}")
                continue
            # ---- one conversation per phrasing the row gets
            for index, phrasing_set in plan.phrasings(options.seed, source_ids[row]):
                question = render(plan.questions[index], row_values, options.fields)
                out["ids"].append(f"{sources[row]}:{source_rows[row]}:{kind}:{plan.label(index)}")
                out["messages"].append([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
                out["kind"].append(kind), out["rows"].append(row), out["phrasing_set"].append(phrasing_set)
                out["facts"].append(plan.asked_facts(index, facts, options.fields))

    conversations = conversations_frame(
        ids=out["ids"], messages=out["messages"], kind=out["kind"], source=[sources[row] for row in out["rows"]],
        source_row=[source_rows[row] for row in out["rows"]], source_id=[source_ids[row] for row in out["rows"]],
        phrasing_set=out["phrasing_set"], facts=out["facts"],
    )
    return conversations, skipped_frame(skipped["rows"], skipped["kinds"], skipped["columns"], skipped["reasons"])


class KindPlan:
    """A kind's templates parsed once: its required and optional fields, questions, answers (with the fields each
    needs) and the phrasings a row gets. Question indexes: trained, held-out, paraphrases, natural, in that order."""

    def __init__(self, options: TableQAOptions, kind: str, paraphrases: list[str] = ()):
        spec = options.kinds[kind]
        self.kind = kind
        self.optional = [name for name in options.kind_fields(kind) if name in spec.optional]
        self.required = [name for name in options.kind_fields(kind) if name not in spec.optional]
        self.asked = options.question_fields(kind)
        self.types = {name: options.fields[name].type for name in options.kind_fields(kind)}
        naturals = [natural.question for natural in spec.natural_questions]
        self.questions = [template_parts(template)
                          for template in [*spec.questions, *spec.heldout_questions, *paraphrases, *naturals]]
        self.answers = [(template_parts(template), set(placeholders(template))) for template in spec.answers]
        self.trained, self.heldout = len(spec.questions), len(spec.heldout_questions)
        self.paraphrased, self.natural = len(paraphrases), len(naturals)
        self.natural_asks = [natural.asks for natural in spec.natural_questions]
        self.per_row = phrasing_counts(options, kind, list(paraphrases))[:2]

    def label(self, index: int) -> str:
        """The id suffix of a question: its index for trained and held-out phrasings, p<j> for the j-th paraphrase,
        n<j> for the j-th natural question (so an id says where its wording came from)."""
        first_paraphrase = self.trained + self.heldout
        if index < first_paraphrase:
            return str(index)
        if index < first_paraphrase + self.paraphrased:
            return f"p{index - first_paraphrase}"
        return f"n{index - first_paraphrase - self.paraphrased}"

    def asked_facts(self, index: int, facts: list[dict], fields: dict[str, TableField]) -> list[dict]:
        """The facts a question is scored on: all of the answer's, or for a natural question those it asks for."""
        natural = index - self.trained - self.heldout - self.paraphrased
        if natural < 0 or self.natural_asks[natural] is None:
            return facts
        columns = {fields[name].column for name in self.natural_asks[natural]}
        return [fact for fact in facts if fact["column"] in columns]

    def phrasings(self, seed: int, source_id: str) -> list[tuple[int, str]]:
        """(question index, phrasing set) of the phrasings a row is asked: all of them, or a seeded choice per row
        (by its id, so it does not change when the table is re-ordered or grows); every natural question."""
        first_paraphrase = self.trained + self.heldout
        trained = [*range(self.trained), *range(first_paraphrase, first_paraphrase + self.paraphrased)]
        heldout = range(self.trained, first_paraphrase)
        if self.per_row != (len(trained), self.heldout):
            rng = row_random(seed, source_id, self.kind)
            trained = sorted(rng.sample(trained, self.per_row[0]))
            heldout = sorted(rng.sample(list(heldout), self.per_row[1]))
        natural = range(first_paraphrase + self.paraphrased, first_paraphrase + self.paraphrased + self.natural)
        return ([(index, "train") for index in trained] + [(index, "heldout") for index in heldout]
                + [(index, "natural") for index in natural])


def row_random(seed: int, source_id: str, purpose: str) -> random.Random:
    """A generator that depends only on the seed, the row's id and what it is for (not on row order)."""
    key = hashlib.blake2b(f"{seed}\x1f{source_id}\x1f{purpose}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(key, "little"))


def skip(skipped: dict, row: int, kind: str, columns: list[str], why: str) -> None:
    """Record a (row, kind) unit set aside, with its columns and reason."""
    skipped["rows"].append(row), skipped["kinds"].append(kind), skipped["columns"].append(columns)
    skipped["reasons"].append(f"{kind} skipped: {why}")


# ---- values


def clean_values(raw: list[str | None], field: TableField, missing: set[str]) -> list:
    """One field's values: None where missing; a tuple of items for a list field; else the trimmed text."""
    drop = re.compile(field.drop_pattern) if field.drop_pattern else None
    cache: dict[str, object] = {}  # tables repeat values (a region, a type): clean each distinct text once

    def clean(value: str):
        if drop is not None:
            value = drop.sub("", value)
        value = " ".join(value.split())
        if field.list_separator is not None:
            items = split_items(value, missing, field.list_separator)
            return None if items is None else tuple(normal_count(item, field.type) for item in items)
        if value.casefold() in missing:
            return None
        if field.max_words is not None and value.count(" ") >= field.max_words:
            value = cut_synopsis(value, field.max_words)
        return normal_count(value, field.type)

    return [None if value is None else cache[value] if value in cache else cache.setdefault(value, clean(value))
            for value in raw]


def normal_count(value: str, fact_type: FactType) -> str:
    """'12.0' -> '12' for counts (a float column's whole numbers); anything else as it is."""
    return value[: value.index(".")] if fact_type == "count" and _INTEGRAL_FLOAT.match(value) else value


def of_type(fact_type: FactType, value) -> bool:
    """True when a present value (or every item of a list) parses as `fact_type`."""
    return all(parses_as(fact_type, item) for item in (value if isinstance(value, tuple) else (value,)))


def blocked_reason(field: TableField, raw: str | None, value) -> str:
    """Why a value cannot be used: 'Price is 'UNKNOWN'', or 'Steep minutes 'long' is not a score (...)'."""
    if value is None:
        return f"{field.column} is " + ("empty (no value)" if raw is None else repr(raw))
    bad = next(item for item in (value if isinstance(value, tuple) else (value,)) if not parses_as(field.type, item))
    return not_a(field.type, field.column, bad)


# ---- rendering


def shown(value, field: TableField) -> str:
    """A value as the text states it: list items joined ('A, B and C'), text as it is."""
    return join_items(value, field.join, field.last_join) if isinstance(value, tuple) else value


def render(parts: list[tuple[str, str | None]], row_values: dict, fields: dict[str, TableField]) -> str:
    """A parsed template with the row's values in it."""
    return "".join(literal + (shown(row_values[name], fields[name]) if name is not None else "") for literal, name in parts)


def answer_facts(parts: list[tuple[str, str | None]], row_values: dict, fields: dict[str, TableField],
                 asked: set[str]) -> list[dict]:
    """The {column, value} facts an answer states, in order: every field it names that the question does not give
    (one fact per list item)."""
    stated = dict.fromkeys(name for _, name in parts if name is not None and name not in asked)
    return [{"column": fields[name].column, "value": item} for name in stated
            for item in (row_values[name] if isinstance(row_values[name], tuple) else (row_values[name],))]
