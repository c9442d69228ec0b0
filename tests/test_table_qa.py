"""table_qa: templates from the config on small real tables (golden files, Korean included), missing values, facts,
the stage's accounting, and fact accuracy scored from the recorded facts.

Regenerate golden files after an intended change: UPDATE_GOLDEN=1 pytest tests/test_table_qa.py
"""

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from data_contracts import CONVERSATIONS, QUARANTINE, check_structure, enforce
from loraflow.config.pipeline import load_config
from loraflow.config.synthesize import SynthesizeConfig
from loraflow.evaluation.metrics import facts_present, score_answers, summarise
from loraflow.runtime.artifact_store import ArtifactStore
from tasks.synthesize import run_synthesize, synthesize_frame, synthesize_stats
from loraflow.synthesizers import table_qa
from tests.test_synthesize import catalog, raw

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"
TEA_CONFIG = REPO / "configs" / "tea_catalog.yaml"
TEA_CATALOG = REPO / "data" / "sample" / "tea_catalog.csv"
KOREAN = SynthesizeConfig(kind="table_qa", table_qa={"preset": "anime_ko"})


def tea_rows() -> pd.DataFrame:
    return raw(pd.read_csv(TEA_CATALOG, dtype=str, keep_default_na=False), "tea_catalog")


def tea_config() -> SynthesizeConfig:
    return load_config(TEA_CONFIG).synthesize


def golden_text(conversations: pd.DataFrame, quarantine: pd.DataFrame) -> str:
    """Every conversation (id, phrasing set, question, answer, facts), then every skipped unit with its reason."""
    blocks = [f"===== {row.id} [{row.phrasing_set}] source_id={row.source_id}\nQ: {row.messages[0]['content']}\n"
              f"A: {row.messages[-1]['content']}\nfacts: {json.dumps(list(row.facts), ensure_ascii=False)}\n"
              for row in conversations.itertuples()]
    blocks += [f"----- skipped row {row.row_index} ({row.kind}, columns {list(row.columns)}): {row.reason}\n"
               for row in quarantine.itertuples()]
    return "\n".join(blocks)


def assert_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"{path} missing: run UPDATE_GOLDEN=1 pytest {__file__}"
    assert text == path.read_text(encoding="utf-8"), f"{name} changed; if intended, run UPDATE_GOLDEN=1"


# ---- golden files


def test_korean_preset_golden():
    conversations, quarantine = synthesize_frame([catalog()], KOREAN)
    assert_golden("table_qa_anime_ko.txt", golden_text(conversations, quarantine))


def test_tea_config_golden():
    conversations, quarantine = synthesize_frame([tea_rows()], tea_config())
    assert_golden("table_qa_tea.txt", golden_text(conversations, quarantine))


# ---- the Korean preset is recipe 003


def recipe_003(row: dict) -> dict[str, tuple[str, str]]:
    """The recipe's own three f-strings (shared/recipes/003_*: create_generic_information_1..3), on one row."""
    name, variant = row["English name"], row["Name"]
    return {
        "overview": (f"애니메이션 {name} aka {variant}은(는) 무엇에 대해요?",
                     f"애니메이션 {name} aka {variant}은(는) {row['Genres']} 장르의 애니메이션입니다. 줄거리는 다음과 같습니다: {row['Synopsis']}"),
        "production": (f"{name}의 제작사와 애니메이션 스튜디오는 누구였나요?",
                       f"애니메이션 {name}은(는) {row['Producers']}에 의해 제작되었습니다. 애니메이션은 {row['Studios']}에서 작업되었고, "
                       f"이 중 {row['Episodes']}화가 있습니다."),
        "reception": (f"애니메이션 {row['Name']}의 리뷰는 어떤가요?",
                      f"애니메이션 {row['Name']}은(는) 평가는 {row['Rating']}이고, {row['Scored By']}명의 사용자에 의해 평가되었으며 "
                      f"점수는 {row['Score']}입니다."),
    }


