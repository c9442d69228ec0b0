"""Synthesizer registry: `kind` -> module that turns RAW rows into conversations.

Adding a synthesizer is one module in this folder plus one line in SYNTHESIZERS (docs/add_a_synthesizer.md walks
through it). The module defines (a module missing one is refused here, on import, by name):
- `Options`: the pydantic model of its options, a `description=` on every field; the config holds it under
  `synthesize.<kind>`. A model whose keys all have defaults is there by default; one with required keys (table_qa's
  fields and kinds) is None until set, and a run that uses the kind must set it;
- `synthesize(rows, options) -> (conversations, skipped)`: pure; frames as described in common.py;
- `required_columns(options) -> {config key: source column}`: checked before anything runs;
- `expansion(options) -> (units per input row, conversations per emitted unit)`: for the stage's row
  accounting (anime_qa: one unit per question kind, one conversation per phrasing; table_qa gives the second
  as {kind: conversations}, since its kinds may have different numbers of phrasings);
- `FACT_TYPES: {field: count | score | date | text}`: the type of every fact it renders (facts.py); a value
  that does not parse as its type skips the question with the reason, like a missing value.

The config is built from this registry (loraflow/config/synthesize.py: `synthesize.kind`'s values and one options
field per kind; loraflow/sources/common.py: a source's `synthesizer:` values), so a kind is named once, here.
A synthesizer kept outside this folder is added with `register_synthesizer` before the config is built.
"""

from loraflow.synthesizers import anime_qa, conversations, instruction, table_qa, text

SYNTHESIZERS = {
    "anime_qa": anime_qa,
    "table_qa": table_qa,
    "instruction": instruction,
    "conversations": conversations,
    "text": text,
}

INTERFACE = ("Options", "synthesize", "required_columns", "expansion")
GUIDE = "docs/add_a_synthesizer.md"
_kinds_handed_out = False  # set once the config has built its kinds from the registry


def missing_interface(module) -> list[str]:
    """The names of the synthesizer interface `module` does not define (FACT_TYPES must be a dict)."""
    missing = [name for name in INTERFACE if not callable(getattr(module, name, None))]
    return missing + ([] if isinstance(getattr(module, "FACT_TYPES", None), dict) else ["FACT_TYPES"])


def _refuse_incomplete(kind: str, module) -> None:
    if missing_interface(module):
        raise TypeError(f"synthesizer {kind!r} ({module.__name__}) lacks {missing_interface(module)} -> define them ({GUIDE})")


for _kind, _module in SYNTHESIZERS.items():
    _refuse_incomplete(_kind, _module)


def register_synthesizer(kind: str, module) -> None:
    """Add a synthesizer module kept outside this folder (a plug-in package, a test), as one more SYNTHESIZERS line.

    Call it before anything imports loraflow.config or loraflow.sources: they build the allowed kinds once.
    """
    _refuse_incomplete(kind, module)
    if _kinds_handed_out:
        raise RuntimeError(f"register_synthesizer({kind!r}) came after the config was built from the registry -> "
                           f"register it before importing loraflow.config, loraflow.sources, tasks or flows ({GUIDE})")
    if kind in SYNTHESIZERS and SYNTHESIZERS[kind] is not module:
        raise ValueError(f"synthesizer kind {kind!r} is taken by {SYNTHESIZERS[kind].__name__} -> choose another kind")
    SYNTHESIZERS[kind] = module


def synthesizer_kinds() -> tuple[str, ...]:
    """The registered kinds in registry order, for the config's `Literal`; registering closes from here on."""
    global _kinds_handed_out
    _kinds_handed_out = True
    return tuple(SYNTHESIZERS)


__all__ = ["SYNTHESIZERS", "INTERFACE", "missing_interface", "register_synthesizer", "synthesizer_kinds"]
