"""Rows per micro-batch, checkpointed layers and offload, chosen by predicted throughput within a memory budget.

Every candidate (1, 2, 4, 8 or 16 packed rows; checkpointed layers' inputs kept on the GPU or offloaded to CPU
memory) gets the fewest checkpointed layers that fit the budget (`plan_checkpointing`); among those that fit, the
one with the highest predicted tokens/s wins. The step-time model is calibrated on the H200 frontier
(docs/speed.md, 8B shape, 4,096-token rows): a fixed cost per step that more rows amortise, a cost per token, and a
recompute cost per token that grows with the share of checkpointed layers.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    from loraflow.training.masking import _decoder
    from loraflow.training.speed import plan_checkpointing

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
