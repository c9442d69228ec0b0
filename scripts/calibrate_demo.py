"""Calibrate the CPU demo: how many titles / epochs / which lr make SmolLM2-135M learn a fictional catalog.

Generates a fictional anime catalog (so the base model cannot know it), renders three question kinds with
trained and held-out phrasings, optionally adds replay rows (the base model's own answers to general
prompts, generated once), then runs the real train and evaluate stages and prints what the gate sees.

    python scripts/calibrate_demo.py --titles 12 --epochs 12 --lr 3e-3 --out /tmp/calibrate

Runs without Prefect. The data half's synthesizer replaces the generator here once the demo config exists.
"""

import argparse
import json
import random
import time
from pathlib import Path

import pandas as pd

from data_contracts.tokens import IGNORE_INDEX
from loraflow.config.evaluate import EvalConfig
from loraflow.config.model import ModelConfig
from loraflow.config.train import TrainConfig
from loraflow.modeling.base_model import resolve_model_dir

STUDIOS = ["Studio Kaze", "Mori Works", "Hoshizora", "Blue Kettle", "Studio Ren", "Aozora Pictures", "Kumo Lab", "Tsuki Animation"]
GENRES = ["mecha", "romance", "comedy", "horror", "sports", "fantasy", "mystery", "slice of life"]
FIRST = ["Starlit", "Iron", "Paper", "Silver", "Crimson", "Hidden", "Velvet", "Frozen", "Golden", "Quiet", "Electric", "Hollow",
         "Amber", "Wandering", "Broken", "Glass"]
SECOND = ["Ferry", "Lantern", "Comet", "Garden", "Orchestra", "Harbor", "Tower", "Circus", "Compass", "Meadow", "Engine", "Bridge",
          "Kite", "Lighthouse", "Archive", "Mirror"]
PHRASINGS = {
    "production": (["Which studio made {t}?", "Who produced the anime {t}?"], ["Tell me which studio is behind {t}."]),
    "reception": (["What is the score of {t}?", "How well was {t} rated?"], ["What rating did {t} get from viewers?"]),
    "overview": (["What genre is {t}?", "What kind of anime is {t}?"], ["Describe the genre of {t}."]),
}
GENERAL_REPLAY = [
    "What is the capital of Japan?", "What is 3 + 5?", "Name a primary color.", "What is the largest ocean?",
    "How many days are in a week?", "What do bees make?", "What is the boiling point of water in Celsius?",
    "Who wrote Romeo and Juliet?", "What planet do we live on?", "What is the opposite of hot?",
    "How many legs does a spider have?", "What is the chemical symbol for water?",
]
SYSTEM_PROMPT = "Answer briefly."


