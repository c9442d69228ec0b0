"""DPO after SFT, on the same adapter, with TRL's own DPOTrainer and DPOConfig.

Supported: a peft LoRA adapter from the train stage, trained further on PAIRS (prompt, chosen, rejected) with any of
PreferenceConfig.loss_type's paired losses; answer-only loss (TRL masks the prompt: only the chosen and rejected
answers' tokens count); one process, CPU or one GPU, unquantized base in the SFT precision.
Not supported: KTO and ORPO (TRL keeps them in trl.experimental with other data shapes), several processes.

The reference: TRL 1.16, given a PeftModel that already holds a trained adapter and no ref_model, copies that adapter
into a frozen "ref" adapter and computes the reference log-probs with it, so the reference is the SFT model (the
policy DPO starts from). "Adapter disabled" would make the base model the reference, which does not know the catalog:
every trained fact would then count as a move away from it. The "ref" copy is dropped before the adapter is saved.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd
from pydantic import BaseModel, Field

from loraflow.config.preference import PreferenceConfig
from loraflow.modeling.precision import choose_precision
from loraflow.runtime.atomic_files import write_json_atomic
from loraflow.training.checkpoints import save_adapter
from loraflow.training.model_loading import load_tokenizer

log_default = logging.getLogger("loraflow.preference")
DPO_MANIFEST_KIND = "dpo"


class PreferenceResult(BaseModel):
    """What the DPO step produced (small, JSON: what the flow passes to evaluate and publish)."""

    adapter_dir: str = Field(..., description="The DPO-tuned adapter (same LoRA shape as the SFT one).")
    sft_adapter_dir: str = Field(..., description="The SFT adapter DPO started from (and whose copy was the reference).")
    fingerprint: str = Field(..., description="Hash of SFT adapter + pairs + DPO settings (the evaluation's cache key).")
    pairs: int = Field(..., description="Pairs in the PAIRS artifact.")
    steps: int
    loss_type: list[str]
    beta: float
    margin_before: float | None = Field(None, description="Mean log p(chosen) - log p(rejected) on a sample, before DPO.")
    margin_after: float | None = Field(None, description="The same, after DPO.")
    margins_by_kind: dict = Field(default_factory=dict, description="kind -> {before, after, pairs} of the sample.")
    final_loss: float | None = None
    reward_accuracy: float | None = Field(None, description="TRL's rewards/accuracies at the last logged step.")
    seconds: float
    metrics_path: str


def pair_margins(model, tokenizer, pairs: pd.DataFrame, batch_size: int = 8) -> list[float]:
    """Per pair, sum log p(chosen | prompt) - sum log p(rejected | prompt) under `model` (answer tokens + end token)."""
    import torch

    def answer_logps(prompts: list[str], answers: list[str]) -> list[float]:
        end = tokenizer.eos_token or ""
        encoded = [(tokenizer(p, add_special_tokens=False)["input_ids"], tokenizer(p + a + end, add_special_tokens=False)["input_ids"])
                   for p, a in zip(prompts, answers)]
        width = max(len(full) for _, full in encoded)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([full + [pad] * (width - len(full)) for _, full in encoded])
        mask = torch.tensor([[1] * len(full) + [0] * (width - len(full)) for _, full in encoded])
        with torch.no_grad():
            logps = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), dim=-1)
        token_logps = logps.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        # The answer starts where prompt and prompt + answer stop sharing tokens (as TRL decides it).
        return [float(token_logps[row, _shared(prompt, full) - 1:len(full) - 1].sum())
                for row, (prompt, full) in enumerate(encoded)]

    margins = []
    model.eval()
    for start in range(0, len(pairs), batch_size):
        batch = pairs.iloc[start:start + batch_size]
        chosen = answer_logps(batch["prompt"].tolist(), batch["chosen"].tolist())
        rejected = answer_logps(batch["prompt"].tolist(), batch["rejected"].tolist())
        margins += [c - r for c, r in zip(chosen, rejected)]
    return margins


def _shared(prompt: list[int], full: list[int]) -> int:
    shared = 0
    while shared < min(len(prompt), len(full)) and prompt[shared] == full[shared]:
        shared += 1
    return max(shared, 1)


def margin_sample(pairs: pd.DataFrame, size: int) -> pd.DataFrame:
    """An evenly spread, deterministic sample of `size` pairs (all when fewer)."""
    if size >= len(pairs):
        return pairs.reset_index(drop=True)
    step = len(pairs) / size
    return pairs.iloc[[int(i * step) for i in range(size)]].reset_index(drop=True)


def mean_by_kind(sample: pd.DataFrame, before: list[float], after: list[float]) -> dict:
    """kind -> {before, after, pairs}: the mean margin of each pair kind in the sample."""
    frame = sample.assign(before=before, after=after)
    return {kind: {"before": round(float(g["before"].mean()), 4), "after": round(float(g["after"].mean()), 4),
                   "pairs": len(g)} for kind, g in frame.groupby("kind")}


def dpo_arguments(config: PreferenceConfig, output_dir: Path, precision: str, seed: int):
    """TRL's DPOConfig for this step: no checkpoints, no trackers, every step logged."""
    import torch
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(output_dir / "trainer"), max_steps=config.steps, per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=1, learning_rate=config.learning_rate, lr_scheduler_type="linear",
        beta=config.beta, loss_type=list(config.loss_type), loss_weights=config.loss_weights,
        max_length=config.max_length, logging_steps=1, save_strategy="no", report_to=[], seed=seed,
        bf16=precision == "bf16", use_cpu=not torch.cuda.is_available(), gradient_checkpointing=False, dataloader_num_workers=0, disable_tqdm=True,
    )


