"""Fast (Q)LoRA training: padding-free packing with documents kept apart, and the model's speed settings.

    from loraflow.training import pack_examples, PackedCollator, configure_model_for_speed
    rows = pack_examples(tokenized_examples, max_tokens=4096)
    plan = configure_model_for_speed(model, train_config, memory_budget_gb=None, tokens_per_micro_batch=...)
    Trainer(model, data_collator=PackedCollator(pad_token_id=tok.pad_token_id), train_dataset=rows, ...)

See docs/speed.md for what each setting buys (measured) and why.
"""

from loraflow.training.lora_fast import fuse_lora_epilogues
from loraflow.training.masking import document_causal_mask, document_ids, enable_document_masking
from loraflow.training.packing import IGNORE_INDEX, PackedCollator, pack_examples, packing_stats
from loraflow.training.speed import SpeedPlan, activation_bytes_per_token, configure_model_for_speed, plan_checkpointing

__all__ = [
    "IGNORE_INDEX",
    "PackedCollator",
    "SpeedPlan",
    "activation_bytes_per_token",
    "configure_model_for_speed",
    "plan_checkpointing",
    "document_causal_mask",
    "document_ids",
    "enable_document_masking",
    "fuse_lora_epilogues",
    "pack_examples",
    "packing_stats",
]
