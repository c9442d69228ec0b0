"""The fast path's micro-batch: rows per micro-batch, checkpointed layers and offload, chosen by predicted
throughput within a memory budget, then applied to the loaded model (`configure_fast_path`).

Every candidate (1, 2, 4, 8 or 16 packed rows; checkpointed layers' inputs kept on the GPU or offloaded to CPU
memory) gets the fewest checkpointed layers that fit the budget (`plan_checkpointing`); among those that fit, the
one with the highest predicted tokens/s wins. The step-time model is calibrated on the H200 frontier
(docs/speed.md, 8B shape, 4,096-token rows): a fixed cost per step that more rows amortise, a cost per token, and a
recompute cost per token that grows with the share of checkpointed layers. The choice completes the run's
TrainPlan (loraflow.training.plan).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from loraflow.config.train import TrainConfig
from loraflow.training.masking import _decoder
from loraflow.training.memory_model import plan_checkpointing
from loraflow.training.plan import TrainPlan
from loraflow.training.speed import configure_model_for_speed

# Step time = FIXED_STEP_S + tokens × PER_TOKEN_S × (1 + RECOMPUTE_SHARE × checkpointed / layers). Fitted on
# benchmarks/results/train_frontier_h200_llama3-8b-32k*.json: 1 row whole 0.376 s, 4 rows whole 1.109 s (fixed
# 0.132 s, 59.6 µs per token on 8B); every layer checkpointed: 2 rows 0.834 s (inputs on the GPU), 2 / 8 / 16 rows
# offloaded 0.807 / 2.989 / 5.863 s (recompute share 0.46 over the four). Only the ratios matter for the choice:
# PER_TOKEN_S scales every candidate of one model alike.
FIXED_STEP_S = 0.132
PER_TOKEN_S = 59.6e-6
RECOMPUTE_SHARE = 0.46
# Offload copies overlap with compute but share memory bandwidth: take it only where it wins by more than this.
OFFLOAD_PENALTY = 0.02
ROW_CHOICES = (16, 8, 4, 2, 1)


@dataclass(frozen=True)
class StepChoice:
    """One micro-batch setting: rows, checkpointed layers, offload, its estimated peak and predicted speed."""

    rows: int
    checkpointed: int
    offload: bool
    estimated_peak_gb: float
    predicted_tokens_per_s: float
    fits: bool

    def describe(self, layers: int) -> str:
        where = ", inputs offloaded to CPU memory" if self.offload and self.checkpointed else ""
        return (f"{self.rows} rows, {self.checkpointed}/{layers} layers checkpointed{where}: estimated peak "
                f"{self.estimated_peak_gb:.1f} GiB, predicted {self.predicted_tokens_per_s:,.0f} tokens/s")


def predicted_tokens_per_s(tokens: int, checkpointed: int, layers: int, offload: bool = False) -> float:
    """Tokens per second the step-time model predicts for one micro-batch of `tokens` (relative ranking only)."""
    step_s = FIXED_STEP_S + tokens * PER_TOKEN_S * (1 + RECOMPUTE_SHARE * checkpointed / max(layers, 1))
    speed = tokens / step_s
    return speed * (1 - OFFLOAD_PENALTY) if offload and checkpointed else speed


def best_choice(candidates: list[StepChoice]) -> StepChoice:
    """The fastest candidate that fits; when none fits, the one with the smallest estimated peak."""
    fitting = [c for c in candidates if c.fits]
    if fitting:
        return max(fitting, key=lambda c: (c.predicted_tokens_per_s, -c.rows))
    return min(candidates, key=lambda c: (c.estimated_peak_gb, -c.rows))


def step_candidates(model, row_tokens: int, packed_rows: int, budget_gb: float, *, fused_head: bool,
                    checkpointing: bool = True, offload: bool = True) -> list[StepChoice]:
    """Every rows × offload setting (offload only if `offload`) with the fewest checkpointed layers that fit
    `budget_gb` (GiB)."""
    layers = len(_decoder(model).layers)
    most = max(1, packed_rows)
    candidates = []
    for rows in ROW_CHOICES:
        if rows > most and rows != 1:
            continue
        tokens = rows * row_tokens
        for offloaded in ((False, True) if checkpointing and offload else (False,)):
            checkpointed, peak = plan_checkpointing(model, tokens, budget_gb, fused_head=fused_head, offload=offloaded)
            if not checkpointing:
                checkpointed, peak = 0, plan_checkpointing(model, tokens, float("inf"), fused_head=fused_head)[1]
            if offloaded and checkpointed == 0:
                continue  # nothing to offload: the same as the plan without offload
            candidates.append(StepChoice(rows, checkpointed, offloaded, peak,
                                         predicted_tokens_per_s(tokens, checkpointed, layers, offloaded),
                                         fits=peak <= budget_gb))
    return candidates


def configure_fast_path(model, config: TrainConfig, plan: TrainPlan, max_tokens: int, packed_rows: int, log,
                        attn_implementation: str | None = None, lean_recompute: bool = True) -> TrainPlan:
    """Rows per micro-batch, checkpointing and offload from the memory budget, then `configure_model_for_speed`
    (`attn_implementation`, `lean_recompute`: its defaults unless a benchmark compares others); returns `plan` with
    the micro-batch and the SpeedPlan."""
    budget = config.memory_budget_gb
    if budget is None:
        budget = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 1024**3
    rows, offload, reason = choose_micro_batch(model, config, max_tokens, packed_rows, budget)
    speed = configure_model_for_speed(
        model, config, memory_budget_gb=budget, tokens_per_micro_batch=rows * max_tokens,
        compute_dtype=torch.bfloat16 if plan.precision == "bf16" else torch.float32, offload_checkpointed=offload,
        attn_implementation=attn_implementation, lean_recompute=lean_recompute,
    ).as_dict()
    speed.update(rows_per_micro_batch=rows, rows_choice=reason, row_tokens=max_tokens)
    log.info("train: fast path, %d packed rows of %d tokens per micro-batch (%s); speed plan %s", rows, max_tokens, reason, speed)
    return plan.with_micro_batch(rows, reason, max_tokens, speed)


def choose_rows_per_micro_batch(model, config: TrainConfig, max_tokens: int, packed_rows: int, budget_gb: float) -> tuple[int, str]:
    """Packed rows per forward pass, and why (`choose_micro_batch` without the offload choice)."""
    rows, _, reason = choose_micro_batch(model, config, max_tokens, packed_rows, budget_gb)
    return rows, reason


def choose_micro_batch(model, config: TrainConfig, max_tokens: int, packed_rows: int, budget_gb: float) -> tuple[int, bool, str]:
    """(rows per micro-batch, offload checkpointed inputs, why): train.pack_rows_per_micro_batch, else of 16/8/4/2/1
    rows (never more than the data has), with and without CPU offload, the setting with the highest predicted
    tokens/s whose estimated peak fits `budget_gb` (GiB) with the fewest layers checkpointed
    (`step_candidates`); if none fits, the smallest estimated peak."""
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
    if importlib.util.find_spec("liger_kernel") is None or next(model.parameters()).device.type != "cuda":
        return False
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except Exception:  # noqa: BLE001 - an unusable Liger means no fused head
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config.model_type in MODEL_TYPE_TO_APPLY_LIGER_FN
