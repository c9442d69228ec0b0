"""Tokenize: formatted text -> token ids, labels from trained character spans, split, dedupe, leakage check.

Whole texts are tokenized in one batch (`encode_batch` of the fast tokenizer, add_special_tokens=False: the
template already wrote any BOS as text). Labels come from the formatted segments' character spans mapped to
tokens (`char_to_token`), never from tokenizing prompt and answer separately and never from the pad id (pad
may equal EOS, and the EOS after each answer must be trained). A token that holds any trained character is
trained (BPE merges the space before an answer into its first word).

Control-token text that came from the data (the formatted `literal_spans`, e.g. `<|im_end|>` inside an answer)
is encoded as plain characters with the tokenizer's own `encode_special_tokens` (split_special_tokens); only the
control tokens the template wrote stay control tokens. Such rows are counted (`control_text_rows`).

Order: tokenize -> length policy -> split -> exact-duplicate removal -> leakage check -> contract.
"""

import hashlib
from itertools import chain

import numpy as np
import pandas as pd

from data_contracts import FORMATTED, TOKENS
from data_contracts.base import quarantine_rows
from data_contracts.tokens import IGNORE_INDEX
from loraflow.config.tokenize import TokenizeConfig
from loraflow.runtime.stage_output import StageResult, read_input_batches
from loraflow.runtime.artifact_store import ArtifactRef, ArtifactStore
from loraflow.runtime.parquet_stream import ROW_GROUP_ROWS
from loraflow.runtime.cache_keys import TOKENIZER_STAGE_CACHE
from loraflow.runtime.stage_task import stage_task
from tasks.format import load_tokenizer_dir
from tasks.tokenize_encode import (control_token_pattern, encode_with_literals, encoded_ahead, encoded_texts,
                                   unrepresentable_bytes)
from tasks.tokenize_checks import TruncationError, set_aside_duplicates_and_leaks, split_off_quarantine, withheld_stats
from tasks.tokenize_partitions import run_tokenize_merge, tokenize_merge_task  # noqa: F401  the sharded path's merge
from tasks.tokenize_stream import tokenize_shard_stream, tokenize_stream

ENCODE_BATCH_ROWS = 2048  # formatted rows tokenized at a time (run_tokenize)
# The formatted columns tokenize reads (not `messages`, the conversation kept for pre-flight: the widest column).
FORMATTED_READ = ["id", "segments", "prompt", "reference", "template", "kind", "source_id", "phrasing_set", "facts",
                  "literal_spans"]
EVALUATION_ONLY = ("heldout", "natural", "unknown")  # phrasing sets never trained (data_contracts.conversations)


def split_of(source_id: str, phrasing_set: str, salt: str, validation_fraction: float) -> str:
    """heldout phrasings -> heldout; else a salted hash of the source id decides, so all questions of one
    source row land on the same side and a row keeps its side when data is added."""
    if phrasing_set in EVALUATION_ONLY:
        return "heldout"
    digest = hashlib.sha256(f"{salt}:{source_id}".encode()).digest()
    return "validation" if int.from_bytes(digest[:8], "big") / 2**64 < validation_fraction else "train"


def trained_token_ranges(encoding, spans) -> list[tuple[int, int]]:
    """Token index ranges [first, last] holding the trained characters of each span."""
    ranges = []
    for start, end in spans:
        first, last = encoding.char_to_token(start), encoding.char_to_token(end - 1)
        if first is None or last is None:  # a character no token covers (normalizer dropped it): scan offsets
            covered = [i for i, (a, b) in enumerate(encoding.offsets) if a < end and b > start]
            if not covered:
                continue
            first, last = covered[0], covered[-1]
        ranges.append((first, last))
    return ranges


