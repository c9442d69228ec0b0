"""Loading for training: the tokenizer (and the pad id the collators need) and the base model wrapped in LoRA.

    tokenizer, pad_id = load_tokenizer(model_dir, trust_remote_code=False)
    model = load_lora_model(model_dir, train_config, plan)   # quantized, placed and prepared as the TrainPlan says

Base weights in 4-bit (bitsandbytes NF4, double quant, compute and storage in the training dtype), 8-bit or
unquantized; one whole model per process (DDP) on its GPU, or no device_map under FSDP (peft's FSDP-QLoRA recipe).
"""

from __future__ import annotations

import os
from pathlib import Path

from loraflow.config.train import TrainConfig
from loraflow.training.plan import TrainPlan


def load_tokenizer(model_dir: Path, *, trust_remote_code: bool = False):
    """(tokenizer, pad id): the pad token, or EOS when the tokenizer has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return tokenizer, pad_id


def load_lora_model(model_dir: Path, config: TrainConfig, plan: TrainPlan, *, trust_remote_code: bool = False,
                    start_adapter_dir: str | None = None):
    """The base model (quantized as `plan` says) wrapped in a fresh peft LoRA adapter, or in the adapter saved in
    `start_adapter_dir` (train.init_from=champion), trainable, with its weights.

    On the fast path (plan.fast_path) prepare_model_for_kbit_training is skipped (its fp32 upcast of frozen tensors
    and all-layer checkpointing cost speed): configure_model_for_speed sets the model up after this."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch.bfloat16 if plan.precision == "bf16" else torch.float32
    kwargs: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if plan.quantization == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            # Storage dtype = compute dtype keeps the packed weights shardable by FSDP later.
            bnb_4bit_quant_storage=dtype,
        )
    elif plan.quantization == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if plan.device == "cuda" and config.distributed != "fsdp":
        # One whole model per process (DDP): on this process's GPU, {"": local_rank}.
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}
    # FSDP (peft's FSDP-QLoRA recipe): no device_map; with cpu_ram_efficient_loading rank 0 reads the weights and
    # FSDP broadcasts them, and bitsandbytes puts the 4-bit weights on the current device (set per rank).
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    # Not under FSDP: its fp32 upcast of norms and embeddings would mix dtypes inside FSDP's flat parameters.
    if plan.quantization != "none" and not plan.fast_path and config.distributed != "fsdp":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    if start_adapter_dir is not None:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, start_adapter_dir, is_trainable=True)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
