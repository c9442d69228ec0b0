"""Properties of format and tokenize on random conversations (any assigned unicode, several turns, every
template, with or without a system prompt): every row is formatted or quarantined with a reason; the
segments are the full text, prompt then answer; tokens decode back to exactly that text; labels are the token
or -100, every answer and the end-of-turn after it are trained; the output passes the contracts and pre-flight.

Found while writing this: SmolLM2's vocabulary has no byte tokens for 0x04, 0x06, 0x13, 0x14, 0x16, 0x1d and
0xf1/0xf2, so those control characters and code points U+40000-U+BFFFF (all unassigned) tokenize lossily.
The strategy leaves them out (categories Cc but newline/tab, and Cn); the tokenize stage does not detect them.
"""

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_contracts import FORMATTED, TOKENS, enforce
from data_contracts.tokens import IGNORE_INDEX
from loraflow.config.format import FormatConfig
from loraflow.config.tokenize import TokenizeConfig
from tasks.format import format_conversations
from tasks.preflight import preflight
from tasks.templates import TEMPLATES
from tasks.tokenize import tokenize_formatted

# Any assigned, non-control unicode (plus newline and tab), and some real multilingual text.
text = st.text(st.characters(exclude_categories=("Cs", "Cc", "Cn"), include_characters="\n\t"), min_size=1,
               max_size=30).filter(str.strip)
content = st.one_of(text, st.sampled_from(["안녕하세요, 세계!", "日本語のテキスト。", "emoji 🎉🚀 ok", "Ünïcödé straße", "a\nb\n\nc"]))


@st.composite
def conversation(draw, index: int):
    turns = draw(st.integers(1, 3))
    messages = [{"role": "system", "content": draw(content)}] if draw(st.booleans()) else []
    for _ in range(turns):
        messages += [{"role": "user", "content": draw(content)}, {"role": "assistant", "content": draw(content)}]
    return {"id": f"r{index}", "messages": messages, "kind": "random", "source": "s", "source_row": index,
            "source_id": str(index), "phrasing_set": draw(st.sampled_from(["train", "heldout"])), "facts": []}


conversations = st.integers(1, 4).flatmap(lambda n: st.tuples(*[conversation(i) for i in range(n)]))


def trained_runs(input_ids, labels, tokenizer) -> list[str]:
    runs, current = [], []
    for token, label in zip(input_ids, labels):
        if label != IGNORE_INDEX:
            current.append(int(token))
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(rows=conversations, template=st.sampled_from(sorted(TEMPLATES)), system_prompt=st.one_of(st.none(), content))
def test_format_and_tokenize_hold_their_invariants_on_random_conversations(tokenizer, rows, template, system_prompt):
    source = pd.DataFrame(list(rows))
    format_config = FormatConfig(template=template, system_prompt=system_prompt)
    formatted, quarantined, _ = format_conversations(source, format_config, tokenizer)
    assert len(formatted) + len(quarantined) == len(source)
    assert all(reason.startswith("render_failed: ") for reason in quarantined["reason"])
    if len(formatted) == 0:
        return
    valid, broken = enforce(formatted, FORMATTED)
    assert len(broken) == 0, broken["reason"].tolist()
    for row in formatted.itertuples():
        full = "".join(segment["text"] for segment in row.segments)
        # llama2_chat puts a space between "[/INST]" and the answer: the model generates it.
        answer_on = full[len(row.prompt):]
        assert full.startswith(row.prompt), (full, row.prompt)
        assert answer_on.startswith(row.reference) or answer_on.startswith(" " + row.reference), (answer_on, row.reference)
        trained = "".join(segment["text"] for segment in row.segments if segment["trained"])
        answers = [m["content"] for m in row.messages if m["role"] == "assistant"]
        assert answers[-1] == row.reference and answers[-1] in trained

    tokens, set_aside, _ = tokenize_formatted(formatted, TokenizeConfig(max_length=4096, validation_fraction=0.0), tokenizer)
    assert len(tokens) + len(set_aside) == len(formatted)
    for row in tokens.itertuples():
        ids, labels = np.asarray(row.input_ids), np.asarray(row.labels)
        assert len(ids) == len(labels) == len(row.attention_mask) == row.length
        assert ((labels == IGNORE_INDEX) | (labels == ids)).all()
        assert row.n_trained == int((labels != IGNORE_INDEX).sum()) > 0
        full = "".join(segment["text"] for segment in formatted.set_index("id").loc[row.id, "segments"])
        assert tokenizer.decode(ids.tolist()) == full  # byte-level BPE: nothing lost or invented
        assert row.reference in "".join(trained_runs(ids, labels, tokenizer))
        assert labels[row.answer_ends[-1]] != IGNORE_INDEX  # the end-of-turn after the answer is trained
    if len(tokens):
        valid, broken = enforce(tokens, TOKENS)
        assert len(broken) == 0, broken["reason"].tolist()
        preflight(tokens.assign(split="train"), formatted, format_config, tokenizer)