def tokenize_formatted(formatted: pd.DataFrame, config: TokenizeConfig, tokenizer) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Tokenize, label, split, dedupe and leakage-check; returns (tokens rows, quarantined rows, stats)."""
    tokens, reasons, stats = tokenize_rows(formatted, config, tokenizer)
    stats.update(set_aside_duplicates_and_leaks(tokens, reasons, config, tokenizer))
    kept, quarantined = split_off_quarantine(tokens, reasons)
    return kept, quarantined, {**stats, **token_stats(kept)}


def tokenize_rows(formatted: pd.DataFrame, config: TokenizeConfig, tokenizer, encoded: tuple | None = None) \
        -> tuple[pd.DataFrame, np.ndarray, dict]:
    """The per-row half of tokenize (ids, labels, double BOS, length policy, split): (every row, reasons, stats).

    `reasons[i]` says why row i is set aside (None = kept). Nothing here looks at other rows, so shards of the
    formatted rows can be tokenized apart and concatenated (flows/prepare.py, prepare.shards > 1). `encoded` is the
    rows' `encoded_texts` when already made (`encoded_ahead`).
    """
    formatted = formatted.reset_index(drop=True)
    texts, spans, encodings = encoded if encoded is not None else encoded_texts(formatted, tokenizer)
    literal_rows = [row for row, literal in enumerate(formatted.get("literal_spans", [])) if len(literal)]
    if literal_rows:
        pattern = control_token_pattern(tokenizer)
        for row in literal_rows:
            encodings[row] = encode_with_literals(texts[row], formatted.at[row, "literal_spans"], tokenizer, pattern)

    # ---- flat arrays: one int32 array of all ids, row boundaries in `starts`
    lengths = np.fromiter(map(len, encodings), dtype=np.int64, count=len(encodings))
    starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    flat_ids = np.fromiter(chain.from_iterable(encoding.ids for encoding in encodings), dtype=np.int32, count=int(starts[-1]))

    # ---- labels: mark trained token ranges with a difference array, one cumsum for all rows
    flat_labels, answer_starts, answer_ends = flat_labels_of(encodings, spans, flat_ids, starts, config.train_on_inputs)
    del encodings

    stats: dict = {"rows_in": len(formatted), "control_text_rows": len(literal_rows)}
    reasons = np.full(len(formatted), None, dtype=object)  # why a row is set aside; None = kept

    # ---- characters the vocabulary cannot spell would be trained as other tokens: set the rows aside
    missing = unrepresentable_bytes(tokenizer)
    if missing:
        stats["unrepresentable"] = mark_unrepresentable(texts, missing, reasons)

    # ---- double BOS: a template that wrote BOS text and also got one added
    bos_id = tokenizer.bos_token_id
    if bos_id is not None:
        first_two = (lengths >= 2) & (flat_ids[np.minimum(starts[:-1], len(flat_ids) - 1)] == bos_id) & \
            (flat_ids[np.minimum(starts[:-1] + 1, len(flat_ids) - 1)] == bos_id)
        reasons[first_two] = "double_bos: the example starts with two BOS tokens; the template writes BOS and something added another"
        stats["double_bos"] = int(first_two.sum())

    # ---- length policy
    kept_lengths, truncated = apply_length_policy(lengths, formatted["id"], answer_ends, config, reasons, stats)

    # ---- per-row views into the flat arrays
    row_starts = starts[:-1]
    input_ids = [flat_ids[s:s + n] for s, n in zip(row_starts, kept_lengths)]
    labels = [flat_labels[s:s + n] for s, n in zip(row_starts, kept_lengths)]
    ones = np.ones(int(kept_lengths.max()) if len(kept_lengths) else 0, dtype=np.int8)
    attention_mask = [ones[:n] for n in kept_lengths]
    trained_cumsum = np.concatenate([[0], np.cumsum(flat_labels != IGNORE_INDEX)])
    n_trained = trained_cumsum[row_starts + kept_lengths] - trained_cumsum[row_starts]

    splits = split_column(formatted, config)  # by source id

    tokens = pd.DataFrame({
        "id": formatted["id"].to_numpy(),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "length": kept_lengths.astype(np.int64),
        "n_trained": n_trained.astype(np.int64),
        "truncated": truncated,
        "split": splits,
        "answer_start": answer_starts,
        "answer_ends": answer_ends,
        "kind": formatted["kind"].to_numpy(),
        "source_id": formatted["source_id"].to_numpy(),
        "phrasing_set": formatted["phrasing_set"].to_numpy(),
        "template": formatted["template"].to_numpy(),
        "prompt": formatted["prompt"].to_numpy(),
        "reference": formatted["reference"].to_numpy(),
        "facts": formatted["facts"].to_numpy(),
    })
    return tokens, reasons, stats


def apply_length_policy(lengths: np.ndarray, ids: pd.Series, answer_ends: list, config: TokenizeConfig,
                        reasons: np.ndarray, stats: dict) -> tuple[np.ndarray, np.ndarray]:
    """tokenize.truncation over rows longer than max_length: refuse (error), set aside (drop) or cut (truncate, the
    answer ends past the cut removed in place); returns (kept lengths, truncated mask) and counts into `stats`."""
    too_long = lengths > config.max_length
    stats["over_max_length"] = int(too_long.sum())
    kept_lengths = lengths.copy()
    truncated = np.zeros(len(lengths), dtype=bool)
    cut_short = 0
    if too_long.any():
        if config.truncation == "error":
            raise TruncationError(int(too_long.sum()), int(lengths.max()), ids[too_long].head(5).tolist(),
                                  config.max_length)
        if config.truncation == "drop":
            reasons[too_long & pd.isna(reasons)] = f"too_long: more than max_length={config.max_length} tokens (truncation=drop)"
        else:
            kept_lengths = np.minimum(lengths, config.max_length)
            truncated = too_long
            for row in np.flatnonzero(too_long):
                cut = [end for end in answer_ends[row] if end >= config.max_length]
                cut_short += bool(cut)
                answer_ends[row] = [end for end in answer_ends[row] if end < config.max_length]
    stats.update({"truncated": int(truncated.sum()), "answers_cut_short": int(cut_short),
                  "dropped_too_long": int(too_long.sum()) if config.truncation == "drop" else 0})
    return kept_lengths, truncated


def flat_labels_of(encodings, spans, flat_ids: np.ndarray, starts: np.ndarray, train_on_inputs: bool):
    """(labels over the flat ids, each row's last answer start, each row's answer end positions): trained token
    ranges from the character spans, marked with a difference array and one cumsum for all rows."""
    delta = np.zeros(len(flat_ids) + 1, dtype=np.int32)
    answer_ends, answer_starts = [], np.zeros(len(starts) - 1, dtype=np.int64)
    for row, (encoding, row_spans) in enumerate(zip(encodings, spans)):
        ranges = trained_token_ranges(encoding, row_spans)
        base = starts[row]
        for first, last in ranges:
            delta[base + first] += 1
            delta[base + last + 1] -= 1
        answer_ends.append([last for _, last in ranges])
        answer_starts[row] = ranges[-1][0] if ranges else 0
    trained = np.cumsum(delta[:-1]) > 0
    if train_on_inputs:
        trained[:] = True
    return np.where(trained, flat_ids, IGNORE_INDEX).astype(np.int32), answer_starts, answer_ends

def mark_unrepresentable(texts: list[str], missing: set[int], reasons: np.ndarray) -> int:
    """Set the reason of every text holding a byte the vocabulary cannot spell; returns how many were marked."""
    keep_missing_only = bytes(set(range(256)) - missing)
    marked = 0
    for row, text in enumerate(texts):
        found = text.encode("utf-8", "surrogatepass").translate(None, keep_missing_only)
        if found:
            reasons[row] = (f"unrepresentable: the tokenizer has no token for byte(s) {sorted(set(found))} (e.g. "
                            f"character {next(c for c in text if set(c.encode('utf-8', 'surrogatepass')) & missing)!r}); "
                            "remove or replace those characters")
            marked += 1
    return marked

def split_column(formatted: pd.DataFrame, config: TokenizeConfig) -> np.ndarray:
    """Each row's split (train / validation) by its source id and phrasing set, one hash per distinct pair."""
    split_cache: dict[tuple[str, str], str] = {}
    splits = []
    for source_id, phrasing_set in zip(formatted["source_id"], formatted["phrasing_set"]):
        key = (source_id, phrasing_set)
        if key not in split_cache:
            split_cache[key] = split_of(source_id, phrasing_set, config.split_salt, config.rows_held_out())
        splits.append(split_cache[key])
    return np.asarray(splits, dtype=object)


