"""The train stage's data: the train rows as a dataset, and the batches Trainer draws from them.

    batches = plan_batches(model, train_rows, train_config, plan, pad_id, log=log)   # batches.plan: the completed plan

Without packing, examples are right-padded per batch (PadByPosition); with it, examples are packed into rows
whose documents only attend to themselves (loraflow.training.packing and .masking), and on the fast path the
rows per micro-batch come from the memory budget (loraflow.training.micro_batch.configure_fast_path).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from loraflow.config.train import TrainConfig
from loraflow.runtime.artifact_store import ArtifactRef, ArtifactStore
from loraflow.runtime.tokens_input import TRAIN_COLUMNS, open_tokens
from loraflow.training.checkpoints import identity_fingerprint, run_identity
from loraflow.training.continuation import RECORD_COLUMNS, ContinuationPlan, StartAdapter, continuation_rows
from loraflow.training.micro_batch import configure_fast_path
from loraflow.training.plan import TrainPlan

# = data_contracts.tokens.IGNORE_INDEX; not imported so the GPU machine needs no pandera.
IGNORE_INDEX = -100


@dataclass(frozen=True)
class TrainInputs:
    """The train rows of a TOKENS artifact (memory-mapped Arrow: input_ids, attention_mask, labels, length) and the
    run's identity (what a finished or resumed run must match)."""

    train_rows: pa.Table
    data_sha: str
    identity: dict
    fingerprint: str
    continuation: ContinuationPlan | None = None  # train.init_from=champion: what is trained, from which adapter

    @property
    def longest_example(self) -> int:
        return int(pc.max(self.train_rows.column("length")).as_py())

    @property
    def train_tokens(self) -> int:
        return int(pc.sum(self.train_rows.column("length")).as_py())


def read_train_inputs(tokens: ArtifactRef | pd.DataFrame, store: ArtifactStore | None, model_dir: Path,
                      config: TrainConfig, start: StartAdapter | None = None) -> TrainInputs:
    """The `split == "train"` rows of `tokens` (a ref or its DataFrame) and the identity of a run on them; refuses
    an artifact with no train rows. With `start` (train.init_from=champion): only the rows of records changed since
    the champion's data, plus train.replay_unchanged of the others (loraflow.training.continuation), and the
    champion's adapter hash in the identity."""
    train_rows, data_sha = open_tokens(tokens, store, split="train", columns=TRAIN_COLUMNS)
    if train_rows.num_rows == 0:
        raise ValueError(f"tokens artifact {data_sha[:12]}…: no rows with split='train'; nothing to train on")
    identity = run_identity(data_sha, model_dir, config)
    if start is None:
        return TrainInputs(train_rows, data_sha, identity, identity_fingerprint(identity))
    # The records' texts (small beside the token ids) say which rows changed since the champion's data.
    records = open_tokens(tokens, store, split="train", columns=RECORD_COLUMNS)[0].to_pandas()
    champion_records = open_tokens(start.tokens, store, split="train", columns=RECORD_COLUMNS)[0].to_pandas()
    keep, continuation = continuation_rows(records, champion_records, start, replay_share=config.replay_unchanged,
                                           seed=config.seed)
    identity = {**identity, "init_from": start.adapter_sha256}
    return TrainInputs(train_rows.filter(pa.array(keep)), data_sha, identity, identity_fingerprint(identity), continuation)


@dataclass
class BatchPlan:
    """What Trainer draws from: the dataset, its collator, and the TrainPlan with its micro-batch."""

    examples: object  # TokenizedExamples, or the packed rows
    collator: object  # PadByPosition or PackedCollator: both count tokens_seen
    plan: TrainPlan  # rows_per_micro_batch set; on the fast path its SpeedPlan too
    packing_stats: dict | None = None


