"""Synthesize: each synthesizer on 2–5 row tables, the stage's accounting and artifact, the shipped sample."""

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from data_contracts import CONVERSATIONS, QUARANTINE, check_structure, enforce
from loraflow.config.synthesize import SynthesizeConfig
from loraflow.runtime.artifact_store import ArtifactStore
from tasks.synthesize import SynthesizeError, run_synthesize, synthesize_frame, synthesize_stats
from loraflow.synthesizers import SYNTHESIZERS, anime_answers, anime_qa
from loraflow.synthesizers.anime_qa import PHRASINGS_PER_KIND

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "synthesize"
SAMPLE_CATALOG = REPO / "data" / "sample" / "anime_catalog.csv"
MISSING_WORDS = re.compile(r"\b(nan|none|unknown|n/a)\b", re.IGNORECASE)


def raw(frame: pd.DataFrame, source: str = "catalog") -> pd.DataFrame:
    """A RAW frame: the source's columns plus provenance, as ingest writes it."""
    frame = frame.reset_index(drop=True)
    frame.insert(0, "_row", np.arange(len(frame), dtype="int64"))
    frame.insert(0, "_source", source)
    return frame


def catalog() -> pd.DataFrame:
    return raw(pd.read_csv(FIXTURES / "anime_catalog.csv", dtype=str, keep_default_na=False))


def jsonl(name: str, source: str) -> pd.DataFrame:
    return raw(pd.read_json(FIXTURES / name, lines=True, dtype=False), source)


# anime_qa's own phrasings only: no natural questions or made-up titles (tests/test_quality_eval.py tests those)
PHRASINGS_ONLY = {"natural_questions": 0, "unknown_titles": 0}


def texts(conversations: pd.DataFrame) -> list[str]:
    return [message["content"] for messages in conversations["messages"] for message in messages]


def answers_by(conversations: pd.DataFrame) -> dict[tuple[int, str], str]:
    """(source_row, kind) -> the answer (the same for every phrasing of it)."""
    found = {}
    for row in conversations.itertuples():
        answer = row.messages[-1]["content"]
        assert found.setdefault((row.source_row, row.kind), answer) == answer
    return found


# ---- anime_qa


def test_anime_answers_state_exactly_the_rows_facts():
    conversations, quarantine = synthesize_frame([catalog()], SynthesizeConfig(anime_qa=PHRASINGS_ONLY))
    answers = answers_by(conversations)
    assert answers == {
        (0, "overview"): "Hoshizora Drift (English title: Starry Drift; also known as 星空ドリフト) is an anime in the genres "
        "Drama and Sci-Fi. Synopsis: Mika drifts between the stars in a salvaged ship. She finds a signal nobody else can hear.",
        (0, "production"): "Hoshizora Drift was produced by Aozora Pictures and Kumo Records, animated by Studio Lantern, "
        "and runs for 12 episodes.",
        (0, "reception"): "Hoshizora Drift is rated PG-13 - Teens 13 or older and has a user score of 7.21 from 48213 voters.",
        # English name UNKNOWN: only that clause goes; Producers UNKNOWN: no production question.
        (1, "overview"): "Kumo no Uta (also known as 雲の歌) is an anime in the genre Comedy. Synopsis: Clouds sing to a lonely shepherd.",
        (1, "reception"): "Kumo no Uta is rated G - All Ages and has a user score of 6.5 from 1 voter.",
        # English name equal to Name is not repeated; a duplicated producer is named once; "152,004" kept as written.
        (4, "overview"): "Minato Relay (also known as みなとリレー) is an anime in the genres Sports and Slice of Life. Synopsis: "
        "Four students revive the harbour town's relay club. Their first race is in spring, and the town is watching.",
        (4, "production"): "Minato Relay was produced by Umi Media and Port Sound, animated by Studio Lantern, and runs for 24 episodes.",
        (4, "reception"): "Minato Relay is rated PG-13 - Teens 13 or older and has a user score of 8.03 from 152,004 voters.",
    }
    facts = {(row.source_row, row.kind): [(f["column"], f["value"]) for f in row.facts] for row in conversations.itertuples()}
    assert facts[(0, "overview")] == [
        ("English name", "Starry Drift"), ("Other name", "星空ドリフト"), ("Genres", "Drama"), ("Genres", "Sci-Fi"),
        ("Synopsis", "Mika drifts between the stars in a salvaged ship. She finds a signal nobody else can hear."),
    ]
    assert facts[(0, "production")] == [
        ("Producers", "Aozora Pictures"), ("Producers", "Kumo Records"), ("Studios", "Studio Lantern"), ("Episodes", "12"),
    ]
    assert facts[(0, "reception")] == [("Rating", "PG-13 - Teens 13 or older"), ("Score", "7.21"), ("Scored By", "48213")]
    assert facts[(4, "production")] == [
        ("Producers", "Umi Media"), ("Producers", "Port Sound"), ("Studios", "Studio Lantern"), ("Episodes", "24"),
    ]
    for row in conversations.itertuples():
        assert all(fact["value"] in row.messages[-1]["content"] for fact in row.facts)
        assert [m["role"] for m in row.messages] == ["user", "assistant"]  # no system turn: format adds it
        assert row.source_id == {0: "101", 1: "102", 4: "105"}[row.source_row]
        assert row.id.startswith(f"catalog:{row.source_row}:{row.kind}:")