def token_stats(tokens: pd.DataFrame) -> dict:
    """Totals, per-split counts and the length distribution of the kept rows."""
    lengths = tokens["length"].to_numpy()
    percentiles = np.percentile(lengths, [50, 90, 99]).round(1).tolist() if len(lengths) else [0, 0, 0]
    return {
        "tokens_total": int(lengths.sum()),
        "trained_tokens": int(tokens["n_trained"].sum()),
        "splits": {split: int((tokens["split"] == split).sum()) for split in ("train", "validation", "heldout")},
        "length": {"p50": percentiles[0], "p90": percentiles[1], "p99": percentiles[2], "max": int(lengths.max()) if len(lengths) else 0},
        **withheld_stats(set(tokens.loc[tokens["split"] == "validation", "source_id"])),
    }


def run_tokenize(formatted_ref: ArtifactRef, config: TokenizeConfig, tokenizer_dir: str, store: ArtifactStore,
                 batch_rows: int = ROW_GROUP_ROWS) -> StageResult:
    """Read formatted rows, tokenize them, write the TOKENS artifact (and quarantine), a batch at a time
    (tasks/tokenize_stream.py): memory is bounded by `batch_rows`, not by the table."""
    from loraflow.config.pipeline import config_hash

    tokenizer = load_tokenizer_dir(str(tokenizer_dir))
    # The tokenizer's Encodings are its peak (about 12 KB an example): rows are read and checked a row group at a time
    # but encoded ENCODE_BATCH_ROWS at a time (two such slices alive: one labelled, the next being encoded).
    formatted = read_input_batches(store, formatted_ref, FORMATTED, batch_rows, formatted_columns(store, formatted_ref))
    return tokenize_stream(
        store, encoded_ahead(formatted, tokenizer, ENCODE_BATCH_ROWS),
        lambda rows, encoded: tokenize_rows(rows, config, tokenizer, encoded), config, tokenizer, config_hash(config), batch_rows,
    )


