"""Config of the format stage: which prompt or chat template renders the conversations.

`template` allows the names in the template registry (loraflow/templates/), the one place a template is named.
"""

from typing import Literal

from pydantic import Field

from loraflow.config.base import StrictModel
from loraflow.templates import template_names

TemplateName = Literal[template_names()]


class FormatConfig(StrictModel):
    """How conversations become text; the same template is used for training and inference."""

    template: TemplateName = Field(
        "chat_template",
        description="chat_template (the tokenizer's own, default) | " + " | ".join(name for name in template_names() if name != "chat_template") + ".",
    )
    system_prompt: str | None = Field(
        None,
        description="System prompt added to conversations that have none. None keeps the template's own default.",
    )
    strip_whitespace: bool = Field(
        False,
        description=(
            "Strip whitespace at the edges of every message before rendering (counted in the format stats as "
            "whitespace_stripped_turns). False (default) keeps each message exactly as written (a code answer's "
            "indentation, a trailing newline); only the whitespace the template itself writes around turns is added."
        ),
    )
    verify_sample: int = Field(
        50,
        ge=0,
        le=10000,
        description=(
            "chat_template only: examples (a deterministic, evenly spread sample) on which the fast render is "
            "checked against apply_chat_template before it is used; any difference switches to per-example rendering."
        ),
    )