def test_missing_values_never_reach_a_text_and_skips_are_counted():
    conversations, quarantine = synthesize_frame([catalog()], SynthesizeConfig(anime_qa=PHRASINGS_ONLY))
    assert not [text for text in texts(conversations) if MISSING_WORDS.search(text)]
    stats = synthesize_stats(conversations, quarantine, 5, SynthesizeConfig(anime_qa=PHRASINGS_ONLY))
    assert stats["skipped_by_kind"] == {"overview": 2, "production": 3, "reception": 2}
    assert stats["skipped_by_column"] == {
        "overview": {"Synopsis": 1, "Name": 1},
        "production": {"Producers": 1, "Studios": 1, "Episodes": 1, "Name": 1},
        "reception": {"Score": 1, "Scored By": 1, "Name": 1},
    }
    reasons = set(quarantine["reason"])
    assert "production skipped: Producers is 'UNKNOWN'" in reasons
    assert "production skipped: Studios is 'UNKNOWN', Episodes is ''" in reasons
    assert "overview skipped: Name is 'UNKNOWN'" in reasons
    # The quarantine keeps the whole source row, with its provenance.
    skipped_row = json.loads(quarantine.loc[quarantine["reason"] == "production skipped: Producers is 'UNKNOWN'", "row_json"].iloc[0])
    assert skipped_row["anime_id"] == "102" and skipped_row["_row"] == 1
    assert stats["conversations_by_kind"] == {"overview": 9, "production": 6, "reception": 9}
    assert stats["conversations_by_phrasing_set"] == {"train": 16, "heldout": 8}
    # 5 rows -> 3 kinds each = 15 units; 7 skipped, 8 emitted x 3 phrasings = 24 conversations.
    assert stats["rows_expanded"] == 5 * 2 + 8 * 2
    assert 5 + stats["rows_expanded"] == len(conversations) + len(quarantine)


def test_nan_and_none_values_are_missing_too():
    rows = catalog().head(1).copy()
    rows = pd.concat([rows, rows, rows], ignore_index=True)
    rows["_row"] = [0, 1, 2]
    rows["Studios"] = rows["Studios"].astype(object)
    rows.loc[1, "Studios"] = None
    rows.loc[2, "Studios"] = np.nan
    rows.loc[0, "Score"] = " n/a "
    conversations, quarantine = synthesize_frame([rows], SynthesizeConfig(anime_qa=PHRASINGS_ONLY))
    assert not [text for text in texts(conversations) if MISSING_WORDS.search(text)]
    assert sorted(quarantine["reason"]) == [
        "production skipped: Studios is empty (no value)", "production skipped: Studios is empty (no value)",
        "reception skipped: Score is ' n/a '",
    ]