def formatted_columns(store: ArtifactStore, formatted_ref: ArtifactRef) -> list[str]:
    """FORMATTED_READ, less optional columns the artifact lacks."""
    present = set(store.schema(formatted_ref).names)
    return [name for name in FORMATTED_READ if name in present or FORMATTED.columns[name].required]


@stage_task(name="tokenize", cache_policy=TOKENIZER_STAGE_CACHE)
def tokenize_task(formatted_ref: ArtifactRef, config: TokenizeConfig, tokenizer_dir: str, tokenizer_fingerprint: str,
                  store_root: str) -> StageResult:
    """Prefect task around `run_tokenize`; `tokenizer_fingerprint` puts the tokenizer into the cache key."""
    return run_tokenize(formatted_ref, config, tokenizer_dir, ArtifactStore(store_root))


# ---- the sharded path (prepare.shards > 1): the per-row half per shard, the dataset-level half once


def run_tokenize_shard(formatted_ref: ArtifactRef, config: TokenizeConfig, tokenizer_dir: str, store: ArtifactStore,
                       batch_rows: int = ROW_GROUP_ROWS) -> StageResult:
    """One shard's formatted rows -> its TOKENS artifact, before duplicates and leakage are looked for; streamed a batch
    at a time as `run_tokenize` (a worker holds a batch, not the shard)."""
    from loraflow.config.pipeline import config_hash

    tokenizer = load_tokenizer_dir(str(tokenizer_dir))
    formatted = read_input_batches(store, formatted_ref, FORMATTED, batch_rows, formatted_columns(store, formatted_ref))
    return tokenize_shard_stream(
        store, encoded_ahead(formatted, tokenizer, ENCODE_BATCH_ROWS),
        lambda rows, encoded: tokenize_rows(rows, config, tokenizer, encoded), config_hash(config), batch_rows,
    )


@stage_task(name="tokenize-shard", cache_policy=TOKENIZER_STAGE_CACHE)
def tokenize_shard_task(formatted_ref: ArtifactRef, config: TokenizeConfig, tokenizer_dir: str, tokenizer_fingerprint: str,
                        store_root: str) -> StageResult:
    """Prefect task around `run_tokenize_shard`, mapped over the shards."""
    return run_tokenize_shard(formatted_ref, config, tokenizer_dir, ArtifactStore(store_root))
