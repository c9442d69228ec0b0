"""Template registry: `format.template` -> template class.

Adding a template is one module in this folder (a class, usually a `TurnTemplate` with its fixed texts) plus one
line in TEMPLATES (docs/add_a_template.md walks through it). A template class has `name` (its registry key),
is built as `cls(facts, tokenizer)` and has `render(messages) -> Rendered` and `stop_texts()`; a class lacking
one is refused here, on import, by name. Templates have no options of their own: `format.system_prompt` and
`format.strip_whitespace` apply to all of them.

The config is built from this registry (loraflow/config/format.py: `format.template`'s allowed values), so a
template is named once, here. A template kept outside this folder is added with `register_template` before the
config is built.
"""

from loraflow.templates.alpaca import Alpaca
from loraflow.templates.base import Rendered, TokenizerFacts, TurnTemplate, render_text, user_parts, with_system
from loraflow.templates.chat_template import ChatTemplate
from loraflow.templates.chatml import ChatML
from loraflow.templates.gemma import Gemma
from loraflow.templates.ko_instruction import KoInstruction
from loraflow.templates.llama2_chat import Llama2Chat

TEMPLATES = {
    "chat_template": ChatTemplate,
    "alpaca": Alpaca,
    "ko_instruction": KoInstruction,
    "llama2_chat": Llama2Chat,
    "gemma": Gemma,
    "chatml": ChatML,
}

INTERFACE = ("render", "stop_texts")
GUIDE = "docs/add_a_template.md"
_names_handed_out = False  # set once the config has built its template names from the registry


def interface_problems(name: str, template_class) -> list[str]:
    """What keeps `template_class` from serving as template `name` (a missing method, another `name`); [] if none."""
    problems = [f"no {method}()" for method in INTERFACE if not callable(getattr(template_class, method, None))]
    if getattr(template_class, "name", None) != name:
        problems.append(f"its `name` is {getattr(template_class, 'name', None)!r}, not {name!r}")
    return problems


def _refuse_incomplete(name: str, template_class) -> None:
    if interface_problems(name, template_class):
        raise TypeError(f"template {name!r} ({template_class.__module__}.{template_class.__qualname__}): "
                        f"{'; '.join(interface_problems(name, template_class))} -> fix the class ({GUIDE})")


for _name, _class in TEMPLATES.items():
    _refuse_incomplete(_name, _class)


def register_template(name: str, template_class) -> None:
    """Add a template class kept outside this folder (a plug-in package, a test), as one more TEMPLATES line.

    Call it before anything imports loraflow.config: it builds the allowed names once.
    """
    _refuse_incomplete(name, template_class)
    if _names_handed_out:
        raise RuntimeError(f"register_template({name!r}) came after the config was built from the registry -> "
                           f"register it before importing loraflow.config, tasks or flows ({GUIDE})")
    if name in TEMPLATES and TEMPLATES[name] is not template_class:
        raise ValueError(f"template name {name!r} is taken by {TEMPLATES[name].__qualname__} -> choose another name")
    TEMPLATES[name] = template_class


def template_names() -> tuple[str, ...]:
    """The registered names in registry order, for the config's `Literal`; registering closes from here on."""
    global _names_handed_out
    _names_handed_out = True
    return tuple(TEMPLATES)


def build_template(name: str, tokenizer):
    """The template `name`, set up for `tokenizer` (its EOS/BOS texts and special tokens)."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}: choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name](TokenizerFacts.probe(tokenizer), tokenizer)


__all__ = ["TEMPLATES", "INTERFACE", "ChatTemplate", "Rendered", "TokenizerFacts", "TurnTemplate", "build_template",
           "interface_problems", "register_template", "render_text", "template_names", "user_parts", "with_system"]
