"""Paraphrases: extra trained question phrasings a local model wrote for table_qa, accepted by every filter.

One row per accepted paraphrase, in the order the synthesizer uses them (kind, then the trained phrasing it
rewrites, then the sample): `paraphrase` is a question template like the config's own ({field} placeholders),
`template` the trained phrasing it rewrites, `sample` which of that phrasing's samples it was. Refused samples go
to the stage's quarantine with the rule that refused them (tasks/paraphrase_filters.py).
"""

import pandera.pandas as pa

from data_contracts.base import Contract

PARAPHRASES = Contract(
    name="paraphrases",
    version=1,
    columns={
        "kind": pa.Column(str, nullable=False, description="Question kind the paraphrase belongs to."),
        "template": pa.Column(str, nullable=False, description="The configured trained phrasing it rewrites."),
        "sample": pa.Column(int, nullable=False, description="Which sample of that phrasing it was (0-based)."),
        "paraphrase": pa.Column(str, nullable=False, description="The accepted phrasing ({field} placeholders)."),
    },
    unique=("paraphrase",),
    allow_empty=True,  # every sample may be refused: then there is nothing to add, which is no error
)
