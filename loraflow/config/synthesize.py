"""Config of the synthesize stage: which synthesizer turns source rows into conversations, and their options.

Built from the synthesizer registry (loraflow/synthesizers/), the one place a kind is named: `kind` allows the
registered kinds, and each kind has a field named like it that holds its module's `Options`. The YAML reads
`synthesize: {kind: instruction, instruction: {output_column: answer}}`.
"""

from typing import Literal

from pydantic import Field, ValidationError, create_model, model_validator

from loraflow.config.base import StrictModel
from loraflow.synthesizers import SYNTHESIZERS, synthesizer_kinds

SynthesizerKind = Literal[synthesizer_kinds()]


def has_defaults(options_model: type[StrictModel]) -> bool:
    """Whether the options can be left out: the model builds with no keys set."""
    try:
        options_model()
    except ValidationError:
        return False
    return True


def options_summary(kind: str) -> str:
    """The first line of a kind's options docstring (what they hold), for descriptions and errors."""
    return (SYNTHESIZERS[kind].Options.__doc__ or f"options of {kind}").strip().splitlines()[0].rstrip(".")


def options_field(kind: str) -> tuple:
    """The (type, Field) of `synthesize.<kind>`: its defaults, or None until set where some keys are required."""
    options_model = SYNTHESIZERS[kind].Options
    if has_defaults(options_model):
        return options_model, Field(default_factory=options_model, description=f"Options for kind={kind}.")
    return options_model | None, Field(None, description=(
        f"Options for kind={kind}; required when synthesize.kind or a source's `synthesizer:` is {kind}."))


def missing_options(kind: str) -> str:
    """The fix for a kind in use whose options (required keys) are not set."""
    return f"declare synthesize.{kind} ({options_summary(kind)})"


class SynthesizerChoice(StrictModel):
    """The synthesizer to run; the options fields, one per kind, are added from the registry below."""

    kind: SynthesizerKind = Field("anime_qa", description="Synthesizer: " + " | ".join(synthesizer_kinds()) + ".")

    @model_validator(mode="after")
    def _options_declared(self):
        if getattr(self, self.kind) is None:
            raise ValueError(f"kind is {self.kind} but synthesize.{self.kind} is not set -> {missing_options(self.kind)}")
        return self


SynthesizeConfig = create_model(
    "SynthesizeConfig", __base__=SynthesizerChoice, __module__=__name__,
    __doc__="Which synthesizer to run, and its options.",
    **{kind: options_field(kind) for kind in synthesizer_kinds()},
    duplicate_ids=(Literal["first", "last", "none"], Field(
        "first", description="Rows that share a source id but state different facts (e.g. two episode counts): keep "
        "the first in input order, the last, or none; the others are quarantined with the reason "
        "'duplicate id with different facts'. Rows of one id that agree are kept (tokenize removes exact duplicates).",
    )),
)
