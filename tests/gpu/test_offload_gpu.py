"""Offloaded checkpointing on CUDA (pinned host copies on a side stream, prefetch one layer ahead): the fast path's
packed step gives the loss and LoRA gradients of plain checkpointing, under bf16 autocast, and holds fewer layer
inputs on the GPU. The CPU twin (no streams) is tests/test_offload.py."""

import random

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)"),
]

HIDDEN, LAYERS, ROW, ROWS = 1024, 8, 2048, 4


def _model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=HIDDEN, intermediate_size=2816, num_hidden_layers=LAYERS,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=ROW)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=False)
    return get_peft_model(model, lora)


def _batch():
    from loraflow.training import PackedCollator, pack_examples

    rng = random.Random(0)
    examples = []
    for _ in range(60):
        ids = [rng.randrange(3, 4096) for _ in range(rng.randrange(40, 300))]
        examples.append({"input_ids": ids, "labels": ids})
    rows = pack_examples(examples, max_tokens=ROW)[:ROWS]
    return {k: v.cuda() for k, v in PackedCollator(pad_token_id=0)(rows).items() if hasattr(v, "cuda")}


def _step(offload: bool, batch):
    from loraflow.config.train import TrainConfig
    from loraflow.training import configure_model_for_speed

    model = _model()
    plan = configure_model_for_speed(model, TrainConfig(quantization="none"), memory_budget_gb=1e-3,
                                     tokens_per_micro_batch=ROWS * ROW, offload_checkpointed=offload)
    assert plan.checkpointed_layers == LAYERS and plan.offloaded_layers == (LAYERS if offload else 0)
    model.train()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - start
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach().float(), grads, peak, plan


def test_offloaded_checkpointing_matches_plain_checkpointing_on_cuda():
    batch = _batch()
    plain_loss, plain, plain_peak, plan = _step(False, batch)
    loss, offloaded, peak, _ = _step(True, batch)
    torch.testing.assert_close(loss, plain_loss, atol=0, rtol=0)  # the forward is the same computation
    assert offloaded.keys() == plain.keys() and len(plain) == LAYERS * 7 * 2
    worst = 0.0
    for name in plain:
        scale = plain[name].abs().max().item()
        assert scale > 0, name
        worst = max(worst, (offloaded[name] - plain[name]).abs().max().item() / scale)
    # The recompute runs the same kernels on the same inputs: bit-identical in practice; bf16 tolerance allowed.
    assert worst < 1e-2
    # Plain checkpointing keeps all LAYERS bf16 layer inputs on the GPU through backward; offload at most two.
    input_bytes = ROWS * ROW * HIDDEN * 2
    saved = plain_peak - peak
    print(f"offload vs plain: loss {loss.item():.6f} = {plain_loss.item():.6f}, worst relative grad diff {worst:.2e}, "
          f"peak {plain_peak / 2**20:.0f} -> {peak / 2**20:.0f} MiB (saved {saved / 2**20:.0f}; "
          f"{LAYERS - 2} inputs = {(LAYERS - 2) * input_bytes / 2**20:.0f} MiB), fast path {plan.liger or 'no Liger'}")
    assert saved > 0.5 * (LAYERS - 2) * input_bytes
