"""Preference pairs from the synthesized rows themselves: pure functions over the FORMATTED rows SFT trained on.

Three kinds (data_contracts/pairs.py says what each column holds):
- fact_swap: chosen = a known title's grounded answer; rejected = that answer with one fact swapped for another
  row's value of the same column, or, for a number, perturbed (moved by a seeded step);
- made_up_title: chosen = the trained refusal of a made-up title; rejected = a confident answer in the catalog's
  style (a trained answer of the row the refusal was made for, its title replaced by the made-up one);
- false_refusal: chosen = a known title's answer; rejected = the catalog's refusal naming that known title.

Only trained questions (phrasing_set "train") of rows in the train split are used: held-out, natural and made-up
evaluation questions never become pairs. Which fact is swapped and which row lends its value is a seeded hash of the
row id, so pairs do not change when rows are re-ordered. A pair that cannot be made (no other value for a text
column) is returned with its reason, for the stage's quarantine.
"""

import hashlib
import random
import re

import pandas as pd

ANSWER_KINDS = ("overview", "production", "reception")  # anime_qa's answer kinds: known titles, grounded answers
REFUSAL_KIND, UNKNOWN_TITLE = "refusal", "unknown_title"  # anime_qa's refusal rows and their one fact
# The title is the subject of every anime_qa answer (loraflow.synthesizers.anime_answers): it ends where one of these
# sentence shapes begins.
SUBJECT_ENDS = (" was produced by ", " is rated ", " (English title: ", " (also known as ", " is an anime in the ")
_NUMBER = re.compile(r"^\d+(\.\d+)?$")


def seeded(seed: int, *parts: str) -> random.Random:
    """A generator that depends only on the seed and what it is for (a row id and a purpose), never on row order."""
    key = hashlib.blake2b("\x1f".join([str(seed), *parts]).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(key, "little"))


def trained_rows(formatted: pd.DataFrame, train_source_ids: set[str]) -> pd.DataFrame:
    """The rows SFT trained on: trained phrasings (not held-out / natural / made-up probes) of train-split source ids."""
    keep = (formatted["phrasing_set"] == "train") & formatted["source_id"].isin(train_source_ids)
    return formatted[keep].reset_index(drop=True)


def answer_subject(answer: str) -> str | None:
    """The title an answer is about (the text before its sentence shape), or None when no shape matches."""
    ends = [answer.find(end) for end in SUBJECT_ENDS if end in answer]
    return answer[:min(ends)] if ends else None


def titles_by_source(rows: pd.DataFrame) -> dict[str, str]:
    """source id -> the title its answers are about (from its first answer whose subject can be read)."""
    titles: dict[str, str] = {}
    for source_id, kind, answer in zip(rows["source_id"], rows["kind"], rows["reference"]):
        if kind in ANSWER_KINDS and source_id not in titles and (title := answer_subject(answer)):
            titles[source_id] = title
    return titles


def values_by_column(rows: pd.DataFrame) -> dict[str, dict[str, set[str]]]:
    """column -> value -> the source ids that state it: where a swapped-in value comes from."""
    values: dict[str, dict[str, set[str]]] = {}
    for source_id, kind, facts in zip(rows["source_id"], rows["kind"], rows["facts"]):
        if kind in ANSWER_KINDS:
            for fact in facts:
                values.setdefault(fact["column"], {}).setdefault(fact["value"], set()).add(source_id)
    return values


