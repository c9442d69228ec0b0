"""Tokenize's dataset-level half: exact duplicates and leaked evaluation prompts, found over 16-byte digests.

Each row is reduced to a few fixed-size keys (`RowKeys`: its split's rank, a digest of its input_ids, a digest of its
prompt, whether it is still alive and whether its prompt could leak), so a table of millions of examples is checked
in a few NumPy sorts over tens of MB instead of a dict of Python objects, and a stage can gather the keys batch by
batch while it streams the rows themselves to disk.

The rules are the ones tokenize always had: of rows with the same input_ids, the copy in an evaluation split wins
(heldout, then validation, then train), then the first in source order; an evaluation row whose prompt is also a
training row's prompt is a leak (empty prompts and a bare BOS prompt, kind=text, never count).
"""

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from data_contracts.base import quarantine_rows

SPLIT_RANK = {"heldout": 0, "validation": 1, "train": 2}  # which copy of a duplicate is kept: evaluation first
DUPLICATE = "duplicate: same input_ids as example {kept!r}"
LEAKAGE = "leakage: this evaluation example's prompt is also a training prompt"
WITHHELD_NAMED = 100  # source ids the stats name when tokenize.validation_fraction withholds rows (the count is whole)


def withheld_stats(withheld: set[str]) -> dict:
    """The source rows held out whole for validation (never trained): their count and the first WITHHELD_NAMED ids."""
    return {"withheld_rows": len(withheld), "withheld_source_ids": sorted(withheld)[:WITHHELD_NAMED]}


class TruncationError(ValueError):
    """tokenize.truncation=error and some examples are longer than tokenize.max_length."""

    def __init__(self, count: int, longest: int, examples: list[str], max_length: int):
        super().__init__(
            f"{count} example(s) exceed tokenize.max_length={max_length} (longest {longest} tokens; e.g. ids {examples}): "
            "raise max_length, or set truncation to drop or truncate"
        )
        self.count, self.longest, self.examples, self.max_length = count, longest, examples, max_length


    @classmethod
    def combined(cls, errors: list["TruncationError"]) -> "TruncationError":
        """One error for the over-long examples of every batch."""
        return cls(sum(e.count for e in errors), max(e.longest for e in errors), [i for e in errors for i in e.examples][:5],
                   errors[0].max_length)


@dataclass
class RowKeys:
    """Per row, what the dataset-level checks need (16-byte digests, no Python objects)."""

    rank: np.ndarray  # int8, SPLIT_RANK of the row's split
    ids_digest: np.ndarray  # S16, blake2b of the input_ids (int32 bytes)
    prompt_digest: np.ndarray  # S16, blake2b of the prompt text
    may_leak: np.ndarray  # bool: not train, prompt not blank and not a bare BOS
    alive: np.ndarray  # bool: not set aside by the per-row half

    @classmethod
    def concat(cls, parts: list["RowKeys"]) -> "RowKeys":
        """The keys of consecutive batches as one."""
        return cls(*(np.concatenate([getattr(part, name) for part in parts]) if parts else np.zeros(0)
                     for name in ("rank", "ids_digest", "prompt_digest", "may_leak", "alive")))


def row_keys(tokens: pd.DataFrame, reasons: np.ndarray, tokenizer) -> RowKeys:
    """The RowKeys of a batch of tokens rows (`reasons[i]` not None: row i is already set aside)."""
    splits = tokens["split"].to_numpy()
    prompts = tokens["prompt"].tolist()
    bos = tokenizer.bos_token if tokenizer.bos_token_id is not None and tokenizer.bos_token else None
    ids_digest = np.fromiter((hashlib.blake2b(np.asarray(ids, dtype=np.int32).tobytes(), digest_size=16).digest()
                              for ids in tokens["input_ids"]), dtype="S16", count=len(tokens))
    prompt_digest = np.fromiter((hashlib.blake2b(p.encode("utf-8", "surrogatepass"), digest_size=16).digest() for p in prompts),
                                dtype="S16", count=len(tokens))
    return RowKeys(
        rank=np.fromiter((SPLIT_RANK[s] for s in splits), dtype=np.int8, count=len(splits)),
        ids_digest=ids_digest, prompt_digest=prompt_digest,
        may_leak=np.array([s != "train" and p.strip() != "" and p != bos for s, p in zip(splits, prompts)], dtype=bool),
        alive=np.asarray(pd.isna(reasons), dtype=bool),
    )


def find_duplicates(keys: RowKeys) -> tuple[np.ndarray, np.ndarray]:
    """(duplicate rows, the row kept in each one's place): among alive rows with equal input_ids, the lowest split
    rank wins, then the first row."""
    alive = np.flatnonzero(keys.alive)
    order = alive[np.lexsort((alive, keys.rank[alive], keys.ids_digest[alive]))]
    digests = keys.ids_digest[order]
    first_of_group = np.ones(len(order), dtype=bool)
    first_of_group[1:] = digests[1:] != digests[:-1]
    group_start = np.maximum.accumulate(np.where(first_of_group, np.arange(len(order)), 0))
    duplicates = ~first_of_group
    return order[duplicates], order[group_start[duplicates]]


def find_leaks(keys: RowKeys, alive: np.ndarray) -> np.ndarray:
    """Rows (bool) whose evaluation prompt is also the prompt of an alive train row."""
    train_prompts = keys.prompt_digest[alive & (keys.rank == SPLIT_RANK["train"])]
    return alive & keys.may_leak & np.isin(keys.prompt_digest, train_prompts)


def set_aside_duplicates_and_leaks(tokens: pd.DataFrame, reasons: np.ndarray, config, tokenizer) -> dict:
    """Mark exact duplicates (when config.dedupe) and leaked evaluation prompts in `reasons`, for rows in source order."""
    keys = row_keys(tokens, reasons, tokenizer)
    duplicates, kept = find_duplicates(keys) if config.dedupe else (np.zeros(0, dtype=np.int64),) * 2
    ids_column = tokens["id"].to_numpy()
    for row, kept_row in zip(duplicates.tolist(), kept.tolist()):
        reasons[row] = DUPLICATE.format(kept=ids_column[kept_row])
    keys.alive[duplicates] = False
    leaked = find_leaks(keys, keys.alive)
    reasons[leaked] = LEAKAGE
    return {"duplicates": int(len(duplicates)), "leaked": int(leaked.sum())}


def split_off_quarantine(tokens: pd.DataFrame, reasons: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(kept rows, quarantined rows with their reasons)."""
    bad = ~pd.isna(reasons)
    quarantined = quarantine_rows(tokens[bad], pd.Series(reasons[bad], index=np.flatnonzero(bad)), "tokens")
    return tokens[~bad].reset_index(drop=True), quarantined
