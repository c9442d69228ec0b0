"""Packed documents stay apart on the GPU path, in fp32: flex attention's block mask (the fast path's kernel), SDPA
and eager each give a packed document the logits it has alone. The same comparison as tests/test_packing.py,
on CUDA, so the fast path's isolation is proven exactly rather than read off a bf16 figure."""

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)"),
]


def test_flex_matches_sdpa_on_cuda():
    from tests.test_packing import flex_vs_sdpa_error

    torch.backends.cuda.matmul.allow_tf32 = False
    assert flex_vs_sdpa_error("cuda") < 1e-4


@pytest.mark.parametrize("attn_implementation", ["flex_attention", "sdpa", "eager"])
def test_packed_logits_equal_each_document_alone_on_cuda(attn_implementation):
    from tests.test_packing import assert_packed_logits_equal_each_document_alone

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: TF32 would round the comparison
    torch.backends.cudnn.allow_tf32 = False
    worst = assert_packed_logits_equal_each_document_alone(attn_implementation, device="cuda")
    print(f"{attn_implementation}: max |packed - alone| = {worst:.3g}")