def plan_batches(model, train_rows: pa.Table | pd.DataFrame, config: TrainConfig, plan: TrainPlan, pad_id: int, *, log) -> BatchPlan:
    """Padded batches, or packed rows whose documents only attend to themselves (after the model is built: the
    fast path configures the model for the rows it will see)."""
    examples = TokenizedExamples(train_rows)
    pack_stats = None
    on_cuda = plan.device == "cuda"
    if plan.packing:
        from loraflow.training import PackedCollator, enable_document_masking

        max_tokens = max(config.pack_max_tokens, int(examples.lengths.max()))
        examples = PackedRows(examples, max_tokens)
        pack_stats = examples.stats()
        log.info("train: packing %s", pack_stats)
        if plan.fast_path:
            plan = configure_fast_path(model, config, plan, max_tokens, len(examples), log)
        else:
            rows = config.pack_rows_per_micro_batch or config.micro_batch_size
            plan = plan.with_micro_batch(rows, "train.pack_rows_per_micro_batch" if config.pack_rows_per_micro_batch
                                         else "train.micro_batch_size", max_tokens)
            # The mask hook must see position_ids without an attention_mask: PackedCollator sends exactly that.
            enable_document_masking(model)
        # No 2-D attention_mask in these batches: transformers would then treat a row as one document.
        collator = PackedCollator(pad_token_id=pad_id, pad_to_multiple_of=128 if on_cuda else None)
    else:
        plan = plan.with_micro_batch(config.micro_batch_size, "train.micro_batch_size")
        collator = PadByPosition(pad_id, pad_to_multiple_of=8 if on_cuda else None)
    return BatchPlan(examples, collator, plan, pack_stats)


class TokenizedExamples:
    """The train rows as a map-style dataset of {input_ids, attention_mask, labels} (plain int lists), each made when
    it is drawn from the Arrow table (memory-mapped for an artifact); `lengths` is the length column in NumPy."""

    def __init__(self, rows: pa.Table | pd.DataFrame):
        if isinstance(rows, pd.DataFrame):
            rows = pa.Table.from_pandas(rows[TRAIN_COLUMNS], preserve_index=False)
        self.columns = {name: rows.column(name) for name in ("input_ids", "attention_mask", "labels")}
        self.lengths = rows.column("length").to_numpy().astype(np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> dict:
        return {name: column[int(index)].as_py() for name, column in self.columns.items()}

    def trained_counts(self) -> np.ndarray:
        """Per example, the labels other than -100 after the first (packing never trains a document's first token)."""
        parts = []
        for chunk in self.columns["labels"].chunks:
            values = chunk.flatten().to_numpy()
            parents = pc.list_parent_indices(chunk).to_numpy()
            first_trained = pc.not_equal(pc.list_element(chunk, 0), -100).to_numpy(zero_copy_only=False)
            parents_trained = np.bincount(parents[values != IGNORE_INDEX], minlength=len(chunk))
            parts.append(parents_trained - first_trained)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class PackedRows:
    """Examples packed into rows of at most `max_tokens` (first-fit decreasing over their lengths, the same rows as
    `pack_examples`), each row assembled when it is drawn; the assignment is two NumPy arrays."""

    def __init__(self, examples: TokenizedExamples, max_tokens: int):
        from loraflow.training.packing import first_fit_bins

        if len(examples) and int(examples.lengths.max()) > max_tokens:
            raise ValueError(f"an example has {int(examples.lengths.max())} tokens, more than max_tokens={max_tokens}")
        self.examples, self.max_tokens = examples, max_tokens
        self.members, self.starts = first_fit_bins(examples.lengths, max_tokens)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, index: int) -> dict:
        from loraflow.training.packing import packed_row

        members = self.members[self.starts[index]:self.starts[index + 1]]
        return packed_row([self.examples[i] for i in members], members)

    def stats(self) -> dict:
        """What `packing_stats` says of these rows, from the lengths and labels (no row is assembled)."""
        tokens = int(self.examples.lengths.sum())
        return {"rows": len(self), "documents": len(self.examples), "tokens": tokens,
                "trained_tokens": int(self.examples.trained_counts().sum()),
                "fill": tokens / (len(self) * self.max_tokens) if len(self) else 0.0}


class PadByPosition:
    """Right-pads a batch; padding positions get attention 0 and label -100 by *position*.

    The pad id often equals EOS (SmolLM2: both `<|im_end|>`), so masking labels by pad id would also mask
    the EOS the model must learn to emit. transformers' DataCollatorForSeq2Seq pads labels by position too,
    but routes input ids through tokenizer.pad; here only the pad id is needed. Counts real tokens seen so
    the progress bar can show tokens/s.
    """

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None):
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.tokens_seen = 0

    def __call__(self, features: list[dict]) -> dict:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(features), longest), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(features), longest), dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            input_ids[row, :n] = torch.tensor(feature["input_ids"])
            attention_mask[row, :n] = torch.tensor(feature["attention_mask"])
            labels[row, :n] = torch.tensor(feature["labels"])
        self.tokens_seen += int(attention_mask.sum())
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
