"""Tokenize: labels from character spans, EOS trained with pad == eos, truncation, split, dedupe, leakage."""

import numpy as np
import pandas as pd
import pytest

from data_contracts import TOKENS, enforce
from data_contracts.tokens import IGNORE_INDEX
from loraflow.config.format import FormatConfig
from loraflow.config.tokenize import TokenizeConfig
from loraflow.runtime.artifact_store import ArtifactStore
from tasks.format import format_conversations
from tasks.tokenize import TruncationError, run_tokenize, split_of, tokenize_formatted


def conversation(id_, question, answer, source_id="1", phrasing_set="train", more=()):
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    for q, a in more:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"id": id_, "messages": messages, "kind": "overview", "source": "s", "source_row": 0,
            "source_id": source_id, "phrasing_set": phrasing_set, "facts": []}


def formatted(rows, tokenizer, template="chat_template", system_prompt="Be brief."):
    frame, quarantined, _ = format_conversations(pd.DataFrame(rows), FormatConfig(template=template, system_prompt=system_prompt), tokenizer)
    assert len(quarantined) == 0
    return frame


def trained_text(row, tokenizer) -> list[str]:
    """Decoded runs of consecutive trained tokens."""
    runs, current = [], []
    for token, label in zip(row.input_ids, row.labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(int(token))
        elif current:
            runs.append(tokenizer.decode(current)), current.clear()
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def no_split(**overrides):
    return TokenizeConfig(validation_fraction=0.0, **overrides)


@pytest.mark.parametrize("template", ["chat_template", "chatml", "alpaca", "ko_instruction", "gemma", "llama2_chat"])
def test_only_answers_and_their_eos_are_trained(template, tokenizer):
    rows = [conversation("a", "Who made Moon Rabbit?", "Studio Tsuki.", more=[("When?", "In 2019.")])]
    tokens, _, _ = tokenize_formatted(formatted(rows, tokenizer, template), no_split(), tokenizer)
    row = tokens.iloc[0]
    runs = trained_text(row, tokenizer)
    assert len(runs) == 2  # multi-turn: every assistant turn is trained
    assert "Studio Tsuki." in runs[0] and "In 2019." in runs[1]
    assert all(run.endswith("<|im_end|>") for run in runs)
    assert "Who made" not in "".join(runs) and "When?" not in "".join(runs)


def test_eos_is_trained_although_pad_equals_eos(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    tokens, _, _ = tokenize_formatted(formatted([conversation("a", "q?", "Yes.")], tokenizer), no_split(), tokenizer)
    row = tokens.iloc[0]
    end = row.answer_ends[-1]
    assert row.input_ids[end] == tokenizer.eos_token_id and row.labels[end] == tokenizer.eos_token_id
    # Masking went by position: the EOS tokens closing the system and user turns stay masked.
    eos_positions = np.flatnonzero(np.asarray(row.input_ids) == tokenizer.eos_token_id)
    assert [int(row.labels[p] != IGNORE_INDEX) for p in eos_positions] == [0, 0, 1]


def test_prompt_tokens_match_the_prompt_alone(tokenizer):
    tokens, _, _ = tokenize_formatted(formatted([conversation("a", "Name it", "Moon Rabbit")], tokenizer), no_split(), tokenizer)
    row = tokens.iloc[0]
    assert list(row.input_ids[: row.answer_start]) == tokenizer(row.prompt, add_special_tokens=False)["input_ids"]
    assert row.n_trained == int(np.sum(np.asarray(row.labels) != IGNORE_INDEX))


def test_train_on_inputs_trains_every_token(tokenizer):
    tokens, _, _ = tokenize_formatted(formatted([conversation("a", "q?", "Yes.")], tokenizer), no_split(train_on_inputs=True), tokenizer)
    row = tokens.iloc[0]
    assert row.n_trained == row.length and list(row.labels) == list(row.input_ids)


def test_no_double_bos_and_a_doubled_one_is_quarantined(tokenizer):
    rows = formatted([conversation("a", "q?", "Yes."), conversation("b", "r?", "No.")], tokenizer)
    tokens, _, stats = tokenize_formatted(rows, no_split(), tokenizer)
    assert stats["double_bos"] == 0
    assert all(not (r[0] == r[1] == tokenizer.bos_token_id) for r in tokens["input_ids"])
    doubled = rows.copy()
    segments = [dict(s) for s in doubled.at[1, "segments"]]
    segments[0]["text"] = tokenizer.bos_token + segments[0]["text"]
    doubled.at[1, "segments"] = segments
    tokens, quarantined, stats = tokenize_formatted(doubled, no_split(), tokenizer)
    assert stats["double_bos"] == 1 and tokens["id"].tolist() == ["a"]
    assert quarantined["reason"].str.startswith("double_bos").all()


def long_rows(tokenizer):
    return formatted([conversation("short", "q?", "Yes."), conversation("long", "q?", "word " * 80)], tokenizer)


def test_truncation_drop_quarantines_and_counts(tokenizer):
    tokens, quarantined, stats = tokenize_formatted(long_rows(tokenizer), no_split(max_length=40), tokenizer)
    assert tokens["id"].tolist() == ["short"]
    assert stats["dropped_too_long"] == 1 and stats["over_max_length"] == 1 and stats["truncated"] == 0
    assert quarantined["reason"].str.startswith("too_long").tolist() == [True]


def test_truncation_truncate_cuts_and_counts_cut_answers(tokenizer):
    tokens, quarantined, stats = tokenize_formatted(long_rows(tokenizer), no_split(max_length=40, truncation="truncate"), tokenizer)
    long = tokens.set_index("id").loc["long"]
    assert long.length == 40 and long.truncated and len(long.input_ids) == len(long.labels) == 40
    assert stats["truncated"] == 1 and stats["answers_cut_short"] == 1 and len(quarantined) == 0
    assert list(long.answer_ends) == []  # the answer's EOS was cut off


def test_truncation_error_names_the_fix(tokenizer):
    with pytest.raises(TruncationError, match="raise max_length"):
        tokenize_formatted(long_rows(tokenizer), no_split(max_length=40, truncation="error"), tokenizer)


def test_split_is_deterministic_grouped_and_stable_when_rows_are_added(tokenizer):
    config = TokenizeConfig(validation_fraction=0.3, dedupe=False)
    questions = ["Tell me about {}.", "Who made {}?", "When did {} air?"]
    rows = [conversation(f"{s}-{i}", q.format(f"show {s}"), f"Answer {s} {i}", source_id=str(s))
            for s in range(30) for i, q in enumerate(questions)]
    first, _, _ = tokenize_formatted(formatted(rows, tokenizer), config, tokenizer)
    again, _, _ = tokenize_formatted(formatted(rows, tokenizer), config, tokenizer)
    assert first["split"].tolist() == again["split"].tolist()
    assert (first.groupby("source_id")["split"].nunique() == 1).all()  # a source row never straddles
    assert set(first["split"]) == {"train", "validation"}
    more = rows + [conversation(f"{s}-0", f"Tell me about show {s}.", f"Answer {s}", source_id=str(s)) for s in range(30, 60)]
    grown, _, _ = tokenize_formatted(formatted(more, tokenizer), config, tokenizer)
    assert grown.set_index("id").loc[first["id"], "split"].tolist() == first["split"].tolist()
    assert split_of("7", "train", "other-salt", 0.3) in ("train", "validation")


def test_heldout_phrasings_go_to_heldout(tokenizer):
    rows = [conversation("a", "Tell me about X.", "X."), conversation("b", "What is X about?", "X.", phrasing_set="heldout")]
    tokens, _, stats = tokenize_formatted(formatted(rows, tokenizer), no_split(), tokenizer)
    assert dict(zip(tokens["id"], tokens["split"])) == {"a": "train", "b": "heldout"}
    assert stats["splits"] == {"train": 1, "validation": 0, "heldout": 1}


def test_exact_duplicates_are_quarantined_with_reason(tokenizer):
    rows = [conversation("a", "q?", "Yes."), conversation("b", "q?", "Yes."), conversation("c", "q?", "No.")]
    tokens, quarantined, stats = tokenize_formatted(formatted(rows, tokenizer), no_split(), tokenizer)
    assert tokens["id"].tolist() == ["a", "c"] and stats["duplicates"] == 1
    assert quarantined["reason"].tolist() == ["duplicate: same input_ids as example 'a'"]
    kept, _, stats = tokenize_formatted(formatted(rows, tokenizer), no_split(dedupe=False), tokenizer)
    assert len(kept) == 3 and stats["duplicates"] == 0


def test_validation_prompt_seen_in_train_is_leakage(tokenizer):
    config = TokenizeConfig(validation_fraction=0.5, dedupe=True)
    ids = [str(i) for i in range(40)]
    validation_id = next(i for i in ids if split_of(i, "train", config.split_salt, 0.5) == "validation")
    train_id = next(i for i in ids if split_of(i, "train", config.split_salt, 0.5) == "train")
    rows = [conversation("train-row", "Who made Moon Rabbit?", "Studio Tsuki.", source_id=train_id),
            conversation("val-row", "Who made Moon Rabbit?", "Studio Luna.", source_id=validation_id),
            conversation("val-ok", "When did it air?", "2019.", source_id=validation_id)]
    tokens, quarantined, stats = tokenize_formatted(formatted(rows, tokenizer), config, tokenizer)
    assert stats["leaked"] == 1 and sorted(tokens["id"]) == ["train-row", "val-ok"]
    assert quarantined["reason"].str.startswith("leakage").tolist() == [True]
    train_prompts = set(tokens.loc[tokens["split"] == "train", "prompt"])
    assert not train_prompts & set(tokens.loc[tokens["split"] != "train", "prompt"])


def test_stats_and_run_tokenize_writes_a_contract_valid_artifact(tmp_path, model_dir, tokenizer):
    store = ArtifactStore(tmp_path)
    frame = formatted([conversation(str(i), f"Question {i}?", f"Answer {i}.", source_id=str(i)) for i in range(20)]
                      + [conversation("dup", "Question 1?", "Answer 1.", source_id="1")], tokenizer)
    ref = store.write(frame, stage="format", contract="formatted", schema_version=2, config_hash="x")
    result = run_tokenize(ref, TokenizeConfig(validation_fraction=0.2), str(model_dir), store)
    assert result.rows_in == 21 and result.rows_out + result.rows_quarantined == 21
    assert result.stats["unaccounted_rows"] == 0 and result.stats["duplicates"] == 1
    tokens = store.read(result.output)
    valid, broken = enforce(tokens, TOKENS)
    assert len(broken) == 0 and len(valid) == 20
    stats = result.stats
    assert stats["tokens_total"] == int(tokens["length"].sum()) and stats["trained_tokens"] == int(tokens["n_trained"].sum())
    assert sum(stats["splits"].values()) == 20 and stats["length"]["max"] == int(tokens["length"].max())
    assert set(stats["length"]) == {"p50", "p90", "p99", "max"}
