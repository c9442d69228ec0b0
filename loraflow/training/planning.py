"""What this machine will run for a TrainConfig: device, precision, quantization, optimizer; packing, the fast path
and the packed rows per micro-batch.

    env = training_environment(train_config)      # {"device", "precision", "precision_reason", "quantization", "optimizer"}
    packing = packing_enabled(train_config, env)
    fast = fast_path_enabled(packing, env, train_config.distributed)

The fast path (default on CUDA: train.packing="auto") is `configure_model_for_speed` (loraflow.training.speed)
after get_peft_model, with the rows per micro-batch chosen from train.memory_budget_gb; docs/speed.md has the
measurements behind these choices.
"""

from __future__ import annotations

from pathlib import Path

from loraflow.config.train import TrainConfig


def training_environment(config: TrainConfig) -> dict:
    """Device, precision, quantization and optimizer this machine will actually use for `config`."""
    import torch

    from loraflow.modeling.precision import choose_precision

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    try:
        choice = choose_precision(config.precision, device)
    except ValueError as error:
        raise ValueError(f"train.precision: {error}") from None
    quantization = config.quantization if cuda else "none"
    # Under FSDP paged 8-bit AdamW fails when a checkpoint is saved (peft's FSDP-QLoRA caveats).
    paged = cuda and config.distributed != "fsdp"
    optimizer = config.optimizer if config.optimizer != "auto" else ("paged_adamw_8bit" if paged else "adamw_torch")
    return {"device": device, "precision": choice.precision, "precision_reason": choice.reason,
            "quantization": quantization, "optimizer": optimizer}


def apply_training_environment(config: TrainConfig, log) -> dict:
    """training_environment(config) with torch's CPU threads set (train.cpu_threads) and the choice logged; warns
    when train.quantization cannot run on this machine."""
    import torch

    env = training_environment(config)
    if env["device"] == "cpu" and config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    if quantization_reason(config, env):
        log.warning("train: %s; the code path is otherwise the same", quantization_reason(config, env))
    log.info("train: device=%s precision=%s (%s) quantization=%s optimizer=%s", env["device"], env["precision"],
             env["precision_reason"], env["quantization"], env["optimizer"])
    return env


def quantization_reason(config: TrainConfig, env: dict) -> str | None:
    """Why the quantization that runs is not train.quantization (None when it is)."""
    if config.quantization != env["quantization"]:
        return f"no CUDA device, so train.quantization={config.quantization} runs unquantized (16-bit base) on CPU"
    return None


def device_name(device: str) -> str:
    """The accelerator's name on CUDA ("NVIDIA H200"), else the CPU with torch's thread count."""
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"CPU, {torch.get_num_threads()} threads"


def packing_enabled(config: TrainConfig, env: dict) -> bool:
    """train.packing resolved for this machine: "auto" packs on CUDA (the fast path) and not on CPU."""
    if config.packing == "auto":
        return env["device"] == "cuda"
    return bool(config.packing)


def fast_path_enabled(packing: bool, env: dict, distributed: str = "none") -> bool:
    """The packed fast path (configure_model_for_speed) runs on CUDA; packing on CPU keeps the CPU settings.
    Not under FSDP: its fused LoRA epilogues and per-layer checkpointing reach into modules FSDP has flattened
    and wrapped (measured nowhere yet), so FSDP packs with document masks and Trainer's checkpointing."""
    return packing and env["device"] == "cuda" and distributed != "fsdp"


def configure_fast_path(model, config: TrainConfig, env: dict, max_tokens: int, packed_rows: int, log,
                        attn_implementation: str | None = None, lean_recompute: bool = True) -> tuple[int, dict]:
    """Rows per micro-batch, checkpointing and offload from the memory budget, then `configure_model_for_speed`
    (`attn_implementation`, `lean_recompute`: its defaults unless a benchmark compares others); returns (rows, plan dict)."""
    import torch

    from loraflow.training import configure_model_for_speed

    budget = config.memory_budget_gb
    if budget is None:
        budget = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 1024**3
    rows, offload, reason = choose_micro_batch(model, config, max_tokens, packed_rows, budget)
    plan = configure_model_for_speed(
        model, config, memory_budget_gb=budget, tokens_per_micro_batch=rows * max_tokens,
        compute_dtype=torch.bfloat16 if env["precision"] == "bf16" else torch.float32, offload_checkpointed=offload,
        attn_implementation=attn_implementation, lean_recompute=lean_recompute,
    ).as_dict()
    plan.update(rows_per_micro_batch=rows, rows_choice=reason, row_tokens=max_tokens)
    log.info("train: fast path, %d packed rows of %d tokens per micro-batch (%s); speed plan %s", rows, max_tokens, reason, plan)
    return rows, plan


def check_budget_before_loading(model_dir: Path, config: TrainConfig, env: dict, longest_example: int) -> None:
    """Refuse (MemoryBudgetError, naming the smallest budget that works) a train.memory_budget_gb that even one
    packed row with every layer checkpointed (on CUDA: inputs offloaded) cannot keep: read from config.json, before
    any weights load."""
    import importlib.util
    import json

    from loraflow.training.speed import check_memory_budget

    config_file = Path(model_dir) / "config.json"
    if config.memory_budget_gb is None or not config_file.exists():
        return
    try:
        check_memory_budget(
            json.loads(config_file.read_text()), max(config.pack_max_tokens, longest_example), config.memory_budget_gb,
            lora_r=config.lora_r, target_modules=config.target_modules, quantization=env["quantization"],
            fused_head=importlib.util.find_spec("liger_kernel") is not None, offload=env.get("device") == "cuda",
        )
    except (AttributeError, KeyError, TypeError):  # not a Llama-style config: the plan after loading decides alone
        return


