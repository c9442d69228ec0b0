"""Config of the train stage: (Q)LoRA adapter training."""

from typing import Literal

from pydantic import Field, model_validator

from loraflow.config.base import StrictModel


class TrainConfig(StrictModel):
    """LoRA / QLoRA training of an adapter on the tokenized train split."""

    quantization: Literal["4bit", "8bit", "none"] = Field(
        "4bit", description="Base weights: 4bit (bitsandbytes NF4, QLoRA), 8bit, or none. Without a GPU: none, logged."
    )
    lora_r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with rsLoRA).")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: str | list[str] = Field("all-linear", description="peft target modules: 'all-linear' or a list of names.")
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling.")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    gradient_checkpointing: bool = Field(
        True,
        description=(
            "Recompute activations in backward to save memory. On the packed CUDA path this allows checkpointing: "
            "only as many layers as memory_budget_gb requires are checkpointed (false: none)."
        ),
    )
    optimizer: Literal["auto", "paged_adamw_8bit", "adamw_torch"] = Field(
        "auto", description="auto = paged_adamw_8bit on GPU, adamw_torch on CPU."
    )
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["constant", "cosine", "linear"] = Field("cosine", description="Learning-rate schedule after warmup.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps spent warming up.")
    epochs: float = Field(1.0, gt=0, description="Passes over the train split (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    micro_batch_size: int = Field(4, ge=1, description="Examples per forward pass (unpacked batches; see pack_rows_per_micro_batch).")
    gradient_accumulation: int = Field(
        1, ge=1,
        description=(
            "Micro-batches per optimizer step in each process. Global batch = micro-batch (micro_batch_size, or packed "
            "rows) x gradient_accumulation x processes: 1 process with 2 here equals 2 processes with 1."
        ),
    )
    packing: bool | Literal["auto"] = Field(
        "auto",
        description=(
            "Pack examples into full rows, each document attending only to itself. auto = on with CUDA (the fast "
            "path: loraflow.training's packer, PackedCollator, configure_model_for_speed: flex attention, Liger, "
            "fused LoRA, per-layer checkpointing from memory_budget_gb), off on CPU (padded batches). true on CPU "
            "packs with document masks but keeps the CPU settings."
        ),
    )
    pack_max_tokens: int = Field(
        4096, ge=16,
        description="Row length when packing (raised to the longest example if shorter); docs/speed.md measured 4096.",
    )
    pack_rows_per_micro_batch: int | None = Field(
        None, ge=1,
        description=(
            "Packed rows per forward pass. None = on CUDA, chosen from memory_budget_gb: of 1, 2, 4, 8 or 16 rows, "
            "with checkpointed layers' inputs on the GPU or offloaded to CPU memory, the setting with the highest "
            "predicted tokens/s whose estimated peak fits the budget with the fewest layers checkpointed "
            "(loraflow.training.micro_batch, calibrated on the H200 frontier in docs/speed.md). On CPU, None = "
            "micro_batch_size."
        ),
    )
    memory_budget_gb: float | None = Field(
        None, gt=0,
        description=(
            "GPU memory (GiB) the packed fast path plans for: rows per micro-batch and how many layers are "
            "checkpointed. None = the GPU's total memory."
        ),
    )
    distributed: Literal["none", "ddp", "fsdp"] = Field(
        "none",
        description=(
            "none = train in this process. ddp = `accelerate launch` runs the same training in num_processes "
            "processes, each with a whole model (adapters on models that fit one GPU). fsdp = the same with the "
            "base model sharded across processes (FSDP + QLoRA, 4-bit weights stored as bf16, for models that do "
            "not fit one GPU; CUDA only). Rank 0 writes the adapter, metrics and checkpoint markers; the caller gets one "
            "TrainResult. docs/scaling.md."
        ),
    )
    num_processes: int | None = Field(
        None, ge=1,
        description=(
            "Processes for ddp/fsdp, one per GPU. None = every visible GPU (CUDA_VISIBLE_DEVICES); without CUDA "
            "it must be given (CPU processes over gloo, used by the tests)."
        ),
    )
    group_by_length: bool = Field(True, description="Batch examples of similar length together to limit padding.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description=(
            "auto = bf16 where the device computes it fast, else fp32: on a GPU where it supports bf16; on a CPU only "
            "with bf16 instructions (AVX512-BF16/AMX) and a micro-benchmark showing bf16 faster (on AVX2-only CPUs "
            "bf16 is emulated and ~27x slower). The run log and metrics.json say which was chosen and why. "
            "fp16 is never used."
        ),
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    report_to: list[Literal["tensorboard", "mlflow", "wandb-offline"]] = Field(
        default_factory=list, description="Trackers fed by transformers' own integrations (empty: none).",
    )
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI (MLFLOW_TRACKING_URI in the environment wins); never put credentials here.",
    )
    tracking_experiment: str = Field("loraflow", description="MLflow experiment name.")
    neftune_noise_alpha: float | None = Field(
        None, gt=0, description="NEFTune: uniform noise of this scale on the input embeddings while training (None: off).",
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    checkpoint_every: int = Field(50, ge=1, description="Save a resumable checkpoint every N optimizer steps.")
    keep_checkpoints: int = Field(2, ge=1, description="Newest complete checkpoints kept while training (all removed after success).")
    nonfinite_patience: int = Field(3, ge=1, description="Stop after this many consecutive steps with non-finite loss or grad norm.")
    allow_resume_mismatch: bool = Field(False, description="Resume even if data or config differ from the checkpoint's.")
    init_from: Literal["none", "champion"] = Field(
        "none",
        description=(
            "none = a fresh adapter. champion = continue from the model name's champion adapter (the published version "
            "in force), training on the rows it has not seen (source records new or edited since its data) plus "
            "replay_unchanged of the rest. No champion yet (a first run), or its adapter or data gone from the store: "
            "trains fresh, with a warning. The champion's LoRA settings (r, alpha, targets, rsLoRA, DoRA) must be these. "
            "docs/retraining.md, 'Continue or start fresh'."
        ),
    )
    replay_unchanged: float = Field(
        0.25, ge=0.0, le=1.0,
        description=(
            "With init_from=champion: the share of the unchanged train rows (examples of source records the champion "
            "was trained on as they are now) trained again beside the changed ones, so it keeps them (0 = changed rows "
            "only, 1 = all rows, from the champion's weights). Drawn with train.seed."
        ),
    )
    seed: int = Field(0, description="Random seed.")
    cpu_threads: int | None = Field(
        None, ge=1,
        description=(
            "torch threads when training on CPU (None = torch's default). On a shared CPU, 1 avoids OpenMP "
            "oversubscription: SmolLM2 LoRA steps took 3 s with 1 thread vs 18-55 s with 2 on a busy 2-core machine."
        ),
    )

    @model_validator(mode="after")
    def _dora_needs_unquantized_merge(self):
        if self.use_dora and self.quantization == "8bit":
            raise ValueError("train.use_dora does not support train.quantization=8bit: use 4bit or none")
        return self

    @model_validator(mode="after")
    def _distributed_settings_fit(self):
        if self.num_processes is not None and self.distributed == "none":
            raise ValueError(
                f"train.num_processes={self.num_processes} needs train.distributed=ddp or fsdp "
                "(with distributed=none training runs in this one process): set distributed, or drop num_processes"
            )
        if self.distributed == "fsdp" and self.quantization == "8bit":
            raise ValueError(
                "train.distributed=fsdp cannot shard 8-bit weights (FSDP shards float storage only): use "
                "train.quantization=4bit (stored as bf16) or none, or train.distributed=ddp"
            )
        if self.init_from == "champion" and self.distributed != "none":
            raise ValueError(
                "train.init_from=champion continues in this one process only (launched processes do not load the "
                "champion's adapter yet): set train.distributed=none, or train.init_from=none"
            )
        if self.distributed == "fsdp" and self.optimizer == "paged_adamw_8bit":
            raise ValueError(
                "train.distributed=fsdp with train.optimizer=paged_adamw_8bit fails when a checkpoint is saved "
                "(peft's FSDP-QLoRA caveat): use train.optimizer=auto (adamw_torch under FSDP) or adamw_torch"
            )
        return self
