"""Ask a published model the same question in transformers and in llama.cpp (its GGUF) and print both answers.

    python scripts/gguf_in_llama_cpp.py .loraflow/runs/anime-demo/<run>/model "How many episodes does ... have?"

Needs `publish.gguf` in the run's config and llama-cpp-python installed (docs/tracking-and-export.md, "Run it in llama.cpp / Ollama").
"""

import argparse
import json
from pathlib import Path

from loraflow.modeling.inference import ask, published_system_prompt
from loraflow.publishing.llama_cpp import llama_cpp_answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("question")
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    gguf_files = sorted(args.model_dir.glob("model-*.gguf"))
    if not gguf_files:
        raise SystemExit(f"{args.model_dir}: no model-*.gguf (set publish.gguf in the run's config)")
    system_prompt = published_system_prompt(args.model_dir)
    transformers_answer = ask(args.model_dir, args.question, stream=False, max_new_tokens=args.max_tokens)
    results = {"question": args.question, "system_prompt": system_prompt, "transformers": transformers_answer}
    for path in gguf_files:
        answer, finish_reason = llama_cpp_answer(path, args.question, system_prompt=system_prompt, max_tokens=args.max_tokens)
        results[path.name] = {"answer": answer, "finish_reason": finish_reason, "same": answer == transformers_answer}
    print(json.dumps(results, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
