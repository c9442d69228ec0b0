"""Properties of format and tokenize on random conversations (any unicode but lone surrogates, several turns,
every template, with or without a system prompt): every row is formatted or quarantined with a reason; the
segments are the full text, prompt then answer; every kept row's tokens decode back to exactly that text;
labels are the token or -100, every answer and the end-of-turn after it are trained; the output passes the
contracts and pre-flight.

This test found that SmolLM2's vocabulary has no token for bytes 0x04, 0x06, 0x13, 0x14, 0x16, 0x1d, 0xf1 and
0xf2, so text holding those control characters or code points U+40000-U+BFFFF tokenized lossily and trained
on garbled tokens; tokenize now sets such rows aside ("unrepresentable").
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
from loraflow.templates import TEMPLATES
from tasks.tokenize import tokenize_formatted

# Any unicode but lone surrogates (control characters and unassigned code points included), and real text.
text = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=30).filter(str.strip)
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
    assert all(reason.split(":")[0] in ("unrepresentable", "duplicate", "leakage") for reason in set_aside["reason"]), \
        set_aside["reason"].tolist()
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


def test_text_the_vocabulary_cannot_spell_is_set_aside_with_the_bytes(tokenizer):
    rows = [{"id": f"r{i}", "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
             "kind": "k", "source": "s", "source_row": i, "source_id": str(i), "phrasing_set": "train", "facts": []}
            for i, (question, answer) in enumerate([("plain?", "yes"), ("ctrl\x04?", "yes"), ("q", "plane 4 \U00040000")])]
    formatted, _, _ = format_conversations(pd.DataFrame(rows), FormatConfig(), tokenizer)
    tokens, set_aside, stats = tokenize_formatted(formatted, TokenizeConfig(validation_fraction=0.0), tokenizer)
    assert tokens["id"].tolist() == ["r0"] and stats["unrepresentable"] == 2
    assert set_aside["reason"].tolist() == [
        "unrepresentable: the tokenizer has no token for byte(s) [4] (e.g. character '\\x04'); remove or replace those characters",
        "unrepresentable: the tokenizer has no token for byte(s) [241] (e.g. character '\\U00040000'); remove or replace "
        "those characters",
    ]
