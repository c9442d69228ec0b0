"""The train stage's library: one module per concern, and the fast path's pieces re-exported here.

    plan.py (TrainPlan: device, precision, quantization, packing, fast path, processes; the pre-load budget checks)
    micro_batch.py (the fast path's rows per micro-batch, checkpointing, offload)   memory_model.py (bytes per token,
    layers to checkpoint, the smallest budget)   speed.py (configure_model_for_speed)   data.py (inputs, batches)
    model_loading.py   trainer.py (Trainer + callbacks)   checkpoints.py (identity, resume, saved adapter)
    outputs.py (curve, metrics)   result.py (TrainResult, errors)   distributed.py (rank, barrier, sums)
    launch.py (several processes)

The fast path: padding-free packing with documents kept apart, and the model's speed settings.

    from loraflow.training import pack_examples, PackedCollator, configure_model_for_speed
    rows = pack_examples(tokenized_examples, max_tokens=4096)
    plan = configure_model_for_speed(model, train_config, memory_budget_gb=None, tokens_per_micro_batch=...)
    Trainer(model, data_collator=PackedCollator(pad_token_id=tok.pad_token_id), train_dataset=rows, ...)

Rules for the caller (the train stage):
  - call configure_model_for_speed after get_peft_model, instead of prepare_model_for_kbit_training (or after
    it: it casts the frozen fp32 tensors back to bf16);
  - TrainingArguments(gradient_checkpointing=False, bf16=True on GPU, remove_unused_columns=False): the plan
    owns checkpointing per layer, and Trainer's own switch would re-enable it on every layer;
  - never add a 2-D attention_mask to packed batches (transformers would treat a row as one document);
  - tokens/s: PackedCollator.tokens_seen (non-padding) and .trained_tokens_seen (labelled).

See docs/speed.md for what each setting buys (measured on an H100) and why.
"""

from loraflow.training.lora_fast import fuse_lora_epilogues
from loraflow.training.masking import document_causal_mask, document_ids, enable_document_masking
from loraflow.training.packing import IGNORE_INDEX, PackedCollator, pack_examples, packing_stats
from loraflow.training.memory_model import activation_bytes_per_token, plan_checkpointing
from loraflow.training.speed import SpeedPlan, configure_model_for_speed

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
