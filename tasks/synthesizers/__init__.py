"""Synthesizer registry: `kind` -> module turning RAW rows into conversations.

Each module has:
- `synthesize(rows, options) -> (conversations, skipped)`: pure; frames as described in common.py;
- `required_columns(options) -> {config key: source column}`: checked before anything runs;
- `expansion(options) -> (units per input row, conversations per emitted unit)`: for the stage's row
  accounting (anime_qa: one unit per question kind, one conversation per phrasing; table_qa gives the second
  as {kind: conversations}, since its kinds may have different numbers of phrasings);
- `FACT_TYPES: {field: count | score | date | text}`: the type of every fact it renders (facts.py); a value
  that does not parse as its type skips the question with the reason, like a missing value.
Adding one is a module here, a line below, an options model in loraflow/config/synthesize.py (the
SynthesizeConfig field is named like the kind) and a test like tests/test_synthesize.py's.
"""

from tasks.synthesizers import anime_qa, conversations, instruction, table_qa, text

SYNTHESIZERS = {
    "anime_qa": anime_qa,
    "table_qa": table_qa,
    "instruction": instruction,
    "conversations": conversations,
    "text": text,
}
