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


def _model(nf4_folder=None):
    """A random bf16 Llama with LoRA on all linears; with `nf4_folder`, saved there and reloaded in NF4."""
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=HIDDEN, intermediate_size=2816, num_hidden_layers=LAYERS,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=ROW)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
    if nf4_folder is not None:
        if not (nf4_folder / "config.json").exists():
            model.save_pretrained(nf4_folder)
        nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        model = LlamaForCausalLM.from_pretrained(nf4_folder, quantization_config=nf4, dtype=torch.bfloat16,
                                                 device_map={"": 0})
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=False)
    torch.manual_seed(1)
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


def _step(offload: bool, batch, lean: bool = False, nf4_folder=None, timed: int = 0):
    """One forward+backward with every layer checkpointed: loss, LoRA grads, peak above the start, plan, and
    the median seconds of `timed` more steps."""
    import statistics
    import time

    from loraflow.config.train import TrainConfig
    from loraflow.training import configure_model_for_speed

    model = _model(nf4_folder)
    plan = configure_model_for_speed(model, TrainConfig(quantization="none"), memory_budget_gb=1e-3,
                                     tokens_per_micro_batch=ROWS * ROW, offload_checkpointed=offload,
                                     lean_recompute=lean)
    assert plan.checkpointed_layers == LAYERS and plan.offloaded_layers == (LAYERS if offload else 0)
    assert plan.lean_recompute is lean
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
    seconds = []
    for _ in range(timed):
        began = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(**batch).loss.backward()
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - began)
    return loss.detach().float(), grads, peak, plan, (statistics.median(seconds) if seconds else None)


def _worst_relative_difference(reference: dict, other: dict) -> float:
    """The largest max |other − reference| / max |reference| over every LoRA gradient (each must be nonzero)."""
    assert other.keys() == reference.keys() and len(reference) == LAYERS * 7 * 2
    worst = 0.0
    for name in reference:
        scale = reference[name].abs().max().item()
        assert scale > 0, name
        worst = max(worst, (other[name] - reference[name]).abs().max().item() / scale)
    return worst


def test_offloaded_checkpointing_matches_plain_checkpointing_on_cuda():
    batch = _batch()
    plain_loss, plain, plain_peak, plan, _ = _step(False, batch)
    loss, offloaded, peak, _, _ = _step(True, batch)
    torch.testing.assert_close(loss, plain_loss, atol=0, rtol=0)  # the forward is the same computation
    worst = _worst_relative_difference(plain, offloaded)
    # The recompute runs the same kernels on the same inputs: bit-identical in practice; bf16 tolerance allowed.
    assert worst < 1e-2
    # Plain checkpointing keeps all LAYERS bf16 layer inputs on the GPU through backward; offload at most two.
    input_bytes = ROWS * ROW * HIDDEN * 2
    saved = plain_peak - peak
    print(f"offload vs plain: loss {loss.item():.6f} = {plain_loss.item():.6f}, worst relative grad diff {worst:.2e}, "
          f"peak {plain_peak / 2**20:.0f} -> {peak / 2**20:.0f} MiB (saved {saved / 2**20:.0f}; "
          f"{LAYERS - 2} inputs = {(LAYERS - 2) * input_bytes / 2**20:.0f} MiB), fast path {plan.liger or 'no Liger'}")
    assert saved > 0.5 * (LAYERS - 2) * input_bytes


@pytest.mark.parametrize("offload", [False, True], ids=["on-gpu", "offloaded"])
def test_lean_recompute_on_nf4_gives_the_gradients_of_the_full_recompute(offload, tmp_path_factory):
    """NF4 base (bitsandbytes): down_proj's input gradient from the dequantized weight equals bitsandbytes' own."""
    folder = tmp_path_factory.getbasetemp() / "nf4-model"
    batch = _batch()
    full_loss, full, _, _, full_s = _step(offload, batch, lean=False, nf4_folder=folder, timed=5)
    lean_loss, lean, _, plan, lean_s = _step(offload, batch, lean=True, nf4_folder=folder, timed=5)
    torch.testing.assert_close(lean_loss, full_loss, atol=0, rtol=0)  # the forward pass is the same computation
    worst = _worst_relative_difference(full, lean)
    print(f"lean vs full recompute ({'offloaded' if offload else 'on GPU'}, NF4): loss {lean_loss.item():.6f}, worst "
          f"relative grad diff {worst:.2e}, step {full_s * 1e3:.1f} -> {lean_s * 1e3:.1f} ms")
    # bf16: the input gradient is summed in another order (one addmm instead of two GEMMs and an add).
    assert worst < 2e-2


def _whole_step(fuse_lora: bool, batch, nf4_folder, timed: int = 5):
    """One forward+backward with no layer checkpointed: loss, LoRA grads and the median seconds of `timed` more."""
    import statistics
    import time

    from loraflow.config.train import TrainConfig
    from loraflow.training import configure_model_for_speed

    model = _model(nf4_folder)
    plan = configure_model_for_speed(model, TrainConfig(quantization="none"), memory_budget_gb=1e3,
                                     tokens_per_micro_batch=ROWS * ROW, fuse_lora=fuse_lora)
    assert plan.checkpointed_layers == 0 and plan.lora_fused_layers == (LAYERS * 7 if fuse_lora else 0)
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    seconds = []
    for _ in range(timed):
        torch.cuda.synchronize()
        began = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(**batch).loss.backward()
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - began)
    return loss.detach().float(), grads, statistics.median(seconds)


def test_the_fused_lora_layer_on_nf4_gives_peft_s_loss_and_gradients(tmp_path_factory):
    """Training through `_LoraLinear` (one autograd function per LoRA layer, the input gradient in one buffer)
    against peft's own forward over bitsandbytes' NF4 layer."""
    folder = tmp_path_factory.getbasetemp() / "nf4-model"
    batch = _batch()
    peft_loss, peft_grads, peft_s = _whole_step(False, batch, folder)
    fused_loss, fused_grads, fused_s = _whole_step(True, batch, folder)
    worst = _worst_relative_difference(peft_grads, fused_grads)
    print(f"fused LoRA layer vs peft (NF4): loss {fused_loss.item():.6f} vs {peft_loss.item():.6f}, worst relative "
          f"grad diff {worst:.2e}, step {peft_s * 1e3:.1f} -> {fused_s * 1e3:.1f} ms")
    torch.testing.assert_close(fused_loss, peft_loss, atol=0, rtol=2e-3)  # bf16: the epilogue adds in another order
    assert worst < 2e-2
