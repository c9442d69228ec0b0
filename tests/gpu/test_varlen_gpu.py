"""Variable-length flash attention on CUDA (loraflow/training/varlen.py): a packed step of the fast path (bf16
autocast, Liger, fused LoRA, every layer checkpointed) gives the loss and LoRA gradients of flex attention's
block mask within bf16 tolerance, and each packed document the logits it has alone. The CPU twin (per-document
SDPA) is tests/test_varlen.py."""

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)"),
]

from tests.gpu.test_offload_gpu import LAYERS, ROW, ROWS, _batch, _model  # noqa: E402


def _step(attn_implementation: str, batch):
    from loraflow.config.train import TrainConfig
    from loraflow.training import configure_model_for_speed

    model = _model()
    plan = configure_model_for_speed(model, TrainConfig(quantization="none"), memory_budget_gb=1e-3,
                                     tokens_per_micro_batch=ROWS * ROW, attn_implementation=attn_implementation)
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach().float(), grads, plan


def test_varlen_step_matches_flex_on_cuda():
    from loraflow.training.varlen import VARLEN

    batch = _batch()
    flex_loss, flex, _ = _step("flex_attention", batch)
    loss, varlen, plan = _step(VARLEN, batch)
    assert plan.attn_implementation == VARLEN and plan.checkpointed_layers == LAYERS
    torch.testing.assert_close(loss, flex_loss, atol=2e-2, rtol=0)
    worst = max((varlen[n] - flex[n]).norm().item() / flex[n].norm().item() for n in flex)
    print(f"varlen vs flex: loss {loss.item():.6f} vs {flex_loss.item():.6f}, worst relative grad norm diff {worst:.2e}")
    assert worst < 5e-2


def test_varlen_packed_logits_equal_each_document_alone_on_cuda():
    from loraflow.training import PackedCollator, enable_document_masking, pack_examples
    from loraflow.training.varlen import VARLEN
    from tests.test_packing import _examples, _tiny_llama

    model = enable_document_masking(_tiny_llama(VARLEN)).to("cuda", torch.bfloat16)
    examples = _examples(12, seed=3)
    rows = pack_examples(examples, max_tokens=128)
    batch = PackedCollator(pad_token_id=0, pad_to_multiple_of=8)(rows)
    worst = 0.0
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"].cuda(), position_ids=batch["position_ids"].cuda()).logits.float()
        for r, row in enumerate(rows):
            for index, start, length in zip(row["example_indices"], row["cu_seqlens"], row["seq_lens"]):
                ids = torch.tensor([examples[index]["input_ids"]], device="cuda")
                alone = model(input_ids=ids, position_ids=torch.arange(ids.shape[1], device="cuda")[None]).logits[0].float()
                worst = max(worst, float((packed[r, start:start + length] - alone).abs().max()))
    print(f"varlen: max |packed - alone| = {worst:.3g} (bf16; the same documents through the same kernel, one at a time)")
    assert worst < 5e-2
