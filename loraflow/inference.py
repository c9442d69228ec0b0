"""Answers from a published model folder, streamed token by token (`loraflow ask`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from loraflow.merging import RUN_INFO


def ask(model_dir: str | Path, question: str, stream: bool = True, *, max_new_tokens: int = 256,
        system_prompt: str | None = None) -> Iterator[str] | str:
    """Answer `question` greedily with a published model folder and its saved chat template.

    stream=True returns an iterator of text pieces as they are generated; stream=False the whole answer.
    The system prompt defaults to the one training used (stored in loraflow.json by publish).
    """
    from threading import Thread

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

    model_dir = Path(model_dir)
    if system_prompt is None and (model_dir / RUN_INFO).exists():
        system_prompt = json.loads((model_dir / RUN_INFO).read_text()).get("system_prompt")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    from loraflow.precision import choose_precision

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if choose_precision("auto", "cuda" if cuda else "cpu").precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map={"": 0} if cuda else None)
    model.eval()
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": question}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True).to(model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    settings = dict(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                    temperature=None, top_p=None, top_k=None)
    worker = Thread(target=model.generate, kwargs=settings, daemon=True)
    worker.start()

    def pieces() -> Iterator[str]:
        for piece in streamer:
            yield piece
        worker.join()

    return pieces() if stream else "".join(pieces()).strip()