def perturbed_number(value: str, rng: random.Random) -> str:
    """A nearby number of the same shape: a count moved by 1..25 % (at least 1), a score by 0.05..1.00."""
    if "." in value:
        decimals = len(value.split(".")[1])
        step = rng.choice([-1, 1]) * rng.randint(5, 100) / 100
        return f"{max(0.0, float(value) + step):.{decimals}f}"
    count = int(value)
    step = rng.choice([-1, 1]) * rng.randint(1, max(1, count // 4))
    return str(count + step if count + step > 0 else count + abs(step))


def replace_value(answer: str, old: str, new: str) -> str:
    """`answer` with its first stand-alone `old` (not inside a longer word or number) replaced by `new`."""
    pattern = re.compile(rf"(?<![\w.]){re.escape(old)}(?![\w]|\.\d)")
    return pattern.sub(lambda _: new, answer, count=1)


def fact_swap_pairs(rows: pd.DataFrame, per_row: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(pairs, unmade): per known-title answer, `per_row` pairs whose rejected answer has one fact swapped."""
    column_values = values_by_column(rows)
    pairs, unmade = [], []
    for row in rows[rows["kind"].isin(ANSWER_KINDS)].itertuples():
        facts = [fact for fact in row.facts if fact["column"] != UNKNOWN_TITLE]
        rng = seeded(seed, row.id, "fact_swap")
        for number, fact in enumerate(rng.sample(facts, min(per_row, len(facts)))):
            own = [f["value"] for f in facts if f["column"] == fact["column"]]
            false_value, false_from = swapped_value(fact, own, column_values, row.source_id, rng)
            pair = {"id": f"{row.id}:fact_swap:{number}", "kind": "fact_swap", **provenance(row),
                    "chosen": row.reference, "swapped_column": fact["column"], "true_value": fact["value"],
                    "true_values": own}
            if false_value is None:
                unmade.append({**pair, "reason": f"no_alternative_value: no other row has a value of "
                                                 f"'{fact['column']}' to swap in, and it is not a number"})
                continue
            pairs.append({**pair, "rejected": replace_value(row.reference, fact["value"], false_value),
                          "false_value": false_value, "false_from": false_from})
    return pairs, unmade


def swapped_value(fact: dict, own: list[str], column_values: dict, source_id: str,
                  rng: random.Random) -> tuple[str | None, str]:
    """(value to state instead, where it came from): a number is perturbed half the time; otherwise another row's
    value of the same column that this row does not state; (None, '') when there is neither."""
    is_number = bool(_NUMBER.match(fact["value"]))
    others = sorted(value for value, sources in column_values.get(fact["column"], {}).items()
                    if value not in own and sources - {source_id})
    if is_number and (not others or rng.random() < 0.5):
        return perturbed_number(fact["value"], rng), "perturbed"
    if not others:
        return None, ""
    value = rng.choice(others)
    return value, sorted(column_values[fact["column"]][value] - {source_id})[0]


def made_up_title_pairs(rows: pd.DataFrame, per_row: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(pairs, unmade): per trained refusal, chosen = the refusal, rejected = a catalog answer about the made-up title."""
    titles = titles_by_source(rows)
    answers = rows[rows["kind"].isin(ANSWER_KINDS)]
    answers_of = {source_id: group for source_id, group in answers.groupby("source_id", sort=False)}
    pairs, unmade = [], []
    for row in rows[rows["kind"] == REFUSAL_KIND].itertuples():
        made_up = next((f["value"] for f in row.facts if f["column"] == UNKNOWN_TITLE), None)
        lenders = answers_of.get(row.source_id, answers)  # the row the refusal was made for, else any known row
        rng = seeded(seed, row.id, "made_up_title")
        for number in range(per_row):
            pair = {"id": f"{row.id}:made_up_title:{number}", "kind": "made_up_title", **provenance(row),
                    "chosen": row.reference, "swapped_column": "", "true_value": "", "true_values": None}
            lender = lenders.iloc[rng.randrange(len(lenders))] if len(lenders) else None
            title = titles.get(lender["source_id"]) if lender is not None else None
            if made_up is None or title is None:
                unmade.append({**pair, "reason": "no_catalog_answer: no made-up title fact, or no known answer whose "
                                                 "title can be read to lend its shape"})
                continue
            pairs.append({**pair, "rejected": lender["reference"].replace(title, made_up), "false_value": made_up,
                          "false_from": lender["source_id"]})
    return pairs, unmade


def false_refusal_pairs(rows: pd.DataFrame, per_row: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(pairs, unmade): per known-title answer, chosen = the answer, rejected = the catalog's refusal naming that title."""
    titles = titles_by_source(rows)
    refusals = [(row.reference, fact["value"]) for row in rows[rows["kind"] == REFUSAL_KIND].itertuples()
                for fact in row.facts if fact["column"] == UNKNOWN_TITLE]
    pairs, unmade = [], []
    for row in rows[rows["kind"].isin(ANSWER_KINDS)].itertuples():
        rng = seeded(seed, row.id, "false_refusal")
        for number in range(per_row):
            pair = {"id": f"{row.id}:false_refusal:{number}", "kind": "false_refusal", **provenance(row),
                    "chosen": row.reference, "swapped_column": "", "true_value": "", "true_values": None,
                    "false_from": "refusal"}
            title = titles.get(row.source_id)
            if not refusals or title is None:
                unmade.append({**pair, "reason": "no_refusal: the data has no trained refusal to copy, or the row's "
                                                 "title cannot be read from its answers"})
                continue
            refusal, made_up = refusals[rng.randrange(len(refusals))]
            pairs.append({**pair, "rejected": refusal.replace(made_up, title), "false_value": title})
    return pairs, unmade


def provenance(row) -> dict:
    """The pair's link to the row it was made from."""
    return {"row_id": row.id, "row_kind": row.kind, "source_id": row.source_id, "prompt": row.prompt}


BUILDERS = {"fact_swap": fact_swap_pairs, "made_up_title": made_up_title_pairs, "false_refusal": false_refusal_pairs}
PAIR_COLUMNS = ("id", "kind", "row_id", "row_kind", "source_id", "prompt", "chosen", "rejected", "swapped_column",
                "true_value", "false_value", "false_from", "true_values")


def build_pairs(rows: pd.DataFrame, kinds: list[str], per_row: int = 1, seed: int = 0) -> tuple[pd.DataFrame, list[dict]]:
    """(pairs in PAIRS' columns, unmade pairs with their reason) of the requested kinds, from trained rows."""
    made, unmade = [], []
    for kind in kinds:
        kind_pairs, kind_unmade = BUILDERS[kind](rows, per_row, seed)
        made += kind_pairs
        unmade += kind_unmade
    frame = pd.DataFrame(made, columns=list(PAIR_COLUMNS))
    return frame.astype({column: str for column in PAIR_COLUMNS if column != "true_values"}), unmade
