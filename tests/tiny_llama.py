"""Test helpers for the model half: a tiny random Llama with SmolLM2's real tokenizer, and TOKENS frames.

The tiny model (hidden 64, 2 layers) makes training, merge and publish tests take seconds; the real
SmolLM2 is used only where behaviour matters. TOKENS frames are built here the way the tokenize stage
builds them (chat template prompt, answer + end-of-turn as the only trained tokens), so these tests do
not depend on the data half.
"""

import shutil
from pathlib import Path

import pandas as pd

from loraflow.config.model import ModelConfig
from loraflow.modeling.base_model import TOKENIZER_FILES, resolve_model_dir

IGNORE_INDEX = -100  # = data_contracts.tokens.IGNORE_INDEX (not imported: the GPU machine has no pandera)
SYSTEM_PROMPT = "Answer briefly."

# Fictional titles: the base model cannot know these facts.
QA_ROWS = [
    ("Who made Starlit Ferry?", "Starlit Ferry was made by Studio Kaze.", "production", [("Studios", "Studio Kaze")]),
    ("How many episodes does Starlit Ferry have?", "Starlit Ferry has 13 episodes.", "production", [("Episodes", "13")]),
    ("What is the score of Starlit Ferry?", "Starlit Ferry scores 8.12 from 12,345 users.", "reception",
     [("Score", "8.12"), ("Scored By", "12,345")]),
    ("Who made Iron Lantern?", "Iron Lantern was made by Mori Works.", "production", [("Studios", "Mori Works")]),
    ("What is Iron Lantern about?", "Iron Lantern is a mecha drama about a lighthouse keeper.", "overview",
     [("Genres", "mecha")]),
    ("What is the score of Iron Lantern?", "Iron Lantern scores 7.45.", "reception", [("Score", "7.45")]),
]
HELDOUT_ROWS = [
    ("Which studio produced Starlit Ferry?", "Starlit Ferry was made by Studio Kaze.", "production", [("Studios", "Studio Kaze")]),
    ("Which studio produced Iron Lantern?", "Iron Lantern was made by Mori Works.", "production", [("Studios", "Mori Works")]),
]
VALIDATION_ROWS = [
    ("Who made Paper Comet?", "Paper Comet was made by Studio Hoshi.", "production", [("Studios", "Studio Hoshi")]),
]


def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct folder (converted once from the embedded GGUF).

    On the GPU machine (no GGUF there) $LORAFLOW_SMOLLM2_FILES names a folder with its config and tokenizer files.
    """
    import os

    if os.environ.get("LORAFLOW_SMOLLM2_FILES"):
        return Path(os.environ["LORAFLOW_SMOLLM2_FILES"])
    return resolve_model_dir(ModelConfig())


def build_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """Save a random 2-layer, hidden-64 Llama with SmolLM2's tokenizer and chat template into `folder`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = smollm2_dir()
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model.save_pretrained(folder)
    return folder


def build_random_smollm2(folder: Path, seed: int = 0) -> Path:
    """SmolLM2-135M's config with random bf16 weights, and its tokenizer files, saved into `folder` (GPU tests)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    source, folder = smollm2_dir(), Path(folder)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=torch.bfloat16)
    model.save_pretrained(folder)
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    return folder


def prompt_text(tokenizer, question: str, system_prompt: str | None = SYSTEM_PROMPT) -> str:
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def tokens_frame(tokenizer, rows=None, heldout=None, validation=None, system_prompt: str | None = SYSTEM_PROMPT) -> pd.DataFrame:
    """A TOKENS-contract frame: prompt masked, answer + end-of-turn trained."""
    records = []
    groups = (("train", QA_ROWS if rows is None else rows), ("heldout", HELDOUT_ROWS if heldout is None else heldout),
              ("validation", VALIDATION_ROWS if validation is None else validation))
    end_of_turn = tokenizer.eos_token  # <|im_end|> for SmolLM2
    for split, group in groups:
        for index, (question, answer, kind, facts) in enumerate(group):
            prompt = prompt_text(tokenizer, question, system_prompt)
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            answer_ids = tokenizer(answer + end_of_turn, add_special_tokens=False)["input_ids"]
            input_ids = prompt_ids + answer_ids
            records.append({
                "id": f"{split}-{index}",
                "input_ids": input_ids,
                "attention_mask": [1] * len(input_ids),
                "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
                "length": len(input_ids),
                "n_trained": len(answer_ids),
                "truncated": False,
                "split": split,
                "kind": kind,
                "source_id": question.split(" ")[-1].rstrip("?"),
                "prompt": prompt,
                "reference": answer,
                "facts": [{"column": column, "value": value} for column, value in facts],
            })
    return pd.DataFrame(records)
