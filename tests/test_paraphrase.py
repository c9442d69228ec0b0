"""table_qa's paraphrase augmentation: the filters on crafted model outputs, the real small model's samples (only
valid phrasings accepted, the same for the same seed), the stage cached in the prepare flow (a re-run loads no
model: counted), the synthesizer's use of accepted phrasings (trained only, ids :p<j>), and config errors by key."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from loraflow.config.pipeline import ConfigError, load_config
from loraflow.config.synthesize import SynthesizeConfig
from loraflow.synthesizers.table_qa_options import TableQAOptions, placeholders
from tasks import paraphrase
from tasks.synthesize import synthesize_frame
from tasks.paraphrase_filters import cleaned, judge
from tests.test_table_qa import options, staff
from tests.test_table_qa_config import write_config
from tests.test_table_qa_flow import tea_config


def staff_options(**paraphrase_settings) -> TableQAOptions:
    natural = {"natural_questions": [{"question": "In what room do I find {name}?", "asks": ["room"]}]}
    settings = options()
    settings["kinds"]["where"].update(natural)
    return TableQAOptions(**settings, paraphrase={"enabled": True, **paraphrase_settings})


def verdict(text: str, kind: str = "where", template: str = "Where does {name} sit?", **settings) -> dict:
    return judge([{"kind": kind, "template": template, "sample": 0, "text": text}], staff_options(**settings))[0]


# ---- filters, on outputs a model could write


@pytest.mark.parametrize("text, rule", [
    ("", "empty"),
    ("Where does {name} sit?\nAnd why?", "lines"),
    ("{name}?", "length"),
    ("Where, in this big building of ours with its many floors and corridors, does our colleague {name} sit every day?", "length"),
    ("Where does {name} sit", "ending"),
    ("In which room does {name} sit with {team}?", "leaks_fact"),   # the team is what the answer states
    ("Is {name} in room {room} today?", "leaks_fact"),
    ("Where does {nick} sit today?", "leaks_fact"),                  # an optional field is an answer fact too
    ("Where does {fullname} sit today?", "unknown_field"),           # no such field / column in the table
    ("Where does {skills} sit today?", "other_field"),               # another kind's field: not asked by here
    ("Where does the new colleague sit?", "drops_key"),
    ("Where does {name:>10} sit?", "template"),
    ("Which room is {name} in?", "duplicate"),                       # a configured trained phrasing
    ("  WHICH room is   {name} in ?", "duplicate"),                  # case, spaces and end marks ignored
    ("In what room do I find {name}", "ending"),
    ("In what room do I find {name}!", "ending"),
])
def test_each_filter_refuses_with_its_rule(text, rule):
    result = verdict(text)
    assert not result["accepted"] and result["rule"] == rule, result
    assert result["reason"].startswith(f"{rule}: ")


def test_natural_questions_are_never_repeated():
    result = verdict("in what room do I find {name}?")
    assert result["rule"] == "duplicate" and "In what room do I find {name}?" in result["reason"]


def test_a_good_paraphrase_is_accepted_cleaned():
    result = verdict('"In which office does {name} work?"')
    assert result["accepted"] and result["paraphrase"] == "In which office does {name} work?" and result["reason"] == ""


def test_duplicates_among_paraphrases_and_per_kind_cap():
    candidates = [{"kind": "where", "template": "Where does {name} sit?", "sample": i, "text": text}
                  for i, text in enumerate(["Where is {name}'s desk?", "where is {name}'s desk ?",
                                            "Where can I find {name}?", "Which desk is {name} at?"])]
    verdicts = judge(candidates, staff_options(per_kind=2))
    assert [v["rule"] for v in verdicts] == ["", "duplicate", "", "per_kind"]
    assert "accepted before it" in verdicts[1]["reason"]


def test_an_imperative_phrasing_may_keep_its_full_stop():
    assert verdict("Describe where {name} sits.", template="Tell me where {name} sits.")["accepted"]
    assert verdict("Describe where {name} sits.")["rule"] == "ending"  # its phrasing is a question


def test_cleaning_strips_wrapping_quotes_only():
    assert cleaned(' "Where is {name}?" ') == "Where is {name}?"
    assert cleaned("“Where is {name}?”") == "Where is {name}?"
    assert cleaned("'Where' is {name}?") == "'Where' is {name}?"


def test_stage_frames_account_for_every_sample():
    verdicts = judge([{"kind": "where", "template": "Where does {name} sit?", "sample": i, "text": text}
                      for i, text in enumerate(["Where is {name}'s desk?", "Where does {name} sit", "no"])],
                     staff_options())
    accepted, quarantine = paraphrase.paraphrase_frames(verdicts)
    assert accepted["paraphrase"].tolist() == ["Where is {name}'s desk?"]
    assert quarantine["rule"].tolist() == ["ending", "length"] and quarantine["row_index"].tolist() == [1, 2]
    assert '"text": "Where does {name} sit"' in quarantine["row_json"].iloc[0]


# ---- the synthesizer: accepted paraphrases are trained phrasings only, with their provenance in the id


def test_paraphrases_join_trained_phrasings_only():
    config = SynthesizeConfig(kind="table_qa", table_qa=staff_options().model_dump())
    plain, _ = synthesize_frame([staff()], config)
    more, _ = synthesize_frame([staff()], config, paraphrases={"where": ["In which office does {name} work?"]})
    added = more[~more["id"].isin(plain["id"])]
    assert set(added["phrasing_set"]) == {"train"} and added["id"].str.endswith(":where:p0").all()
    assert added["messages"].map(lambda m: m[0]["content"]).str.startswith("In which office does ").all()
    assert more[more["phrasing_set"] != "train"].reset_index(drop=True).equals(
        plain[plain["phrasing_set"] != "train"].reset_index(drop=True))  # held-out and natural rows unchanged
    natural = plain[plain["phrasing_set"] == "natural"]
    assert natural["id"].str.endswith(":where:n0").all()
    assert all([fact["column"] for fact in facts] == ["Room"] for facts in natural["facts"])  # scored on what it asks


# ---- the real small model


@pytest.fixture(scope="module")
def one_template_options() -> TableQAOptions:
    settings = options()
    settings["kinds"] = {"where": {**settings["kinds"]["where"], "questions": ["Where does {name} sit?"]}}
    return TableQAOptions(**settings, paraphrase={"enabled": True, "candidates_per_template": 4, "max_new_tokens": 24,
                                                  "per_kind": 4})


def test_the_base_model_samples_deterministically_and_only_valid_ones_pass(model_dir, one_template_options):
    requests = paraphrase.paraphrase_requests(one_template_options)
    assert requests == [{"kind": "where", "template": "Where does {name} sit?", "keys": ["name"]}]
    first = paraphrase.generate_candidates(requests, one_template_options, model_dir)
    again = paraphrase.generate_candidates(requests, one_template_options, model_dir)
    assert [c["text"] for c in first] == [c["text"] for c in again] and len(first) == 4
    other_seed = one_template_options.model_copy(update={"paraphrase": one_template_options.paraphrase.model_copy(update={"seed": 1})})
    assert [c["text"] for c in paraphrase.generate_candidates(requests, other_seed, model_dir)] != [c["text"] for c in first]
    for result in judge(first, one_template_options):
        if result["accepted"]:
            assert placeholders(result["paraphrase"]) == ["name"] and "\n" not in result["paraphrase"]
        else:
            assert result["rule"] and result["reason"]


def test_the_stage_is_cached_in_the_prepare_flow(prefect_api, tmp_path, monkeypatch):
    from flows.prepare import prepare_flow

    calls = []
    real = paraphrase.sample_paraphrases
    monkeypatch.setattr(paraphrase, "sample_paraphrases", lambda *a, **k: calls.append(1) or real(*a, **k))
    path = tea_config(tmp_path, "store")
    text = path.read_text(encoding="utf-8").replace(
        "    id_column: tea_id\n",
        "    id_column: tea_id\n    paraphrase: {enabled: true, candidates_per_template: 2, max_new_tokens: 24}\n")
    path.write_text(text, encoding="utf-8")

    first = prepare_flow(load_config(path))
    stage = first["stages"]["paraphrase"]
    assert calls == [1] and not stage["cached"]
    assert stage["rows_in"] == 12 == stage["rows_out"] + stage["rows_quarantined"]  # 6 trained phrasings x 2 samples
    accepted = stage["stats"]["accepted"]
    synthesize = first["stages"]["synthesize"]["stats"]
    assert synthesize["paraphrases"] == {kind: phrasings for kind, phrasings in accepted.items() if phrasings}
    assert synthesize["paraphrase_conversations"] == sum(
        len(phrasings) * {"profile": 10, "brewing": 9}[kind] for kind, phrasings in accepted.items())
    assert first["stages"]["synthesize"]["stats"]["unaccounted_rows"] == 0

    second = prepare_flow(load_config(path))
    assert calls == [1], "an unchanged re-run must not call the model"
    assert second["stages"]["paraphrase"]["cached"] and second["tokens"]["sha256"] == first["tokens"]["sha256"]


# ---- config errors, by key


def test_paraphrase_settings_are_validated_by_key(tmp_path):
    settings = options(paraphrase={"enabled": True, "per_kind": 0, "temprature": 0.5})
    with pytest.raises(ConfigError) as error:
        load_config(write_config(tmp_path, settings))
    message = str(error.value)
    assert "synthesize.table_qa.paraphrase.per_kind" in message and "greater than or equal to 1" in message
    assert "synthesize.table_qa.paraphrase.temprature" in message


def test_natural_questions_are_checked_like_the_other_phrasings():
    settings = options()
    settings["kinds"]["where"]["natural_questions"] = [
        {"question": "Which room is {name} in?", "asks": ["room"]},      # a trained phrasing
        {"question": "What team is {name} on?", "asks": ["nick"]},        # optional: not in every answer
        {"question": "Where is {nme}?"},
    ]
    with pytest.raises(ValidationError) as error:
        TableQAOptions(**settings)
    message = str(error.value)
    assert "kinds.where.natural_questions.0.question: duplicate phrasing, the same as kinds.where.questions.1" in message
    assert "kinds.where.natural_questions.1.asks: 'nick' is not a fact every answer of the kind states" in message
    assert "kinds.where.natural_questions.2.question: {nme} is not a field -> did you mean {name}?" in message


def test_paraphrase_is_off_by_default_and_in_the_schema():
    assert TableQAOptions(**options()).paraphrase.enabled is False
    schema = SynthesizeConfig.model_json_schema()
    described = schema["$defs"]["ParaphraseOptions"]["properties"]
    assert all(field.get("description") for field in described.values())
    assert set(described) == {"enabled", "model", "per_kind", "candidates_per_template", "temperature",
                              "max_new_tokens", "seed"}
