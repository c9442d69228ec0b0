"""The train stage's data: the train rows as a dataset, and the batches Trainer draws from them.

    batches = plan_batches(model, train_rows, train_config, env, pad_id, packing=..., fast=..., log=log)

Without packing, examples are right-padded per batch (PadByPosition); with it, examples are packed into rows
whose documents only attend to themselves (loraflow.training.packing and .masking), and on the fast path the
rows per micro-batch come from the memory budget (loraflow.training.planning.configure_fast_path).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from loraflow.config.train import TrainConfig
from loraflow.training.planning import configure_fast_path

# = data_contracts.tokens.IGNORE_INDEX; not imported so the GPU machine needs no pandera.
IGNORE_INDEX = -100


@dataclass
class BatchPlan:
    """What Trainer draws from: the dataset, its collator, and how it was batched (packed, fast path)."""

    examples: object  # TokenizedExamples, or the packed rows
    collator: object  # PadByPosition or PackedCollator: both count tokens_seen
    packing: bool
    fast: bool
    rows_per_micro_batch: int
    speed_plan: dict | None = None  # the fast path's SpeedPlan (loraflow.training.planning.configure_fast_path)
    packing_stats: dict | None = None


def plan_batches(model, train_rows: pd.DataFrame, config: TrainConfig, env: dict, pad_id: int, *, packing: bool,
                 fast: bool, log) -> BatchPlan:
    """Padded batches, or packed rows whose documents only attend to themselves (after the model is built: the
    fast path configures the model for the rows it will see)."""
    examples = TokenizedExamples(train_rows)
    rows_per_micro_batch, plan, pack_stats = config.micro_batch_size, None, None
    if packing:
        from loraflow.training import PackedCollator, enable_document_masking, pack_examples, packing_stats

        max_tokens = max(config.pack_max_tokens, int(train_rows["length"].max()))
        examples = pack_examples(examples.items, max_tokens=max_tokens)
        pack_stats = packing_stats(examples, max_tokens)
        log.info("train: packing %s", pack_stats)
        if fast:
            rows_per_micro_batch, plan = configure_fast_path(model, config, env, max_tokens, len(examples), log)
        else:
            rows_per_micro_batch = config.pack_rows_per_micro_batch or config.micro_batch_size
            # The mask hook must see position_ids without an attention_mask: PackedCollator sends exactly that.
            enable_document_masking(model)
        # No 2-D attention_mask in these batches: transformers would then treat a row as one document.
        collator = PackedCollator(pad_token_id=pad_id, pad_to_multiple_of=128 if env["device"] == "cuda" else None)
    else:
        collator = PadByPosition(pad_id, pad_to_multiple_of=8 if env["device"] == "cuda" else None)
    return BatchPlan(examples, collator, packing, fast, rows_per_micro_batch, plan, pack_stats)


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
