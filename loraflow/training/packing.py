"""Padding-free packing of tokenized examples into rows, and the collator that batches those rows.

A packed row holds several whole examples ("documents") back to back. Three things keep the documents apart:
position ids restart at 0 at every document start (RoPE sees each document as if alone), the label of each
document's first token is -100 (it would otherwise be predicted from the previous document's last token), and
the attention mask built from the position ids (see `loraflow.training.masking`) lets a token attend only to
earlier tokens of its own document. With all three, a packed row's loss and logits equal running each document
alone, which tests/test_packing.py checks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100


class _FirstFitTree:
    """Bins with remaining capacities; finds the lowest-index bin with room >= need in O(log bins).

    A max segment tree over bin capacities: first-fit-decreasing in O(n log n) instead of the naive
    O(n * bins) scan, which takes minutes for 100k examples in pure Python.
    """

    def __init__(self, max_bins: int):
        size = 1
        while size < max(max_bins, 1):
            size *= 2
        self.size = size
        self.tree = [-1] * (2 * size)  # -1: bin does not exist yet
        self.bins = 0

    def _set(self, index: int, value: int) -> None:
        node = index + self.size
        self.tree[node] = value
        node //= 2
        while node:
            self.tree[node] = max(self.tree[2 * node], self.tree[2 * node + 1])
            node //= 2

    def first_fit(self, need: int) -> int | None:
        if self.tree[1] < need:
            return None
        node = 1
        while node < self.size:
            node = 2 * node if self.tree[2 * node] >= need else 2 * node + 1
        return node - self.size

    def open_bin(self, capacity: int) -> int:
        index = self.bins
        self.bins += 1
        self._set(index, capacity)
        return index

    def take(self, index: int, amount: int) -> None:
        self._set(index, self.tree[index + self.size] - amount)


def pack_examples(examples: Sequence[Mapping], max_tokens: int) -> list[dict]:
    """Pack tokenized examples into rows of at most `max_tokens` tokens (first-fit decreasing, no padding).

    Args:
        examples: each a mapping with `input_ids` and `labels` (equal-length int sequences; -100 marks tokens
            that are not trained, e.g. the prompt). Other keys are ignored.
        max_tokens: the longest row. Every example must fit; longer ones raise (truncate them when tokenizing).

    Returns:
        Rows, each a dict with
          - `input_ids`, `labels`, `position_ids`: lists of equal length (≤ max_tokens). Position ids restart at
            0 per document; each document's first label is -100 so no document is predicted from another.
          - `seq_lens`: the document lengths in row order; `cu_seqlens`: their cumulative sums starting at 0.
          - `example_indices`: which input examples the row holds, in row order (every example lands in exactly
            one row; nothing is dropped).
        Rows come out fullest-first-created order; the result is deterministic for a given input.
    """
    if max_tokens < 1:
        raise ValueError(f"pack_examples: max_tokens must be >= 1, got {max_tokens}")
    lengths = []
    for index, example in enumerate(examples):
        input_ids, labels = example["input_ids"], example["labels"]
        if len(input_ids) != len(labels):
            raise ValueError(
                f"pack_examples: example {index} has {len(input_ids)} input_ids but {len(labels)} labels; "
                "they must have equal length"
            )
        if len(input_ids) == 0:
            raise ValueError(f"pack_examples: example {index} is empty; drop or quarantine empty examples first")
        if len(input_ids) > max_tokens:
            raise ValueError(
                f"pack_examples: example {index} has {len(input_ids)} tokens, more than max_tokens={max_tokens}; "
                "truncate it when tokenizing or raise max_tokens"
            )
        lengths.append(len(input_ids))

    members, starts = first_fit_bins(lengths, max_tokens)
    return [packed_row([examples[index] for index in members[a:b]], members[a:b]) for a, b in zip(starts[:-1], starts[1:])]


def first_fit_bins(lengths, max_tokens: int, chunk: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """First-fit decreasing over example lengths (each in 1..max_tokens): (members, starts), row r holding examples
    members[starts[r]:starts[r + 1]] in the order they went in, rows in the order they were opened. Longest first,
    ties in input order, so the packing is deterministic; NumPy arrays, not Python lists, hold the assignment."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    # First fit leaves at most one row half full or less, so rows <= 2 * tokens / max_tokens + 1.
    tree = _FirstFitTree(min(len(lengths), 2 * int(lengths.sum()) // max_tokens + 2))
    row_of = np.empty(len(lengths), dtype=np.int64)  # the row of the k-th example placed
    for first in range(0, len(order), chunk):
        targets = []
        for need in lengths[order[first:first + chunk]].tolist():
            target = tree.first_fit(need)
            if target is None:
                target = tree.open_bin(max_tokens)
            tree.take(target, need)
            targets.append(target)
        row_of[first:first + len(targets)] = targets
    members = order[np.argsort(row_of, kind="stable")]
    starts = np.concatenate([[0], np.cumsum(np.bincount(row_of, minlength=tree.bins))])
    return members, starts


def packed_row(documents: Sequence[Mapping], members: Sequence[int]) -> dict:
    """One packed row from its documents (each with `input_ids` and `labels`), in row order: position ids restart
    per document, each document's first label is -100 (see `pack_examples` for the keys)."""
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    seq_lens: list[int] = []
    for example in documents:
        doc_labels = [int(t) for t in example["labels"]]
        doc_labels[0] = IGNORE_INDEX
        input_ids.extend(int(t) for t in example["input_ids"])
        labels.extend(doc_labels)
        position_ids.extend(range(len(doc_labels)))
        seq_lens.append(len(doc_labels))
    cu_seqlens = [0]
    for n in seq_lens:
        cu_seqlens.append(cu_seqlens[-1] + n)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "seq_lens": seq_lens,
            "cu_seqlens": cu_seqlens, "example_indices": [int(i) for i in members]}


def packing_stats(rows: Sequence[Mapping], max_tokens: int) -> dict:
    """Counts for logs and stage stats: rows, documents, tokens, trained tokens, fill of the rows."""
    tokens = sum(len(r["input_ids"]) for r in rows)
    return {
        "rows": len(rows),
        "documents": sum(len(r["seq_lens"]) for r in rows),
        "tokens": tokens,
        "trained_tokens": sum(sum(1 for t in r["labels"] if t != IGNORE_INDEX) for r in rows),
        "fill": tokens / (len(rows) * max_tokens) if rows else 0.0,
    }


@dataclass
class PackedCollator:
    """Batches packed rows (from `pack_examples`) for a causal LM; usable as a transformers Trainer collator.

    Output keys: `input_ids`, `labels`, `position_ids` (all int64, shape [rows, T]); no `attention_mask`. The
    model builds the per-document causal mask from the restarting position ids: call
    `configure_model_for_speed` (or `enable_document_masking`) on it first. Do NOT add a 2-D attention_mask of
    ones: transformers would then treat the row as one long document.

    Rows shorter than T are padded at the end with `pad_token_id`; the padding forms its own "document"
    (positions restart at 0) with labels -100, so it neither trains nor is seen by real tokens.

    Args:
        pad_token_id: token id used for the tail padding.
        pad_to_multiple_of: round T up to a multiple of this (128 suits flex attention's block size).
        flatten: put the whole batch in one row of length sum(row lengths) (no padding at all; documents stay
            apart the same way). Useful for variable micro-batches by token count.

    Plain (unpacked) examples — dicts with `input_ids` and `labels` but no `position_ids` — are accepted too:
    each becomes its own document (first label set to -100).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = 128
    flatten: bool = False
    tokens_seen: int = 0  # non-padding tokens batched so far (for tokens/s)
    trained_tokens_seen: int = 0  # tokens with a label (what the loss trains on)

    def __call__(self, rows: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("PackedCollator: got an empty batch")
        rows = [self._as_row(r) for r in rows]
        if self.flatten:
            rows = [
                {
                    "input_ids": [t for r in rows for t in r["input_ids"]],
                    "labels": [t for r in rows for t in r["labels"]],
                    "position_ids": [t for r in rows for t in r["position_ids"]],
                }
            ]
        width = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.as_tensor(row["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.as_tensor(row["labels"], dtype=torch.long)
            position_ids[i, :n] = torch.as_tensor(row["position_ids"], dtype=torch.long)
            position_ids[i, n:] = torch.arange(width - n)  # the padding: one more document, never trained
            self.tokens_seen += n
        self.trained_tokens_seen += int(labels.ne(IGNORE_INDEX).sum())
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}

    @staticmethod
    def _as_row(example: Mapping) -> Mapping:
        if "position_ids" in example:
            return example
        labels = [int(t) for t in example["labels"]]
        if labels:
            labels[0] = IGNORE_INDEX
        return {
            "input_ids": list(example["input_ids"]),
            "labels": labels,
            "position_ids": list(range(len(example["input_ids"]))),
        }
