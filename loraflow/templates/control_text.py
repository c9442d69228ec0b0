"""Data that spells a control token: `<|im_end|>` typed inside a message is text, never the real token.

A template writes control tokens (ChatML's `<|im_start|>assistant`, `<|im_end|>`) as text, and the tokenizer
turns that text into the control tokens. A message whose content holds the same text would be tokenized the
same way: the model would learn to stop mid-answer, or see a forged turn. So before rendering, each control
text inside a content is swapped for a private-use placeholder character; after rendering, the placeholders
are put back and their character spans recorded (`literal_spans`). The tokenize stage encodes those spans as
plain characters (the tokenizer's own `encode_special_tokens`, i.e. `split_special_tokens`), so only what the
template wrote becomes a control token. The rows are counted and warned about.
"""

import re

from loraflow.templates.base import Rendered

FIRST_PLACEHOLDER = 0xF0000  # Supplementary Private Use Area-A: no tokenizer or template gives it a meaning


class ControlTextGuard:
    """Escapes the tokenizer's control texts in message contents and restores them after rendering."""

    def __init__(self, control_texts):
        self.texts = sorted(control_texts, key=len, reverse=True)  # longest first: `<|im_start|>` before `<|`
        self.placeholder = {text: chr(FIRST_PLACEHOLDER + i) for i, text in enumerate(self.texts)}
        self.original = {ord(char): text for text, char in self.placeholder.items()}
        self.pattern = re.compile("|".join(map(re.escape, self.texts))) if self.texts else None
        self.placeholders = re.compile("[" + "".join(self.placeholder.values()) + "]") if self.texts else None

    def escape(self, messages: list[dict]) -> tuple[list[dict], bool]:
        """(messages with control texts in contents replaced by placeholders, whether any content held one)."""
        if self.pattern is None or not any(self.pattern.search(m["content"]) for m in messages):
            return messages, False
        if any(self.placeholders.search(m["content"]) for m in messages):
            raise ValueError("a message holds a private-use character (U+F0000...) that control-text escaping needs")
        escaped = [{**m, "content": self.pattern.sub(lambda match: self.placeholder[match.group()], m["content"])}
                   for m in messages]
        return escaped, True

    def restore(self, rendered: Rendered) -> tuple[Rendered, list[int]]:
        """The render with the control texts back, and their spans in the full text as [start, end, start, end, ...]."""
        segments, spans, position = [], [], 0
        for text, trained in rendered.segments:
            pieces, last = [], 0
            for match in self.placeholders.finditer(text):
                pieces.append(text[last:match.start()])
                original = self.original[ord(match.group())]
                start = position + sum(map(len, pieces))
                spans += [start, start + len(original)]
                pieces.append(original)
                last = match.end()
            pieces.append(text[last:])
            restored = "".join(pieces)
            segments.append((restored, trained))
            position += len(restored)
        return Rendered(tuple(segments), rendered.prompt.translate(self.original),
                        rendered.reference.translate(self.original)), spans