def first_phrasings(conversations: pd.DataFrame, source_row: int) -> dict[str, tuple[str, str]]:
    return {row.kind: (row.messages[0]["content"], row.messages[-1]["content"])
            for row in conversations.itertuples() if row.source_row == source_row and row.id.endswith(":0")}


def test_korean_preset_reproduces_the_recipes_three_kinds_word_for_word_on_a_clean_row():
    conversations, _ = synthesize_frame([catalog()], KOREAN)
    clean_row = catalog().iloc[4].to_dict()  # Minato Relay: no missing value, no float count, no credit line
    assert first_phrasings(conversations, 4) == recipe_003(clean_row)


def test_korean_preset_differs_from_the_recipe_only_where_the_recipe_is_wrong():
    conversations, quarantine = synthesize_frame([catalog()], KOREAN)
    row = catalog().iloc[0].to_dict()
    ours, recipes = first_phrasings(conversations, 0), recipe_003(row)
    # Counts a float column wrote as "12.0" and "48213.0" are written "12" and "48213"; MAL's credit line and
    # doubled spaces are not the synopsis.
    assert recipes["reception"][1].replace("48213.0명", "48213명") == ours["reception"][1]
    assert recipes["production"][1].replace("12.0화", "12화") == ours["production"][1]
    assert ours["reception"][0] == recipes["reception"][0] and ours["production"][0] == recipes["production"][0]
    assert "[Written by MAL Rewrite]" in recipes["overview"][1] and "MAL" not in ours["overview"][1]
    # The recipe writes UNKNOWN into Korean answers; table_qa skips the kind for that row and says why.
    assert "UNKNOWN" in recipe_003(catalog().iloc[1].to_dict())["production"][1]
    assert not any("UNKNOWN" in m["content"] for ms in conversations["messages"] for m in ms)
    assert "production skipped: English name is 'UNKNOWN', Producers is 'UNKNOWN'" in set(quarantine["reason"])


# ---- values, optional fields, missing values


def test_missing_values_skip_the_kind_are_counted_and_quarantined_with_the_row():
    conversations, quarantine = synthesize_frame([tea_rows()], tea_config())
    stats = synthesize_stats(conversations, quarantine, 10, tea_config())
    assert stats["skipped_by_kind"] == {"brewing": 1}
    assert stats["skipped_by_column"] == {"brewing": {"Caffeine (mg per cup)": 1}}
    assert quarantine["reason"].tolist() == ["brewing skipped: Caffeine (mg per cup) is 'UNKNOWN'"]
    assert json.loads(quarantine["row_json"].iloc[0])["tea_id"] == "T08"
    assert stats["conversations_by_kind"] == {"profile": 40, "brewing": 36}
    assert stats["conversations_by_phrasing_set"] == {"train": 57, "heldout": 19}
    assert 10 + stats["rows_expanded"] == len(conversations) + len(quarantine)
    assert not any("UNKNOWN" in m["content"] for ms in conversations["messages"] for m in ms)


def test_an_optional_field_drops_to_the_next_answer_and_list_items_are_facts():
    conversations, _ = synthesize_frame([tea_rows()], tea_config())
    answers = {(r.source_id, r.kind): (r.messages[-1]["content"], [(f["column"], f["value"]) for f in r.facts])
               for r in conversations.itertuples()}
    with_alias, facts = answers[("T02", "profile")]
    assert with_alias == ("Sorrin Pearl (also called ソリン真珠) is a green tea from Sorrin Terraces in the Kaleth Valley, "
                          "with notes of chestnut and sweet grass.")
    assert facts == [("Also called", "ソリン真珠"), ("Type", "green"), ("Estate", "Sorrin Terraces"),
                     ("Region", "the Kaleth Valley"), ("Tasting notes", "chestnut"), ("Tasting notes", "sweet grass")]
    without_alias, facts = answers[("T01", "profile")]
    assert without_alias.startswith("Vellmoor Gold is a black tea") and "Also called" not in dict(facts)
    # The name is in the question, so it is no fact; every fact is stated in the answer.
    for row in conversations.itertuples():
        assert "Name" not in {f["column"] for f in row.facts}
        assert all(f["value"] in row.messages[-1]["content"] for f in row.facts)