def load_policy(model_dir: Path, sft_adapter_dir: Path, precision: str, trust_remote_code: bool):
    """The base model with the SFT adapter loaded trainable (TRL copies it as the frozen reference)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
    base.config.use_cache = False
    return PeftModel.from_pretrained(base, str(sft_adapter_dir), is_trainable=True)


def train_preference(pairs: pd.DataFrame, model_dir: str | Path, sft_adapter_dir: str | Path, config: PreferenceConfig,
                     output_dir: str | Path, *, fingerprint: str, seed: int = 0, precision: str = "auto",
                     trust_remote_code: bool = False,
                     log: logging.Logger | logging.LoggerAdapter | None = None) -> PreferenceResult:
    """DPO on `pairs` (PAIRS rows) starting from the SFT adapter; writes output_dir/adapter (manifest last) and
    metrics.json; a complete adapter with the same fingerprint is reused. `precision` is train.precision (auto, bf16,
    fp32), resolved for this device as the train stage resolves it."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import DPOTrainer

    log = log or log_default
    started = time.perf_counter()
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    done = finished_preference(output_dir, fingerprint)
    if done is not None:
        log.info("dpo: adapter %s already complete for these inputs; reusing it", done.adapter_dir)
        return done
    # ---- model: the tokenizer first (the margins and TRL's tokenization need it), then base + SFT adapter
    tokenizer, _ = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    precision = choose_precision(precision).precision
    set_seed(seed)
    model = load_policy(model_dir, Path(sft_adapter_dir), precision, trust_remote_code)
    sample = margin_sample(pairs, config.margin_sample)
    before = pair_margins(model, tokenizer, sample) if len(sample) else []

    # ---- train: TRL tokenizes prompt + chosen / rejected itself and masks the prompt
    dataset = Dataset.from_pandas(pairs[["prompt", "chosen", "rejected"]].reset_index(drop=True), preserve_index=False)
    trainer = DPOTrainer(model=model, ref_model=None, args=dpo_arguments(config, output_dir, precision, seed),
                         train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    after = pair_margins(model, tokenizer, sample) if len(sample) else []

    # ---- save: the policy adapter only (the "ref" copy is TRL's, not ours), manifest last
    if "ref" in model.peft_config:
        model.delete_adapter("ref")
    result = PreferenceResult(
        adapter_dir=str(output_dir / "adapter"), sft_adapter_dir=str(sft_adapter_dir), fingerprint=fingerprint,
        pairs=len(pairs), steps=trainer.state.global_step, loss_type=list(config.loss_type), beta=config.beta,
        margin_before=_mean(before), margin_after=_mean(after), margins_by_kind=mean_by_kind(sample, before, after),
        final_loss=history[-1]["loss"] if history else None,
        reward_accuracy=history[-1].get("rewards/accuracies") if history else None,
        seconds=round(time.perf_counter() - started, 2), metrics_path=str(output_dir / "metrics.json"),
    )
    write_json_atomic(output_dir / "metrics.json", {**result.model_dump(mode="json"), "log_history": history})
    save_adapter(model, output_dir / "adapter", {"kind": DPO_MANIFEST_KIND, "fingerprint": fingerprint,
                                                 "result": result.model_dump(mode="json")})
    log.info("dpo: %d steps on %d pairs in %.0f s; margin %s -> %s", result.steps, len(pairs), result.seconds,
             result.margin_before, result.margin_after)
    return result


def finished_preference(output_dir: Path, fingerprint: str) -> PreferenceResult | None:
    """The result of a complete DPO adapter in `output_dir` made from the same inputs, else None."""
    import json

    from loraflow.training.checkpoints import ADAPTER_MANIFEST

    manifest_path = output_dir / "adapter" / ADAPTER_MANIFEST
    if not manifest_path.exists():
        return None
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("kind") != DPO_MANIFEST_KIND or manifest.get("fingerprint") != fingerprint:
        return None
    return PreferenceResult(**manifest["result"])


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None