def test_a_fact_that_does_not_parse_as_its_type_is_a_skipped_question_with_the_reason():
    rows = catalog().head(1).copy()
    rows = pd.concat([rows] * 4, ignore_index=True)
    rows["_row"], rows["anime_id"] = [0, 1, 2, 3], ["1", "2", "3", "4"]
    rows.loc[0, "Scored By"] = "abc"
    rows.loc[1, "Episodes"] = "twelve"
    rows.loc[2, "Score"] = "high"
    rows.loc[3, ["Scored By", "Episodes", "Score"]] = ["12,000", "12.0", "6.5"]  # counts with separators, float counts
    conversations, quarantine = synthesize_frame([rows], SynthesizeConfig(anime_qa=PHRASINGS_ONLY))
    assert sorted(quarantine["reason"]) == [
        "production skipped: Episodes 'twelve' is not a count (a whole number such as 12 or 1,200)",
        "reception skipped: Score 'high' is not a score (a number such as 7 or 6.85)",
        "reception skipped: Scored By 'abc' is not a count (a whole number such as 12 or 1,200)",
    ]
    assert not [text for text in texts(conversations) if "abc" in text or "twelve" in text or "high" in text]
    assert answers_by(conversations)[(3, "reception")].endswith("a user score of 6.5 from 12,000 voters.")


def test_every_synthesizer_declares_the_types_of_the_facts_it_renders():
    from typing import get_args

    from loraflow.synthesizers.facts import FactType

    for kind, module in SYNTHESIZERS.items():
        assert set(module.FACT_TYPES.values()) <= set(get_args(FactType)), kind
    used = {field for fields in anime_qa.KIND_FIELDS.values() for field in fields} | {"id"}
    assert set(anime_qa.FACT_TYPES) == used
    assert {field for field, kind in anime_qa.FACT_TYPES.items() if kind != "text"} == {"episodes", "scored_by", "score"}


@pytest.mark.parametrize("keep, kept_rows", [("first", {0, 2}), ("last", {1, 2}), ("none", {2})])
def test_rows_with_one_id_and_different_facts_keep_one_and_quarantine_the_others(keep, kept_rows, tmp_path):
    rows = catalog().head(1).copy()
    rows = pd.concat([rows] * 4, ignore_index=True)
    rows["_row"], rows["anime_id"] = [0, 1, 2, 3], ["7", "7", "8", "8"]
    rows.loc[1, "Episodes"] = "13"  # row 1 contradicts row 0; rows 2 and 3 agree, so both stay
    config = SynthesizeConfig(duplicate_ids=keep, anime_qa=PHRASINGS_ONLY)
    conversations, quarantine = synthesize_frame([rows], config)
    assert set(conversations["source_row"]) == kept_rows | {3}
    dropped = sorted({0, 1} - kept_rows)
    assert sorted(set(quarantine["row_index"])) == dropped and len(quarantine) == 3 * len(dropped)  # one per kind
    assert quarantine["reason"].str.startswith("duplicate id with different facts: id '7' is on rows catalog:0, catalog:1").all()
    assert all(columns == ["Episodes"] for columns in quarantine["columns"])
    store = ArtifactStore(tmp_path / "store")
    raw_ref = store.write(rows, stage="ingest", contract="raw", schema_version=1, config_hash="x")
    result = run_synthesize([raw_ref], config, store)
    assert result.stats["unaccounted_rows"] == 0 and result.rows_quarantined == 3 * len(dropped)


def test_a_conflicting_id_across_sources_and_for_instruction_rows():
    first = raw(pd.DataFrame({"id": ["a", "b"], "instruction": ["Hi", "Yo"], "output": ["Hello", "Hey"]}), "one")
    second = raw(pd.DataFrame({"id": ["a", "b"], "instruction": ["Hi", "Yo"], "output": ["Goodbye", "Hey"]}), "two")
    config = SynthesizeConfig(kind="instruction", instruction={"id_column": "id", "input_column": None})
    conversations, quarantine = synthesize_frame([first, second], config)
    assert conversations["id"].tolist() == ["one:0:instruction:0", "one:1:instruction:0", "two:1:instruction:0"]
    assert quarantine["row_index"].tolist() == [2] and quarantine["reason"].iloc[0].startswith(
        "duplicate id with different facts: id 'a' is on rows one:0, two:0")


