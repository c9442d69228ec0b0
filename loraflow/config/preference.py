"""Config of the preference stage: pairs built from the synthesized rows, then DPO on the SFT adapter (TRL)."""

from typing import Literal

from pydantic import Field

from data_contracts.pairs import PAIR_KINDS
from loraflow.config.base import StrictModel

PairKind = Literal[PAIR_KINDS]  # the kinds the pairs contract knows, named once there
# TRL 1.16 DPOConfig.loss_type values offered here (its paired losses that need no extra model or data).
DpoLoss = Literal["sigmoid", "ipo", "hinge", "robust", "apo_zero", "sft"]


class PreferenceConfig(StrictModel):
    """Preference tuning after SFT: chosen/rejected pairs from the same rows, DPO on the same adapter."""

    enabled: bool = Field(False, description="Run the preference stage after SFT (off until measured better: "
                                             "docs/preference.md).")
    kinds: list[PairKind] = Field(list(PAIR_KINDS), min_length=1, description=(
        "Pair kinds to build: fact_swap (known title: answer vs the same answer with one fact swapped or perturbed), "
        "made_up_title (made-up title: refusal vs a confident catalog-style answer), false_refusal (known title: "
        "answer vs a refusal)."))
    pairs_per_row: int = Field(1, ge=1, le=8, description="Pairs of each kind per trained row (each swaps another fact).")
    seed: int = Field(0, description="Seed of which fact is swapped and which row lends its value.")
    beta: float = Field(0.1, gt=0.0, le=10.0, description="DPO beta: how far the policy may move from the reference.")
    loss_type: list[DpoLoss] = Field(["sigmoid", "sft"], min_length=1, description=(
        "TRL DPOConfig.loss_type: sigmoid (DPO), ipo, hinge, robust, apo_zero; sft adds the chosen answers' NLL "
        "(RPO-style: DPO alone can lower the chosen answers' likelihood too), weighted by loss_weights."))
    loss_weights: list[float] | None = Field(None, description="Weights of loss_type's losses (TRL's default: 1 each).")
    steps: int = Field(30, ge=1, le=100000, description="Optimizer steps of DPO.")
    batch_size: int = Field(4, ge=1, le=256, description="Pairs per step.")
    learning_rate: float = Field(3e-4, gt=0.0, le=1.0, description=(
        "Learning rate of the adapter's LoRA weights in DPO (linear decay, no warm-up)."))
    max_length: int = Field(256, ge=16, le=131072, description="Longest prompt + answer in tokens (TRL truncates the rest).")
    margin_sample: int = Field(32, ge=0, le=100000, description=(
        "Pairs whose chosen-minus-rejected log-prob margin is measured before and after DPO (0: not measured)."))
