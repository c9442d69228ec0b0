"""Run a published GGUF in llama.cpp (through `llama-cpp-python`, where installed) the way a user's chat would.

llama.cpp formats the conversation with the chat template stored in the GGUF (`tokenizer.chat_template`) and stops
at the GGUF's EOS / end-of-turn ids, so an answer that matches transformers' and ends with finish_reason "stop"
shows that the file carries what stopping needs (tests/test_gguf_llama_cpp.py, scripts/gguf_in_llama_cpp.py).
"""

from __future__ import annotations

from pathlib import Path


def llama_cpp_answer(gguf_path: str | Path, question: str, *, system_prompt: str | None = None,
                     max_tokens: int = 128) -> tuple[str, str]:
    """Greedy answer of the GGUF in llama.cpp to `question` and why it ended ("stop": an end-of-turn / EOS token,
    "length": `max_tokens` ran out). Raises ImportError naming the package when llama-cpp-python is missing."""
    try:
        from llama_cpp import Llama
    except ImportError as error:
        raise ImportError("llama-cpp-python is not installed: pip install llama-cpp-python (a source build; "
                          "docs/tracking-and-export.md, 'Run it in llama.cpp / Ollama')") from error

    llm = Llama(model_path=str(gguf_path), n_ctx=1024, n_threads=1, seed=0, verbose=False)
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": question}]
    reply = llm.create_chat_completion(messages=messages, temperature=0.0, top_k=1, max_tokens=max_tokens)
    choice = reply["choices"][0]
    return choice["message"]["content"].strip(), choice["finish_reason"]