def options(**changes) -> dict:
    """A two-kind table_qa config on a made-up staff table."""
    base = {
        "id_column": "id",
        "fields": {"name": "Name", "team": "Team", "room": {"column": "Room", "type": "count"},
                   "skills": {"column": "Skills", "list_separator": ";", "last_join": " & "},
                   "nick": "Nickname"},
        "kinds": {
            "where": {"questions": ["Where does {name} sit?", "Which room is {name} in?"],
                      "heldout_questions": ["{name}'s room?"],
                      "answers": ["{name} ({nick}) sits in room {room} with the {team} team.",
                                  "{name} sits in room {room} with the {team} team."],
                      "optional": ["nick"]},
            "skills": {"questions": ["What can {name} do?"], "heldout_questions": [],
                       "answers": ["{name} knows {skills}."]},
        },
    }
    return {**base, **changes}


def staff() -> pd.DataFrame:
    return raw(pd.DataFrame({
        "id": ["s1", "s2", "s3", "s4"], "Name": ["Ana", "Bo", "Cy", "Di"], "Team": ["data", "ops", "N/A", "web"],
        "Room": ["12.0", "1,204", "7", "seven"], "Skills": ["SQL; Python; SQL", "UNKNOWN; Go", "", "CSS"],
        "Nickname": ["", "Bobo", "Cee", "nan"],
    }), "staff")


def test_counts_lists_and_mistyped_values():
    conversations, quarantine = synthesize_frame([staff()], SynthesizeConfig(kind="table_qa", table_qa=options()))
    answers = {(r.source_id, r.kind): r.messages[-1]["content"] for r in conversations.itertuples()}
    assert answers == {
        ("s1", "where"): "Ana sits in room 12 with the data team.",  # "12.0" read from a float column is a count
        ("s1", "skills"): "Ana knows SQL & Python.",  # items deduplicated, joined with the field's last_join
        ("s2", "where"): "Bo (Bobo) sits in room 1,204 with the ops team.",
        ("s2", "skills"): "Bo knows Go.",  # a missing item is dropped, the rest stays
        ("s4", "skills"): "Di knows CSS.",
    }
    assert sorted(quarantine["reason"]) == [
        "skills skipped: Skills is ''",
        "where skipped: Room 'seven' is not a count (a whole number such as 12 or 1,200)",
        "where skipped: Team is 'N/A'",
    ]
    kinds = conversations.groupby("kind")["phrasing_set"].agg(list).to_dict()
    assert kinds == {"skills": ["train"] * 3, "where": ["train", "train", "heldout"] * 2}


def test_an_answer_that_misses_a_fact_is_never_emitted(monkeypatch):
    def careless(parts, row_values, fields):
        return "".join(literal for literal, _ in parts)  # a rendering bug: every value left out

    monkeypatch.setattr(table_qa, "render", careless)
    conversations, quarantine = synthesize_frame([staff()], SynthesizeConfig(kind="table_qa", table_qa=options()))
    assert len(conversations) == 0
    assert "where skipped: the answer does not state Room '12'" in set(quarantine["reason"])


