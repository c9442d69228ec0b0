"""Model work of paraphrase augmentation: a local chat model rewrites question templates, sampled and seeded.

Each template is its own `generate` call (one prompt, `count` samples, no padding) seeded from the seed and the
template's text, so a template's samples do not depend on which other templates are asked, nor on their order.
The prompt shows one worked example and asks to keep the {placeholders} as written; whether the model did is for
the filters to judge (tasks/paraphrase_filters.py), not for this module.
"""

from __future__ import annotations

import hashlib

SYSTEM = ("You rewrite questions in other words. Keep every word in curly braces, such as {name}, exactly as "
          "written. Reply with the rewritten question only.")
EXAMPLE = ("Where is the tea {name} grown?", "In which region is the tea {name} grown?")


def request(template: str, keys: list[str]) -> str:
    """The user turn that asks for one rewrite of `template`, naming the placeholders to keep."""
    kept = ", ".join(f"{{{key}}}" for key in keys) or "the words in curly braces"
    return f"Rewrite this question in other words, keeping {kept} as it is: {template}"


def prompt_messages(template: str, keys: list[str]) -> list[dict]:
    """The chat turns sent to the model: the instruction, one worked example, the request."""
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": request(EXAMPLE[0], ["name"])},
            {"role": "assistant", "content": EXAMPLE[1]},
            {"role": "user", "content": request(template, keys)}]


def template_seed(seed: int, template: str) -> int:
    """The sampling seed of one template: depends on the seed and the template's text only."""
    return int.from_bytes(hashlib.blake2b(f"{seed}\x1f{template}".encode(), digest_size=4).digest(), "little")


def sample_paraphrases(model, tokenizer, requests: list[tuple[str, list[str]]], *, count: int, temperature: float,
                       max_new_tokens: int, seed: int, stop_ids: list[int], progress: str | None = "paraphrase") -> list[list[str]]:
    """For each (template, placeholders to keep): `count` sampled rewrites, as decoded text (special tokens removed)."""
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    samples = []
    for template, keys in tqdm(requests, desc=progress or "paraphrase", disable=progress is None):
        text = tokenizer.apply_chat_template(prompt_messages(template, keys), add_generation_prompt=True, tokenize=False)
        encoded = tokenizer(text, add_special_tokens=False, return_tensors="pt").to(device)
        torch.manual_seed(template_seed(seed, template))
        with torch.inference_mode():
            output = model.generate(
                **encoded, do_sample=True, temperature=temperature, top_p=0.95, top_k=None,
                num_return_sequences=count, max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad_id,
            )
        new_tokens = output[:, encoded["input_ids"].shape[1]:]
        samples.append([tokenizer.decode(tokens, skip_special_tokens=True) for tokens in new_tokens])
    return samples