def _fsdp_plan_inputs(model_dir: Path, config: TrainConfig, env: dict, longest_example: int) -> tuple[dict, int, dict] | None:
    """(config.json, tokens per micro-batch, the estimate's keyword arguments), or None without a config.json.
    Tokens per micro-batch: packed rows x row length, or padded rows x the longest example."""
    import json

    config_file = Path(model_dir) / "config.json"
    if not config_file.exists():
        return None
    if packing_enabled(config, env):
        tokens = (config.pack_rows_per_micro_batch or config.micro_batch_size) * max(config.pack_max_tokens, longest_example)
    else:
        tokens = config.micro_batch_size * longest_example
    options = dict(lora_r=config.lora_r, target_modules=config.target_modules, quantization=env["quantization"],
                   checkpointing=config.gradient_checkpointing)
    return json.loads(config_file.read_text()), tokens, options


def fsdp_memory_estimate(model_dir: Path, config: TrainConfig, env: dict, longest_example: int,
                         processes: int) -> dict | None:
    """Per-GPU peak of FSDP-QLoRA with `processes` processes (loraflow.training.fsdp_memory), from config.json; None
    when there is none or it is not Llama-style."""
    from loraflow.training.fsdp_memory import fsdp_peak_per_gpu

    inputs = _fsdp_plan_inputs(model_dir, config, env, longest_example)
    if inputs is None:
        return None
    model_config, tokens, options = inputs
    try:
        return fsdp_peak_per_gpu(model_config, processes, tokens, **options)
    except (AttributeError, KeyError, TypeError):
        return None


def check_fsdp_budget(model_dir: Path, config: TrainConfig, env: dict, longest_example: int, processes: int, log) -> dict | None:
    """Log FSDP's per-GPU peak estimate before launching; MemoryBudgetError (naming the GPU count or budget that
    would work) when it exceeds train.memory_budget_gb."""
    from loraflow.training.fsdp_memory import describe, smallest_budget_message
    from loraflow.training.speed import MemoryBudgetError

    estimate = fsdp_memory_estimate(model_dir, config, env, longest_example, processes)
    if estimate is None:
        return None
    log.info("train: %s", describe(estimate))
    if config.memory_budget_gb is not None and estimate["total_gib"] > config.memory_budget_gb:
        model_config, tokens, options = _fsdp_plan_inputs(model_dir, config, env, longest_example)
        raise MemoryBudgetError(smallest_budget_message(model_config, config.memory_budget_gb, processes, tokens, **options))
    return estimate


def choose_rows_per_micro_batch(model, config: TrainConfig, max_tokens: int, packed_rows: int, budget_gb: float) -> tuple[int, str]:
    """Packed rows per forward pass, and why (`choose_micro_batch` without the offload choice)."""
    rows, _, reason = choose_micro_batch(model, config, max_tokens, packed_rows, budget_gb)
    return rows, reason


def choose_micro_batch(model, config: TrainConfig, max_tokens: int, packed_rows: int, budget_gb: float) -> tuple[int, bool, str]:
    """(rows per micro-batch, offload checkpointed inputs, why): train.pack_rows_per_micro_batch, else of 16/8/4/2/1
    rows (never more than the data has), with and without CPU offload, the setting with the highest predicted
    tokens/s whose estimated peak fits `budget_gb` (GiB) with the fewest layers checkpointed
    (loraflow.training.step_plan); if none fits, the smallest estimated peak."""
    from loraflow.training.masking import _decoder
    from loraflow.training.step_plan import best_choice, step_candidates

    fused_head = _liger_available_for(model)
    # Offload recomputes each layer in a nested backward (the reentrant pattern): one process only, not under DDP,
    # whose gradient hooks were not measured with it.
    may_offload = config.distributed == "none"
    if config.pack_rows_per_micro_batch:
        rows = config.pack_rows_per_micro_batch
        fitting = [c for c in step_candidates(model, rows * max_tokens, 1, budget_gb, fused_head=fused_head,
                                              checkpointing=config.gradient_checkpointing, offload=may_offload)
                   if c.rows == 1]
        offload = best_choice(fitting).offload
        return rows, offload, "train.pack_rows_per_micro_batch" + (", checkpointed inputs offloaded" if offload else "")
    candidates = step_candidates(model, max_tokens, packed_rows, budget_gb, fused_head=fused_head,
                                 checkpointing=config.gradient_checkpointing, offload=may_offload)
    chosen = best_choice(candidates)
    layers = len(_decoder(model).layers)
    if not chosen.fits:
        return chosen.rows, chosen.offload, f"nothing fits {budget_gb:.1f} GiB; smallest plan: {chosen.describe(layers)}"
    runner_up = [c for c in candidates if c.fits and c != chosen]
    other = max(runner_up, key=lambda c: c.predicted_tokens_per_s).describe(layers) if runner_up else "none"
    return chosen.rows, chosen.offload, (f"fastest predicted that fits {budget_gb:.1f} GiB: {chosen.describe(layers)} "
                                         f"(next: {other})")


def _liger_available_for(model) -> bool:
    """Whether configure_model_for_speed will fuse the LM head with Liger (so the logits are never materialised)."""
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None or next(model.parameters()).device.type != "cuda":
        return False
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except Exception:  # noqa: BLE001 - an unusable Liger means no fused head
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config.model_type in MODEL_TYPE_TO_APPLY_LIGER_FN
