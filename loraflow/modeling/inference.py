"""Answers from a published model folder, streamed token by token (`loraflow ask`).

One call loads only what it uses (measured in benchmarks/results/ask_cpu.json): the tokenizer class the folder
names (no AutoConfig round trip), no pandas or pyarrow (loraflow.publishing.merge would bring them, so the run-info file
name is repeated here), and no weight-loading progress bar on the console.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

# = loraflow.publishing.merge.RUN_INFO (publish writes it); not imported: loraflow.publishing.merge imports pandas and pyarrow.
RUN_INFO = "loraflow.json"
# tokenizer_config.json classes that are the tokenizers backend itself (as loraflow.modeling.base_model.BACKEND_TOKENIZER_CLASSES,
# not imported for the same reason): loaded directly, they skip AutoTokenizer's AutoConfig lookup.
BACKEND_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def ask(model_dir: str | Path, question: str, stream: bool = True, *, max_new_tokens: int = 256,
        system_prompt: str | None = None, adapter_dir: str | Path | None = None) -> Iterator[str] | str:
    """Answer `question` greedily with a published model folder and its saved chat template.

    stream=True returns an iterator of text pieces as they are generated; stream=False the whole answer.
    The system prompt defaults to the one training used (stored in loraflow.json by publish). Control-token text
    in the question stays plain text, as it did in training (loraflow.modeling.prompt_encoding).
    `adapter_dir`: answer with `model_dir` (then the base model) plus this LoRA adapter, unmerged: a candidate the
    gate refused, which was never published.
    """
    from threading import Thread

    import torch
    from transformers import TextIteratorStreamer

    from loraflow.modeling.prompt_encoding import question_prompt_ids

    model_dir = Path(model_dir)
    if system_prompt is None:
        system_prompt = published_system_prompt(model_dir)
    tokenizer = load_published_tokenizer(model_dir)
    model = load_published_model(model_dir)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    prompt = torch.tensor([question_prompt_ids(tokenizer, question, system_prompt)], device=model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    settings = dict(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                    do_sample=False, streamer=streamer, temperature=None, top_p=None, top_k=None)
    worker = Thread(target=model.generate, kwargs=settings, daemon=True)
    worker.start()

    def pieces() -> Iterator[str]:
        for piece in streamer:
            yield piece
        worker.join()

    return pieces() if stream else "".join(pieces()).strip()


def published_system_prompt(model_dir: Path) -> str | None:
    """The system prompt training used, as publish stored it in the folder's loraflow.json (None without one)."""
    path = model_dir / RUN_INFO
    return json.loads(path.read_text(encoding="utf-8")).get("system_prompt") if path.exists() else None


def load_published_tokenizer(model_dir: Path):
    """The folder's tokenizer: its backend class directly where tokenizer_config.json names it, else AutoTokenizer."""
    config_path = model_dir / "tokenizer_config.json"
    named = json.loads(config_path.read_text(encoding="utf-8")).get("tokenizer_class") if config_path.exists() else None
    if named in BACKEND_TOKENIZER_CLASSES and (model_dir / "tokenizer.json").exists():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(model_dir)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def load_published_model(model_dir: Path):
    """The model in the precision this device computes fast (loraflow.modeling.precision), on the GPU if there is one, in
    eval mode; transformers' weight-loading progress bar stays off the console (a 135M model loads in a second)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    from loraflow.modeling.precision import choose_precision

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if choose_precision("auto", "cuda" if cuda else "cpu").precision == "bf16" else torch.float32
    bar_was_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map={"": 0} if cuda else None)
    finally:
        if bar_was_on:
            transformers_logging.enable_progress_bar()
    model.eval()
    return model