def test_phrasings_are_deterministic_and_heldout_wordings_differ_from_trained():
    config = SynthesizeConfig(anime_qa={"trained_phrasings": 3, "heldout_phrasings": 2, "seed": 7, **PHRASINGS_ONLY})
    first, _ = synthesize_frame([catalog()], config)
    again, _ = synthesize_frame([catalog()], config)
    pd.testing.assert_frame_equal(first, again)
    assert first["id"].is_unique
    for (row, kind), group in first.groupby(["source_row", "kind"]):
        questions = [messages[0]["content"] for messages in group["messages"]]
        trained = {q for q, s in zip(questions, group["phrasing_set"]) if s == "train"}
        heldout = {q for q, s in zip(questions, group["phrasing_set"]) if s == "heldout"}
        assert len(trained) == 3 and len(heldout) == 2 and not trained & heldout, (row, kind)

    # Another seed picks other wordings; the catalog's order does not matter (the hash is of the id).
    other_seed, _ = synthesize_frame([catalog()], config.model_copy(update={"anime_qa": config.anime_qa.model_copy(update={"seed": 8})}))
    assert set(other_seed["id"]) != set(first["id"])
    reversed_rows = catalog().iloc[::-1].reset_index(drop=True)
    shuffled, _ = synthesize_frame([reversed_rows], config)

    def assignment(frame):
        return set(zip(frame.source_id, frame.kind, [m[0]["content"] for m in frame.messages], frame.phrasing_set))

    assert assignment(shuffled) == assignment(first)


def test_question_templates_match_the_config_and_the_config_refuses_too_many():
    sizes = {kind: len(templates) for kind, templates in anime_qa.QUESTIONS.items()}
    assert sizes == dict.fromkeys(anime_qa.KIND_FIELDS, PHRASINGS_PER_KIND)
    assert all(len(set(templates)) == PHRASINGS_PER_KIND for templates in anime_qa.QUESTIONS.values())
    with pytest.raises(ValidationError, match="lower one of them"):
        anime_qa.Options(trained_phrasings=6, heldout_phrasings=3)
    with pytest.raises(ValidationError):
        anime_qa.Options(optional_fields=["studios"])


def test_synopsis_is_cut_at_a_sentence_end_when_possible():
    assert anime_answers.cut_synopsis("One two three four five. Six seven eight nine ten.", 8) == "One two three four five."
    # A sentence end that would keep less than half the words is not worth the loss: cut at the limit.
    assert anime_answers.cut_synopsis("One two. Three four five six seven eight nine ten.", 8) == "One two. Three four five six seven eight…"
    long_sentence = "one " * 20 + "end."
    assert anime_answers.cut_synopsis(long_sentence.strip(), 10) == ("one " * 10).strip() + "…"
    assert anime_answers.cut_synopsis("Short one.", 10) == "Short one."
    assert anime_answers.synopsis_text("A ship drifts. (Source: ANN)", 60) == "A ship drifts."


def test_kinds_option_and_an_answer_that_misses_a_fact_is_never_emitted(monkeypatch):
    only_reception = SynthesizeConfig(anime_qa={"kinds": ["reception"], **PHRASINGS_ONLY})
    conversations, quarantine = synthesize_frame([catalog()], only_reception)
    assert set(conversations["kind"]) == {"reception"}

    # A template bug (the score left out) is caught by the check, not shipped.
    def careless(name, rating, score, scored_by, rating_facts, score_facts, scored_by_facts):
        return f"{name} is rated {rating}.", rating_facts + score_facts + scored_by_facts

    monkeypatch.setitem(anime_qa.ANSWERS, "reception", careless)
    conversations, quarantine = synthesize_frame([catalog()], only_reception)
    assert len(conversations) == 0
    assert "reception skipped: the answer does not state Score '7.21'" in set(quarantine["reason"])


def test_missing_columns_raise_one_error_naming_every_column_and_key():
    rows = catalog().drop(columns=["Studios", "Scored By"]).rename(columns={"Name": "Title"})
    with pytest.raises(SynthesizeError) as error:
        synthesize_frame([rows], SynthesizeConfig(anime_qa=PHRASINGS_ONLY))
    message = str(error.value)
    for expected in ("'Name' (set synthesize.anime_qa.columns.name)", "'Studios' (set synthesize.anime_qa.columns.studios)",
                     "'Scored By' (set synthesize.anime_qa.columns.scored_by)", "'Title'", "'Synopsis'", "source 'catalog'"):
        assert expected in message, message
    # Kinds that are not asked need no columns.
    synthesize_frame([rows.rename(columns={"Title": "Name"})], SynthesizeConfig(anime_qa={"kinds": ["overview"]}))


# ---- instruction


