"""Packed documents through variable-length attention (loraflow/training/varlen.py): the document lengths the
decoder's hook computes, and the same loss and gradients as SDPA with the per-document mask. On a CPU the
attention runs each document through SDPA; the flash kernel itself is compared on CUDA (tests/gpu/test_varlen_gpu.py)."""

import torch

from loraflow.training import PackedCollator, enable_document_masking, pack_examples
from loraflow.training.varlen import VARLEN, per_document_attention, sequence_lengths
from tests.test_packing import _examples, _tiny_llama


def test_sequence_lengths_of_a_padded_packed_batch():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]])
    cu_seq_lens, longest = sequence_lengths(position_ids)
    assert cu_seq_lens.dtype == torch.int32
    assert cu_seq_lens.tolist() == [0, 3, 5, 8, 12, 16] and longest == 4


def test_per_document_attention_keeps_documents_apart_with_grouped_heads():
    torch.manual_seed(0)
    q, k, v = torch.randn(10, 4, 8), torch.randn(10, 2, 8), torch.randn(10, 2, 8)
    cu_seq_lens = torch.tensor([0, 4, 10], dtype=torch.int32)
    out = per_document_attention(q, k, v, cu_seq_lens)
    # The second document's output does not change when the first one's keys and values do.
    k2, v2 = k.clone(), v.clone()
    k2[:4], v2[:4] = torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    torch.testing.assert_close(per_document_attention(q, k2, v2, cu_seq_lens)[4:], out[4:])
    # The first token of a document sees only itself: its output is its own value (per query-head group).
    torch.testing.assert_close(out[4], v[4].repeat_interleave(2, dim=0))


def test_varlen_loss_and_gradients_equal_sdpa_with_the_document_mask():
    examples = _examples(16, seed=7)
    batch = PackedCollator(pad_token_id=0, pad_to_multiple_of=8)(pack_examples(examples, max_tokens=96))
    results = {}
    for implementation in ("sdpa", VARLEN):
        model = enable_document_masking(_tiny_llama(implementation)).train()
        loss = model(**batch).loss
        loss.backward()
        results[implementation] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (sdpa_loss, sdpa_grads), (varlen_loss, varlen_grads) = results["sdpa"], results[VARLEN]
    torch.testing.assert_close(varlen_loss, sdpa_loss, atol=1e-6, rtol=1e-5)
    for name, grad in sdpa_grads.items():
        torch.testing.assert_close(varlen_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_the_fast_path_picks_varlen_on_cuda_flex_without_it_or_with_attention_dropout(monkeypatch):
    from loraflow.training import speed

    model = _tiny_llama("sdpa")
    assert speed.default_attention(model, on_cuda=False) == "sdpa"
    monkeypatch.setattr(speed, "varlen_available", lambda: True)
    assert speed.default_attention(model, on_cuda=True) == VARLEN
    model.config.attention_dropout = 0.1  # varlen has no dropout
    assert speed.default_attention(model, on_cuda=True) == "flex_attention"
    model.config.attention_dropout = 0.0
    monkeypatch.setattr(speed, "varlen_available", lambda: False)  # torch without torch.nn.attention.varlen
    assert speed.default_attention(model, on_cuda=True) == "flex_attention"
