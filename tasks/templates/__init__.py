"""Template registry: `FormatConfig.template` -> template class. Adding one is one file plus one line here."""

from tasks.templates.alpaca import Alpaca
from tasks.templates.base import Rendered, TokenizerFacts, render_text, user_parts, with_system
from tasks.templates.chat_template import ChatTemplate
from tasks.templates.chatml import ChatML
from tasks.templates.gemma import Gemma
from tasks.templates.ko_instruction import KoInstruction
from tasks.templates.llama2_chat import Llama2Chat

TEMPLATES = {
    "chat_template": ChatTemplate,
    "alpaca": Alpaca,
    "ko_instruction": KoInstruction,
    "llama2_chat": Llama2Chat,
    "gemma": Gemma,
    "chatml": ChatML,
}


def build_template(name: str, tokenizer):
    """The template `name`, set up for `tokenizer` (its EOS/BOS texts and special tokens)."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}: choose one of {sorted(TEMPLATES)}")
    facts = TokenizerFacts.probe(tokenizer)
    cls = TEMPLATES[name]
    return cls(facts, tokenizer) if cls is ChatTemplate else cls(facts)


__all__ = ["TEMPLATES", "ChatTemplate", "build_template", "Rendered", "TokenizerFacts", "render_text", "user_parts", "with_system"]
