"""Replay data for the demo: the base model's own answers to general prompts (self-distillation).

Mixed into fine-tuning, these keep the model's general behaviour from drifting while it learns the catalog.
Greedy answers are generated once with the demo's system prompt and committed as
data/sample/general_replay.jsonl ({instruction, output}); only answers that ended by themselves are kept.
Run: python scripts/make_replay.py
"""

import json
from pathlib import Path

import torch

from loraflow.config.model import ModelConfig
from loraflow.models import resolve_model_dir
from transformers import AutoTokenizer

from loraflow.evaluation.generation import generate_answers, load_for_inference, stop_token_ids

SYSTEM_PROMPT = "You are an anime catalog assistant."
PROMPTS = [
    "What is the capital of France?", "What is 2 + 2?", "What color is the sky on a clear day?",
    "How many days are in a week?", "What is the largest planet in our solar system?", "What do bees make?",
    "What is the boiling point of water in Celsius?", "Name a primary color.", "What language is spoken in Spain?",
    "How many legs does a spider have?", "What is the opposite of hot?", "What gas do plants take in?",
    "What is 10 minus 3?", "Which animal is known as the king of the jungle?", "What is frozen water called?",
    "How many hours are in a day?", "What is the capital of Japan?", "What do you call a baby cat?",
    "What is the chemical symbol for gold?", "Which season comes after winter?",
]
OUT = Path(__file__).resolve().parent.parent / "data" / "sample" / "general_replay.jsonl"


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model_dir = resolve_model_dir(ModelConfig())
    model, tokenizer = load_for_inference(model_dir), AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": q}],
                                             tokenize=False, add_generation_prompt=True) for q in PROMPTS]
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=64, batch_size=10,
                               stop_ids=stop_token_ids(tokenizer, model_dir))
    kept = [{"instruction": q, "input": "", "output": a["text"].strip()} for q, a in zip(PROMPTS, answers)
            if a["stopped"] and a["text"].strip()]
    OUT.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in kept), encoding="utf-8")
    print(f"{OUT}: {len(kept)} of {len(PROMPTS)} answers kept")


if __name__ == "__main__":
    main()