def test_per_row_phrasings_are_seeded_by_the_row_id_and_held_out_ones_never_trained():
    kinds = options()["kinds"]
    kinds["where"] = {**kinds["where"], "questions": ["Where does {name} sit?", "Which room is {name} in?",
                                                      "Where can I find {name}?", "{name}: which desk?"],
                      "heldout_questions": ["{name}'s room?", "Where is {name}'s office?"]}
    config = SynthesizeConfig(kind="table_qa", table_qa=options(kinds=kinds, trained_per_row=2, heldout_per_row=1))
    first, _ = synthesize_frame([staff()], config)
    reordered, _ = synthesize_frame([staff().iloc[::-1].reset_index(drop=True)], config)

    def asked(frame):
        return {(r.source_id, r.phrasing_set, r.messages[0]["content"]) for r in frame.itertuples()}

    assert asked(first) == asked(reordered) and first["id"].is_unique
    where = first[first["kind"] == "where"]
    assert where.groupby("source_id")["phrasing_set"].agg(list).tolist() == [["train", "train", "heldout"]] * 2
    names = staff().set_index("id")["Name"]
    for row in where[where["phrasing_set"] == "train"].itertuples():
        heldout_wordings = {q.replace("{name}", names[row.source_id]) for q in kinds["where"]["heldout_questions"]}
        assert row.messages[0]["content"] not in heldout_wordings
    other_seed = config.table_qa.model_copy(update={"seed": 5})
    assert asked(synthesize_frame([staff()], config.model_copy(update={"table_qa": other_seed}))[0]) != asked(first)


# ---- the stage


def test_run_synthesize_writes_the_contract_and_accounts_for_rows_with_uneven_kinds_and_duplicates(tmp_path):
    rows = pd.concat([staff(), staff().head(1).assign(_row=4, Team="finance")], ignore_index=True)  # s1 twice, facts differ
    config = SynthesizeConfig(kind="table_qa", table_qa=options())
    store = ArtifactStore(tmp_path)
    ref = store.write(rows, stage="ingest", contract="raw", schema_version=1, config_hash="t")
    result = run_synthesize([ref], config, store)
    written = store.read(result.output)
    check_structure(written, CONVERSATIONS)
    valid, broken = enforce(written, CONVERSATIONS)
    assert len(valid) == len(written) and len(broken) == 0
    quarantine = store.read(result.quarantine)
    check_structure(quarantine, QUARANTINE)
    assert result.stats["unaccounted_rows"] == 0  # "where" has 3 phrasings per row, "skills" 1
    assert result.rows_in + result.stats["rows_expanded"] == result.rows_out + result.rows_quarantined
    duplicates = quarantine[quarantine["reason"].str.startswith("duplicate id with different facts")]
    assert sorted(duplicates["kind"]) == ["skills", "where"] and set(duplicates["row_index"]) == {4}  # both kinds of row 4


# ---- evaluation scores the recorded facts, for any table


def test_fact_accuracy_per_kind_from_the_recorded_facts():
    conversations, _ = synthesize_frame([tea_rows()], tea_config())
    questions = pd.DataFrame({
        "id": conversations["id"], "set": conversations["phrasing_set"].map({"train": "trained", "heldout": "heldout"}),
        "kind": conversations["kind"], "prompt": [m[0]["content"] for m in conversations["messages"]],
        "reference": [m[-1]["content"] for m in conversations["messages"]], "facts": conversations["facts"],
    })
    right = [{"text": r, "stopped": True, "n_tokens": 20} for r in questions["reference"]]
    # A model that gets brewing numbers wrong: "95 °C" becomes "59 °C", every other fact kept.
    wrong = [{"text": r.replace("at 95 °C", "at 59 °C") if k == "brewing" else r, "stopped": True, "n_tokens": 20}
             for r, k in zip(questions["reference"], questions["kind"])]
    assert summarise(score_answers(questions, right))["fact_accuracy_by_kind"] == {"brewing": 1.0, "profile": 1.0}
    summary = summarise(score_answers(questions, wrong))
    teas_at_95 = sum("at 95 °C" in r for r, k in zip(questions["reference"], questions["kind"]) if k == "brewing")
    assert 0 < teas_at_95 < 36
    assert summary["fact_accuracy_by_kind"]["brewing"] == round(1 - teas_at_95 / 36, 4)
    assert summary["heldout_fact_accuracy_by_kind"]["profile"] == 1.0
    # Korean facts are found in a Korean answer the same way.
    korean, _ = synthesize_frame([catalog()], KOREAN)
    row = korean.iloc[0]
    assert facts_present(row.messages[-1]["content"], row.facts) is True
    assert facts_present("애니메이션 Starry Drift은(는) 드라마입니다.", row.facts) is False
