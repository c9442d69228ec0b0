"""Prompts for generation in which message text is never a control token (`loraflow ask`, evaluation).

A chat template writes control tokens as text (ChatML's `<|im_start|>assistant`, `<|im_end|>`) and the tokenizer
turns that text into the tokens. A question that holds the same text would become the same tokens: a forged turn,
or an end of turn in the middle of the question. Training never encodes data that way (the format stage marks
such text, `literal_spans`, and tokenize encodes it as plain characters); prompts built here do the same:

    ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": "What does <|im_end|> mean?"}])
    ids = question_prompt_ids(tokenizer, "What does <|im_end|> mean?", system_prompt)  # the same, one question

Each control text inside a message is swapped for a private-use placeholder, the chat template renders, and the
text between the template's own control tokens is encoded with the tokenizer's `encode_special_tokens`
(split_special_tokens) once the placeholders are put back. The tokenizer splits its input at control tokens
anyway, so a prompt without control text in its messages gets exactly `apply_chat_template`'s ids.
Light on purpose (no pandas, no torch): `loraflow ask` imports it on every call.
"""

from __future__ import annotations

import re

FIRST_PLACEHOLDER = 0xF0000  # Supplementary Private Use Area-A, as loraflow/templates/control_text.py uses


def control_texts(tokenizer) -> list[str]:
    """The text of every special token the tokenizer knows, longest first (`<|im_start|>` before `<|`)."""
    texts = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    texts.update(tokenizer.all_special_tokens)
    return sorted((text for text in texts if text), key=len, reverse=True)


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` rendered by the tokenizer's chat template with the generation prompt added; control
    text inside a message's content is encoded as plain characters, the template's own control tokens as tokens."""
    texts = control_texts(tokenizer)
    pattern = re.compile("|".join(map(re.escape, texts))) if texts else None
    if pattern is None or not any(pattern.search(message["content"]) for message in messages):
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    placeholder = {text: chr(FIRST_PLACEHOLDER + index) for index, text in enumerate(texts)}
    if any(char in message["content"] for message in messages for char in placeholder.values()):
        raise ValueError("a message holds a private-use character (U+F0000...) that control-text escaping needs")
    escaped = [{**message, "content": pattern.sub(lambda match: placeholder[match.group()], message["content"])}
               for message in messages]
    rendered = tokenizer.apply_chat_template(escaped, add_generation_prompt=True, tokenize=False)
    return encode_between_control_tokens(tokenizer, rendered, pattern, {ord(c): t for t, c in placeholder.items()})


def question_prompt_ids(tokenizer, question: str, system_prompt: str | None = None) -> list[int]:
    """A single question (after the system prompt, if any) as chat_prompt_ids encodes it, ready to answer."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": question}]
    return chat_prompt_ids(tokenizer, messages)


def encode_between_control_tokens(tokenizer, rendered: str, pattern: re.Pattern, originals: dict[int, str]) -> list[int]:
    """Encode `rendered`: each control text `pattern` finds (all written by the template) as its token, the text
    between them with placeholders replaced by `originals` and encoded as plain characters."""
    backend = tokenizer.backend_tokenizer
    ids, position = [], 0
    for match in [*pattern.finditer(rendered), None]:
        end = match.start() if match else len(rendered)
        if end > position:
            backend.encode_special_tokens = True
            try:
                ids += backend.encode(rendered[position:end].translate(originals), add_special_tokens=False).ids
            finally:
                backend.encode_special_tokens = False
        if match:
            ids += backend.encode(match.group(), add_special_tokens=False).ids
            position = match.end()
    return ids
