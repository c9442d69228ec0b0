"""Attention alone on packed documents: flex attention's block mask (the fast path until 2026-12-03) vs torch's
variable-length flash attention (loraflow/training/varlen.py), forward + backward, Llama-3-8B's heads (issue 13).

    python benchmarks/attention_packed.py --out $OUT                 # on the GPU machine
    python benchmarks/attention_packed.py --device cpu --iters 1     # CPU dry run (per-document SDPA for varlen)

Packed rows of 4,096 tokens of synthetic QA documents (log-normal lengths, median 190, as train_throughput.py),
2 and 8 rows per micro-batch, and single long documents of 8k and 32k tokens. Median of --iters timed iterations
after 3 warm-ups; also the largest difference of each output from varlen's. Ratio = flex ms / varlen ms.
Writes attention_packed_<gpu>.json under --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import train_throughput as tt  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama-3-8B


def packed_position_ids(torch, rows: int, row_tokens: int, long_document: int | None, seed: int):
    """[rows, row_tokens] position ids of packed synthetic documents (or one long document per row)."""
    from loraflow.training import PackedCollator, pack_examples

    if long_document:
        return torch.arange(long_document)[None].repeat(rows, 1)
    examples = tt.synthetic_examples(rows * 40, row_tokens, vocab=1000, seed=seed)
    packed = pack_examples(examples, max_tokens=row_tokens)
    packed = random.Random(seed).sample(packed, rows)  # first-fit decreasing puts the longest documents first
    return PackedCollator(pad_token_id=0, pad_to_multiple_of=128)(packed)["position_ids"]


def attention_call(torch, implementation: str, position_ids, device):
    """A function (q, k, v) -> out [B, T, H, D] for one implementation, with its mask / lengths prepared once."""
    from loraflow.training.masking import document_causal_mask
    from loraflow.training.varlen import sequence_lengths, varlen_attention_forward

    module = torch.nn.Module()
    module.training = True
    if implementation == "varlen":
        cu, longest = sequence_lengths(position_ids.to(device))
        return lambda q, k, v: varlen_attention_forward(module, q, k, v, None, cu_seq_lens_q=cu, max_length_q=longest)[0]
    from transformers.integrations.flex_attention import flex_attention_forward

    block_mask = document_causal_mask(position_ids.to(device), "flex_attention")
    return lambda q, k, v: flex_attention_forward(module, q, k, v, block_mask)[0]


def time_case(torch, implementation: str, position_ids, args) -> dict:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    batch, length = position_ids.shape
    generator = torch.Generator(device="cpu").manual_seed(0)
    grad = device.type == "cuda"
    q = torch.randn(batch, HEADS, length, HEAD_DIM, generator=generator).to(device, dtype).requires_grad_(grad)
    k = torch.randn(batch, KV_HEADS, length, HEAD_DIM, generator=generator).to(device, dtype).requires_grad_(grad)
    v = torch.randn(batch, KV_HEADS, length, HEAD_DIM, generator=generator).to(device, dtype).requires_grad_(grad)
    grad_out = torch.randn(batch, length, HEADS, HEAD_DIM, generator=generator).to(device, dtype)
    call = attention_call(torch, implementation, position_ids, device)
    times = []
    for i in range(3 + args.iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = call(q, k, v)
        if device.type == "cuda":  # flex has no backward on a CPU: the dry run times forwards only
            out.backward(grad_out)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append((time.perf_counter() - start) * 1000)
        q.grad = k.grad = v.grad = None
    return {"ms": round(statistics.median(times), 3), "out": out.detach().float()}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    import torch

    cases = [("2 packed rows of 4k", 2, 4096, None), ("8 packed rows of 4k", 8, 4096, None),
             ("1 document of 8k", 1, 8192, 8192), ("1 document of 32k", 1, 32768, 32768)]
    if args.device != "cuda":
        cases = [("2 packed rows of 512 (CPU dry run)", 2, 512, None)]
    results = []
    for label, rows, row_tokens, long_document in cases:
        position_ids = packed_position_ids(torch, rows, row_tokens, long_document, args.seed)
        documents = int((position_ids == 0).sum())
        timed = {name: time_case(torch, name, position_ids, args) for name in ("flex", "varlen")}
        row = {"case": label, "tokens": position_ids.numel(), "documents": documents,
               "flex_ms": timed["flex"]["ms"], "varlen_ms": timed["varlen"]["ms"],
               "ratio": round(timed["flex"]["ms"] / timed["varlen"]["ms"], 3),
               "max_abs_diff": float((timed["flex"]["out"] - timed["varlen"]["out"]).abs().max())}
        results.append(row)
        print(f"{label:>34}: {documents:4d} documents | flex {row['flex_ms']:8.2f} ms | varlen {row['varlen_ms']:8.2f} ms"
              f" | flex/varlen {row['ratio']:.2f} | max |diff| {row['max_abs_diff']:.3g}", flush=True)
    gpu = tt.gpu_name() if args.device == "cuda" else "cpu"
    record = {"what": "attention forward + backward, Llama-3-8B heads (32 q, 8 kv, head 128), bf16 on CUDA",
              "gpu": gpu, "cases": results, "torch": torch.__version__,
              "command": "python benchmarks/attention_packed.py " + " ".join(shlex.quote(a) for a in argv),
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"attention_packed_{gpu}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
