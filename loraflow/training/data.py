"""The train stage's data: the train rows as a dataset, and the batches Trainer draws from them.

    batches = plan_batches(model, train_rows, train_config, plan, pad_id, log=log)   # batches.plan: the completed plan

Without packing, examples are right-padded per batch (PadByPosition); with it, examples are packed into rows
whose documents only attend to themselves (loraflow.training.packing and .masking), and on the fast path the
rows per micro-batch come from the memory budget (loraflow.training.micro_batch.configure_fast_path).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from loraflow.config.train import TrainConfig
from loraflow.runtime.artifact_store import ArtifactRef, ArtifactStore
from loraflow.runtime.tokens_input import load_tokens
from loraflow.training.checkpoints import identity_fingerprint, run_identity
from loraflow.training.micro_batch import configure_fast_path
from loraflow.training.plan import TrainPlan

# = data_contracts.tokens.IGNORE_INDEX; not imported so the GPU machine needs no pandera.
IGNORE_INDEX = -100


@dataclass(frozen=True)
class TrainInputs:
    """The train rows of a TOKENS artifact and the run's identity (what a finished or resumed run must match)."""

    train_rows: pd.DataFrame
    data_sha: str
    identity: dict
    fingerprint: str

    @property
    def longest_example(self) -> int:
        return int(self.train_rows["length"].max())


def read_train_inputs(tokens: ArtifactRef | pd.DataFrame, store: ArtifactStore | None, model_dir: Path,
                      config: TrainConfig) -> TrainInputs:
    """The `split == "train"` rows of `tokens` (a ref or its DataFrame) and the identity of a run on them; refuses
    an artifact with no train rows."""
    frame, data_sha = load_tokens(tokens, store)
    train_rows = frame[frame["split"] == "train"]
    if train_rows.empty:
        raise ValueError(f"tokens artifact {data_sha[:12]}…: no rows with split='train'; nothing to train on")
    identity = run_identity(data_sha, model_dir, config)
    return TrainInputs(train_rows, data_sha, identity, identity_fingerprint(identity))


@dataclass
class BatchPlan:
    """What Trainer draws from: the dataset, its collator, and the TrainPlan with its micro-batch."""

    examples: object  # TokenizedExamples, or the packed rows
    collator: object  # PadByPosition or PackedCollator: both count tokens_seen
    plan: TrainPlan  # rows_per_micro_batch set; on the fast path its SpeedPlan too
    packing_stats: dict | None = None


def plan_batches(model, train_rows: pd.DataFrame, config: TrainConfig, plan: TrainPlan, pad_id: int, *, log) -> BatchPlan:
    """Padded batches, or packed rows whose documents only attend to themselves (after the model is built: the
    fast path configures the model for the rows it will see)."""
    examples = TokenizedExamples(train_rows)
    pack_stats = None
    on_cuda = plan.device == "cuda"
    if plan.packing:
        from loraflow.training import PackedCollator, enable_document_masking, pack_examples, packing_stats

        max_tokens = max(config.pack_max_tokens, int(train_rows["length"].max()))
        examples = pack_examples(examples.items, max_tokens=max_tokens)
        pack_stats = packing_stats(examples, max_tokens)
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
    """The train rows as a map-style dataset of {input_ids, attention_mask, labels} (plain int lists)."""

    def __init__(self, rows: pd.DataFrame):
        self.items = [
            {
                "input_ids": [int(t) for t in ids],
                "attention_mask": [int(m) for m in mask],
                "labels": [int(label) for label in labels],
            }
            for ids, mask, labels in zip(rows["input_ids"], rows["attention_mask"], rows["labels"])
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


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