def test_instruction_rows_with_and_without_input_in_korean():
    config = SynthesizeConfig(kind="instruction")
    conversations, quarantine = synthesize_frame([jsonl("instructions_ko.jsonl", "ko")], config)
    assert list(conversations["source_row"]) == [0, 1, 4]
    with_input, without_input, padded = conversations["messages"]
    assert with_input == [
        {"role": "user", "content": "다음 문장을 영어로 번역하세요.\n\n오늘 날씨가 정말 좋네요.", "input": "오늘 날씨가 정말 좋네요."},
        {"role": "assistant", "content": "The weather is really nice today."},
    ]
    assert without_input == [
        {"role": "user", "content": "대한민국의 수도는 어디인가요?"},
        {"role": "assistant", "content": "대한민국의 수도는 서울입니다."},
    ]
    # What a template with its own input section does (data_contracts/conversations.py). Whitespace at the
    # edges is data, kept as written (format.strip_whitespace strips it, counted).
    user = padded[0]
    assert user["content"][: -len(user["input"]) - 2] == "  문장을 요약하세요.\n"
    assert user["input"] == "  인공지능은 데이터를 학습하여 예측을 수행하는 기술입니다.  "
    assert conversations["facts"].map(len).eq(0).all() and set(conversations["kind"]) == {"instruction"}
    assert conversations["source_id"].tolist() == ["ko:0", "ko:1", "ko:4"]
    assert sorted(quarantine["reason"]) == ["instruction skipped: instruction is empty", "instruction skipped: output is empty"]


def test_instruction_system_and_id_columns():
    rows = raw(pd.DataFrame({
        "prompt": ["Say hi.", "Add 2 and 3."], "answer": ["Hi!", "5"], "persona": ["You are terse.", ""], "uid": ["a1", "a2"],
    }), "tiny")
    config = SynthesizeConfig(kind="instruction", instruction={
        "instruction_column": "prompt", "output_column": "answer", "input_column": None, "system_column": "persona", "id_column": "uid",
    })
    conversations, _ = synthesize_frame([rows], config)
    assert [[m["role"] for m in ms] for ms in conversations["messages"]] == [["system", "user", "assistant"], ["user", "assistant"]]
    assert conversations["source_id"].tolist() == ["a1", "a2"]
    with pytest.raises(SynthesizeError, match=r"'input' \(set synthesize.instruction.input_column\)"):
        with_input = config.instruction.model_copy(update={"input_column": "input"})
        synthesize_frame([rows], config.model_copy(update={"instruction": with_input}))


# ---- conversations (ShareGPT)


