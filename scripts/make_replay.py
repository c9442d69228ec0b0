"""Replay data for the demo: the base model's own answers to general prompts (self-distillation).

Mixed into fine-tuning, these keep the model's general behaviour from drifting while it learns the catalog.
Greedy answers are generated once with the demo's system prompt and committed as
data/sample/general_replay.jsonl ({instruction, output}); only answers that ended by themselves are kept.
Run: python scripts/make_replay.py [OUT]
"""

import json
import sys
from pathlib import Path

import torch

from loraflow.config.model import ModelConfig
from loraflow.modeling.base_model import resolve_model_dir
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
    # more of the kinds the general suite asks (loraflow/config/general_suite.py), never its own prompts
    "What is 4 + 4?", "What is 8 minus 5?", "What is 3 times 4?", "What is 20 divided by 5?", "What is 11 + 12?",
    "What is 50 minus 10?", "What is the capital of Portugal?", "What is the capital of Greece?",
    "What is the capital of Australia?", "What is the capital of India?", "How many weeks are in a year?",
    "How many millimeters are in a centimeter?", "What color is milk?", "What color are most leaves in summer?",
    "What color is an orange?", "Reply with only the word no.", "What is the plural of child?",
    "Which month comes after January?", "Spell the word dog backwards.", "Who painted the Mona Lisa?",
    "What is the tallest animal?", "If I have 5 pens and lose 2, how many pens do I have?", "What is 1 + 2 + 3?",
    "What is the opposite of big?",
]
OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "data" / "sample" / "general_replay.jsonl"


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