def catalog(titles: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    names = rng.sample([f"{a} {b}" for a in FIRST for b in SECOND], titles)
    return [{"title": n, "studio": rng.choice(STUDIOS), "episodes": rng.choice([12, 13, 24, 25, 26]),
             "score": f"{rng.uniform(6.0, 9.0):.2f}", "genre": rng.choice(GENRES)} for n in names]


def answer(row: dict, kind: str) -> tuple[str, list[dict]]:
    t = row["title"]
    if kind == "production":
        return f"{t} was made by {row['studio']} and has {row['episodes']} episodes.", [
            {"column": "Studios", "value": row["studio"]}, {"column": "Episodes", "value": str(row["episodes"])}]
    if kind == "reception":
        return f"{t} has a score of {row['score']}.", [{"column": "Score", "value": row["score"]}]
    return f"{t} is a {row['genre']} anime.", [{"column": "Genres", "value": row["genre"]}]


def prompt_of(tokenizer, question: str) -> str:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def tokens_rows(tokenizer, items: list[tuple]) -> pd.DataFrame:
    """items: (id, split, kind, source_id, question, answer, facts) -> TOKENS rows (answer + EOS trained)."""
    rows = []
    for item_id, split, kind, source, question, reply, facts in items:
        prompt = prompt_of(tokenizer, question)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(reply + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        ids = prompt_ids + answer_ids
        rows.append({"id": item_id, "input_ids": ids, "attention_mask": [1] * len(ids),
                     "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids, "length": len(ids), "n_trained": len(answer_ids),
                     "truncated": False, "split": split, "kind": kind, "source_id": source, "prompt": prompt,
                     "reference": reply, "facts": facts})
    return pd.DataFrame(rows)


def replay_answers(model_dir: Path, tokenizer, questions: list[str]) -> list[tuple[str, str]]:
    """(question, base answer) for answers that ended by themselves: a cut-off answer + EOS would teach rambling."""
    from loraflow.evaluation.generation import generate_answers, load_for_inference, stop_token_ids

    model = load_for_inference(model_dir)
    answers = generate_answers(model, tokenizer, [prompt_of(tokenizer, q) for q in questions], max_new_tokens=64,
                               batch_size=12, stop_ids=stop_token_ids(tokenizer, model_dir))
    return [(q, a["text"]) for q, a in zip(questions, answers) if a["stopped"]]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--titles", type=int, default=12)
    parser.add_argument("--epochs", type=float, default=12)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--schedule", default="linear")
    parser.add_argument("--replay", action="store_true", help="mix in the base model's own answers to general prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 on a shared machine)")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (3x slower on CPU, no need at 135M)")
    parser.add_argument("--out", default="/tmp/loraflow-calibrate")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from tasks.evaluate import evaluate_adapter
    from tasks.gate import gate_candidate
    from tasks.train import train_adapter

    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    out = Path(args.out)
    model_dir = resolve_model_dir(ModelConfig())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    items = []
    for index, row in enumerate(catalog(args.titles, args.seed)):
        for kind, (trained, heldout) in PHRASINGS.items():
            reply, facts = answer(row, kind)
            for n, phrasing in enumerate(trained):
                items.append((f"{index}-{kind}-t{n}", "train", kind, row["title"], phrasing.format(t=row["title"]), reply, facts))
            for n, phrasing in enumerate(heldout):
                items.append((f"{index}-{kind}-h{n}", "heldout", kind, row["title"], phrasing.format(t=row["title"]), reply, facts))
    replay_seconds = 0.0
    if args.replay:
        replay_started = time.perf_counter()
        for n, (question, reply) in enumerate(replay_answers(model_dir, tokenizer, GENERAL_REPLAY)):
            items.append((f"replay-{n}", "train", "replay", f"replay-{n}", question, reply, []))
        replay_seconds = time.perf_counter() - replay_started
    # Validation loss needs rows never trained on: one held-out phrasing per kind doubles as that.
    frame = tokens_rows(tokenizer, items)
    validation = frame[frame["split"] == "heldout"].head(6).assign(split="validation", id=lambda f: "v-" + f["id"])
    frame = pd.concat([frame, validation], ignore_index=True)

    train_config = TrainConfig(
        quantization="none", lora_r=args.rank, lora_alpha=2 * args.rank, learning_rate=args.lr, lr_scheduler=args.schedule,
        warmup_ratio=0.05, epochs=args.epochs, micro_batch_size=args.batch, checkpoint_every=1000, seed=args.seed,
        gradient_checkpointing=args.checkpointing, cpu_threads=args.threads,
    )
    trained = train_adapter(frame, model_dir, train_config, out / "train")
    eval_config = EvalConfig(max_new_tokens=48, batch_size=16, max_questions=400, cpu_threads=args.threads)
    evaluated = evaluate_adapter(frame, model_dir, trained.adapter_dir, eval_config, out / "eval", system_prompt=SYSTEM_PROMPT)
    report = {
        "settings": vars(args), "train_rows": trained.train_rows, "steps": trained.global_step,
        "train_seconds": trained.seconds, "replay_seconds": round(replay_seconds, 1), "eval_seconds": evaluated.seconds,
        "total_seconds": round(time.perf_counter() - started, 1), "final_loss": trained.final_loss,
        "base": evaluated.base, "finetuned": evaluated.finetuned, "gate": gate_candidate(evaluated, eval_config.gate).model_dump(),
    }
    (out / "calibration.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    print(open(evaluated.report_path).read())


if __name__ == "__main__":
    main()