@pytest.mark.parametrize("encoding", ["lists", "arrays", "json_strings"])
def test_sharegpt_multi_turn_trimmed_and_skipped(encoding):
    rows = jsonl("sharegpt.jsonl", "chat")
    if encoding == "arrays":
        rows["conversations"] = [np.array(turns, dtype=object) for turns in rows["conversations"]]
    elif encoding == "json_strings":
        rows["conversations"] = [json.dumps(turns, ensure_ascii=False) for turns in rows["conversations"]]
    config = SynthesizeConfig(kind="conversations", conversations={"id_column": "id"})
    conversations, quarantine = synthesize_frame([rows], config)
    assert conversations["messages"].tolist() == [
        [{"role": "system", "content": "You are a helpful travel agent."},
         {"role": "user", "content": "Where should I go in spring?"},
         {"role": "assistant", "content": "Kyoto, for the cherry blossoms."},
         {"role": "user", "content": "And in autumn?"},
         {"role": "assistant", "content": "Nikko, for the maple leaves."}],
        [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    ]
    assert conversations["source_id"].tolist() == ["c1", "c2"]
    assert conversations.attrs["stats"] == {"rows_expanded": 0, "trimmed_to_last_assistant": 1}
    reasons = sorted(quarantine["reason"])
    assert reasons[0] == "conversation skipped: conversations has no assistant turn"
    assert reasons[1].startswith(
        "conversation skipped: conversations turn 2 has speaker 'bot' -> add it to synthesize.conversations.role_map"
    )


def test_sharegpt_bad_json_is_skipped_with_its_reason():
    rows = raw(pd.DataFrame({"conversations": ['[{"from": "human", "value": "Hi"}', "[]"]}), "chat")
    conversations, quarantine = synthesize_frame([rows], SynthesizeConfig(kind="conversations"))
    assert len(conversations) == 0
    assert quarantine["reason"].str.startswith("conversation skipped: conversations ").all()
    assert "not valid JSON" in quarantine["reason"].iloc[0]


# ---- text


def test_text_rows_are_one_assistant_turn_kept_verbatim():
    rows = raw(pd.DataFrame({"text": ["A lantern keeps burning.\n\n  Indented line.", "   ", None]}), "quotes")
    conversations, quarantine = synthesize_frame([rows], SynthesizeConfig(kind="text"))
    assert conversations["messages"].tolist() == [[{"role": "assistant", "content": "A lantern keeps burning.\n\n  Indented line."}]]
    assert conversations["kind"].tolist() == ["text"] and conversations["id"].tolist() == ["quotes:0:text:0"]
    assert quarantine["reason"].tolist() == ["text skipped: text is empty"] * 2


# ---- the stage


def test_run_synthesize_writes_a_valid_artifact_and_accounts_for_every_row(tmp_path):
    store = ArtifactStore(tmp_path)
    first = store.write(catalog(), stage="ingest", contract="raw", schema_version=1, config_hash="test")
    more = catalog().head(2).assign(_source="more")
    second = store.write(more, stage="ingest", contract="raw", schema_version=1, config_hash="test")
    result = run_synthesize([first, second], SynthesizeConfig(anime_qa=PHRASINGS_ONLY), store)

    assert result.stage == "synthesize" and result.output.contract == "conversations"
    written = store.read(result.output)
    check_structure(written, CONVERSATIONS)
    valid, broken = enforce(written, CONVERSATIONS)
    assert len(valid) == len(written) == result.rows_out and len(broken) == 0
    assert result.rows_in == 7 and result.rows_out == 24 + 9 + 6  # rows 101 (3 kinds) and 102 (2 kinds) again, 3 phrasings each
    assert result.rows_in + result.stats["rows_expanded"] == result.rows_out + result.rows_quarantined
    assert set(written["source"]) == {"catalog", "more"}

    quarantine = store.read(result.quarantine)
    check_structure(quarantine, QUARANTINE)
    assert len(quarantine) == result.rows_quarantined == 7 + 1
    assert quarantine["row_index"].max() == 6  # positions in the concatenated input
    assert {tuple(columns) for columns in quarantine["columns"]} >= {("Producers",), ("Studios", "Episodes")}

    # Same input, same config: same bytes (content-addressed, so the cache can rely on it).
    assert run_synthesize([first, second], SynthesizeConfig(anime_qa=PHRASINGS_ONLY), store).output.sha256 == result.output.sha256


def test_run_synthesize_instruction_artifact_keeps_input_after_parquet(tmp_path):
    store = ArtifactStore(tmp_path)
    ref = store.write(jsonl("instructions_ko.jsonl", "ko"), stage="ingest", contract="raw", schema_version=1, config_hash="t")
    result = run_synthesize([ref], SynthesizeConfig(kind="instruction"), store)
    written = store.read(result.output)
    users = [list(messages)[0] for messages in written["messages"]]
    assert users[0]["input"] == "오늘 날씨가 정말 좋네요." and users[1].get("input") in (None, "")


def test_run_synthesize_refuses_when_every_row_is_skipped(tmp_path):
    store = ArtifactStore(tmp_path)
    rows = raw(pd.DataFrame({"text": ["", "  "]}), "empty")
    ref = store.write(rows, stage="ingest", contract="raw", schema_version=1, config_hash="t")
    with pytest.raises(SynthesizeError, match="all 2 input rows were skipped.*text skipped: text is empty"):
        run_synthesize([ref], SynthesizeConfig(kind="text"), store)


def test_every_synthesizer_is_registered_with_its_interface():
    assert set(SYNTHESIZERS) == set(SynthesizeConfig.model_fields["kind"].annotation.__args__)
    for kind, module in SYNTHESIZERS.items():
        options = getattr(SynthesizeConfig(anime_qa=PHRASINGS_ONLY, table_qa={"preset": "anime_ko"}), kind)
        assert callable(module.synthesize) and module.required_columns(options) and len(module.expansion(options)) == 2


# ---- the shipped sample and scale


@pytest.mark.skipif(not SAMPLE_CATALOG.exists(), reason="data/sample/anime_catalog.csv not created yet")
def test_sample_catalog():
    rows = raw(pd.read_csv(SAMPLE_CATALOG, dtype=str, keep_default_na=False))
    conversations, quarantine = synthesize_frame([rows], SynthesizeConfig(anime_qa=PHRASINGS_ONLY))
    assert len(conversations) > 2 * len(rows) and conversations["id"].is_unique
    assert not [text for text in texts(conversations) if MISSING_WORDS.search(text)]
    for row in conversations.itertuples():
        assert row.facts and all(fact["value"] in row.messages[-1]["content"] for fact in row.facts)
    stats = synthesize_stats(conversations, quarantine, len(rows), SynthesizeConfig(anime_qa=PHRASINGS_ONLY))
    assert len(rows) + stats["rows_expanded"] == len(conversations) + len(quarantine)


@pytest.mark.parametrize("kind", ["instruction", "conversations", "text"])
def test_sample_generic_sources(kind):
    files = {"instruction": "instructions.jsonl", "conversations": "conversations.json", "text": "quotes.jsonl"}
    path = REPO / "data" / "sample" / files[kind]
    if not path.exists():
        pytest.skip(f"{path} not created yet")
    rows = raw(pd.read_json(path, lines=path.suffix == ".jsonl", dtype=False), path.stem)
    conversations, quarantine = synthesize_frame([rows], SynthesizeConfig(kind=kind))
    valid, broken = enforce(conversations, CONVERSATIONS)
    assert len(valid) + len(quarantine) == len(rows) and len(broken) == 0


def test_25k_catalog_rows_make_75k_conversations_with_unique_ids():
    count = 25_000
    synopsis = "The crew drifts between the stars and finds a lost signal. " * 8
    rows = raw(pd.DataFrame({
        "anime_id": [str(i) for i in range(count)], "Name": [f"Title {i}" for i in range(count)],
        "English name": [f"English {i}" for i in range(count)], "Other name": [f"別名{i}" for i in range(count)],
        "Genres": "Action, Drama, Sci-Fi", "Synopsis": [synopsis + f"Part {i}." for i in range(count)],
        "Episodes": "12", "Producers": "Aozora Pictures, Kumo Records", "Studios": "Studio Lantern",
        "Rating": "PG-13 - Teens 13 or older", "Score": "7.21", "Scored By": "48213",
    }))
    config = SynthesizeConfig(anime_qa={"trained_phrasings": 1, "heldout_phrasings": 0, **PHRASINGS_ONLY})
    conversations, quarantine = synthesize_frame([rows], config)
    assert len(conversations) == 75_000 and len(quarantine) == 0 and conversations["id"].is_unique


@pytest.mark.parametrize("kind", ["anime_qa", "instruction", "conversations", "text"])
def test_an_empty_source_gives_empty_frames(kind):
    frame = {"anime_qa": catalog(), "instruction": jsonl("instructions_ko.jsonl", "ko"),
             "conversations": jsonl("sharegpt.jsonl", "chat"), "text": raw(pd.DataFrame({"text": ["x"]}))}[kind].head(0)
    conversations, quarantine = synthesize_frame([frame, frame], SynthesizeConfig(kind=kind))
    assert len(conversations) == len(quarantine) == 0
    check_structure(conversations, CONVERSATIONS)


def test_instruction_and_conversations_keep_whitespace_at_the_edges():
    from loraflow.synthesizers import conversations as conversations_kind, instruction

    rows = pd.DataFrame({"_source": ["s", "s"], "_row": [0, 1], "instruction": ["Indent:", "   "],
                         "output": ["    return 42\n", "x"]})
    made, skipped = instruction.synthesize(rows, instruction.Options(input_column=None))
    assert made.at[0, "messages"][-1]["content"] == "    return 42\n" and len(skipped) == 1  # whitespace-only is empty
    turns = [{"from": "human", "value": "  hi\n"}, {"from": "gpt", "value": "\tindented\n"}]
    made, _ = conversations_kind.synthesize(pd.DataFrame({"_source": ["s"], "_row": [0], "conversations": [turns]}),
                                            conversations_kind.Options())
    assert [m["content"] for m in made.at[0, "messages"]] == ["  hi\n", "\tindented\n"]
