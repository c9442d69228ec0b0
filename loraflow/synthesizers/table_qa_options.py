"""Config of the table_qa synthesizer: grounded questions about any table, declared in YAML, in any language.

A config names the table's fields (placeholder -> source column, fact type, list splitting), then question kinds:
each has trained question phrasings, held-out ones (asked only at evaluation), answer templates and optional
fields. Templates are plain text with `{field}` placeholders (`{{` and `}}` for literal braces), in any script.
Everything a user can get wrong in a template is refused here, before a row is read, with its key and the fix.
A `preset` (loraflow/synthesizers/presets/table_qa/<name>.yaml) supplies fields and kinds; keys set beside it win,
and `fields` merge one field at a time, so a preset is reused on a table with other column names.
"""

import difflib
import re
import string
from functools import cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, field_validator, model_validator

from loraflow.config.base import StrictModel
from loraflow.config.paraphrase import ParaphraseOptions

PRESETS_DIR = Path(__file__).resolve().parent / "presets" / "table_qa"
RESERVED_KINDS = ("refusal",)  # the evaluation scores kind "refusal" as a refusal (loraflow/evaluation/metrics.py)
FactTypeName = Literal["count", "score", "date", "text"]  # loraflow/synthesizers/facts.py checks each


class TableField(StrictModel):
    """One placeholder of the templates: the source column it reads and how its value is read."""

    column: str = Field(..., min_length=1, description="Source column that holds the value.")
    type: FactTypeName = Field(
        "text", description="Fact type: count (12, 1,200), score (6.85), date, or text. A value that does not parse as "
        "its type skips the kind for that row with the reason, like a missing one.",
    )
    list_separator: str | None = Field(
        None, min_length=1, description="Split the value on this separator into items (each its own fact; missing "
        "and repeated items dropped), joined back with `join` and `last_join`. None: one value.",
    )
    join: str = Field(", ", description="Text between list items (all but the last two).")
    last_join: str = Field(" and ", description="Text between the last two list items (', ' or '와 ' in Korean).")
    max_words: int | None = Field(
        None, ge=5, description="Cut the value to this many words, at a sentence end when that keeps half of them.",
    )
    drop_pattern: str | None = Field(
        None, description="A regular expression removed from the value before use (e.g. a trailing credit line).",
    )

    @field_validator("drop_pattern")
    @classmethod
    def _compiles(cls, pattern):
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"not a valid regular expression ({error}) -> fix the pattern") from None
        return pattern


class NaturalQuestion(StrictModel):
    """A question asked the way users ask, at evaluation only, scored on the facts it asks for."""

    question: str = Field(..., min_length=1, description="The wording ({field} placeholders), never trained.")
    asks: list[str] | None = Field(
        None, description="Fields whose facts the question asks for (scored); None: every fact of the answer.",
    )


class QuestionKind(StrictModel):
    """One kind of question asked about every row, and the answer it gets."""

    questions: list[str] = Field(..., min_length=1, description="Trained question phrasings ({field} placeholders).")
    heldout_questions: list[str] = Field(
        default_factory=list, description="Other phrasings, never trained: asked at evaluation (held-out fact accuracy).",
    )
    answers: list[str] = Field(
        ..., min_length=1, description="Answer templates, tried in order: the first whose fields all have a value for "
        "the row is the answer (list the fullest first, then one without the optional fields).",
    )
    optional: list[str] = Field(
        default_factory=list, description="Fields the kind can do without: a missing value drops to the next answer "
        "template instead of skipping the kind for the row. Questions may not name them.",
    )
    natural_questions: list[NaturalQuestion] = Field(
        default_factory=list, description="Questions asked the way users ask (phrasing_set natural, evaluation only: "
        "natural fact accuracy), each scored on the facts it `asks` for. A plain string asks for every fact.",
    )

    @field_validator("natural_questions", mode="before")
    @classmethod
    def _question_shorthand(cls, questions):
        if isinstance(questions, list):
            return [{"question": item} if isinstance(item, str) else item for item in questions]
        return questions


class TableQAOptions(StrictModel):
    """Options of the table_qa synthesizer: fields, question kinds and their templates, or a preset (docs/table_qa.md)."""

    preset: str | None = Field(
        None, description="A shipped preset (loraflow/synthesizers/presets/table_qa/): its fields and kinds are used unless "
        "set here; `fields` entries set here replace the preset's one field at a time.",
    )
    id_column: str | None = Field(
        None, description="Column with the row's stable id (groups its questions on one side of the split); None: "
        "source + row position.",
    )
    fields: dict[str, TableField] = Field(
        ..., min_length=1, description="Placeholder name -> its column and type. A plain string is the column.",
    )
    kinds: dict[str, QuestionKind] = Field(..., min_length=1, description="Question kind name -> its templates.")
    trained_per_row: int | None = Field(
        None, ge=1, description="At most this many trained phrasings per row and kind, a seeded choice per row (None: all).",
    )
    heldout_per_row: int | None = Field(
        None, ge=0, description="At most this many held-out phrasings per row and kind, a seeded choice per row (None: all).",
    )
    missing_values: list[str] = Field(
        default_factory=lambda: ["UNKNOWN", "Unknown", "", "nan", "NaN", "None", "N/A", "n/a", "-"],
        description="Values treated as missing (compared after trimming, ignoring case; empty/NaN/None always are): "
        "a kind that needs one is skipped for that row and counted.",
    )
    seed: int = Field(0, description="Seed of the per-row choice of phrasings (deterministic, by the row's id).")
    paraphrase: ParaphraseOptions = Field(
        default_factory=ParaphraseOptions, description="Optional extra trained phrasings per kind written by a local "
        "model once per config, filtered (key field kept, no answer facts, no duplicates) and recorded (docs/table_qa.md).",
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data):
        if not isinstance(data, dict) or not data.get("preset"):
            return data
        merged = dict(load_preset(data["preset"]))
        for key, value in data.items():
            if key == "fields" and isinstance(value, dict):
                fields = dict(merged.get("fields", {}))
                for name, field in value.items():
                    base = fields.get(name)
                    if isinstance(field, dict) and isinstance(base, (dict, str)):
                        field = {**({"column": base} if isinstance(base, str) else base), **field}
                    fields[name] = field
                merged["fields"] = fields
            else:
                merged[key] = value
        return merged

    @field_validator("fields", mode="before")
    @classmethod
    def _column_shorthand(cls, fields):
        if isinstance(fields, dict):
            return {name: {"column": value} if isinstance(value, str) else value for name, value in fields.items()}
        return fields

    @model_validator(mode="after")
    def _templates_fit(self):
        problems = template_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def kind_fields(self, kind: str) -> list[str]:
        """Every field a kind's templates name, in first-use order."""
        templates = [*self.kinds[kind].questions, *self.kinds[kind].heldout_questions,
                     *(natural.question for natural in self.kinds[kind].natural_questions), *self.kinds[kind].answers]
        return list(dict.fromkeys(name for template in templates for name in placeholders(template)))

    def question_fields(self, kind: str) -> set[str]:
        """Fields the kind's questions name: the question states them, so they are not facts of the answer."""
        spec = self.kinds[kind]
        return {name for template in [*spec.questions, *spec.heldout_questions,
                                      *(natural.question for natural in spec.natural_questions)]
                for name in placeholders(template)}

    def key_fields(self, kind: str) -> set[str]:
        """Fields every trained question of the kind names (the row's key, e.g. {name}): a paraphrase must keep them."""
        return set.intersection(*(set(placeholders(template)) for template in self.kinds[kind].questions))

    def all_phrasings(self) -> list[str]:
        """Every question wording of every kind (trained, held-out, natural): what a paraphrase may not repeat."""
        return [template for spec in self.kinds.values() for template in
                [*spec.questions, *spec.heldout_questions, *(natural.question for natural in spec.natural_questions)]]

    def per_row(self, kind: str) -> tuple[int, int]:
        """(trained, held-out) phrasings each row gets for `kind` (without paraphrases and natural questions)."""
        spec = self.kinds[kind]
        trained, heldout = len(spec.questions), len(spec.heldout_questions)
        return (trained if self.trained_per_row is None else min(trained, self.trained_per_row),
                heldout if self.heldout_per_row is None else min(heldout, self.heldout_per_row))


# ---- templates


def placeholders(template: str) -> list[str]:
    """The field names a template uses, in order (ValueError for a malformed template)."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def template_parts(template: str) -> list[tuple[str, str | None]]:
    """(literal text, field or None) pieces, to render by concatenation (no str.format on user text)."""
    return [(literal, name) for literal, name, _, _ in string.Formatter().parse(template)]


def template_syntax_problem(template: str) -> str | None:
    """Why a template cannot be used ({} without a name, a format spec, an unclosed brace), or None."""
    try:
        pieces = list(string.Formatter().parse(template))
    except ValueError as error:
        return f"is not a valid template ({error}) -> write {{field}} for a value and {{{{ or }}}} for a literal brace"
    for _, name, spec, conversion in pieces:
        if name is not None and (not name.strip() or spec or conversion or not re.fullmatch(r"\w+", name)):
            return (f"has the placeholder {{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}, "
                    f"but placeholders are plain field names -> write {{field}} with a name from `fields`")
    return None


def normalised_phrasing(text: str) -> str:
    """How two phrasings are compared for duplicates: case-folded, whitespace collapsed."""
    return " ".join(text.casefold().split())


def template_problems(options: TableQAOptions) -> list[str]:
    """Every problem of the kinds' templates, one line each: 'key.path: what is wrong -> the fix'."""
    problems = []
    known = list(options.fields)
    for kind, spec in options.kinds.items():
        where = f"kinds.{kind}"
        if kind in RESERVED_KINDS or not re.fullmatch(r"[A-Za-z0-9_]+", kind):
            problems.append(f"{where}: the kind name {kind!r} is reserved or not a plain name -> rename the kind "
                            f"(letters, digits, _; not {', '.join(RESERVED_KINDS)})")
        templates = [(f"{where}.questions.{i}", t) for i, t in enumerate(spec.questions)]
        templates += [(f"{where}.heldout_questions.{i}", t) for i, t in enumerate(spec.heldout_questions)]
        templates += [(f"{where}.natural_questions.{i}.question", n.question) for i, n in enumerate(spec.natural_questions)]
        answers = [(f"{where}.answers.{i}", t) for i, t in enumerate(spec.answers)]
        broken = set()
        for key, template in templates + answers:
            syntax = template_syntax_problem(template)
            if syntax:
                problems.append(f"{key}: {template!r} {syntax}")
                broken.add(key)
                continue
            for name in placeholders(template):
                if name not in options.fields:
                    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
                    hint = f"did you mean {{{close[0]}}}? " if close else ""
                    problems.append(f"{key}: {{{name}}} is not a field -> {hint}declare it under fields "
                                    f"(fields.{name}.column: the source column) or fix the spelling; fields: {known}")
        for key in [f"{where}.optional.{i}" for i, name in enumerate(spec.optional) if name not in options.fields]:
            problems.append(f"{key}: {spec.optional[int(key.rsplit('.', 1)[1])]!r} is not a field -> name one of {known}")
        seen: dict[str, str] = {}
        for key, template in templates:
            if not template.strip():
                problems.append(f"{key}: the phrasing is empty -> write the question or remove the entry")
                continue
            earlier = seen.setdefault(normalised_phrasing(template), key)
            if earlier != key:
                problems.append(f"{key}: duplicate phrasing, the same as {earlier} ({template!r}) -> reword or remove one "
                                f"(a held-out phrasing equal to a trained one would be trained)")
        if broken & {key for key, _ in templates + answers}:
            continue
        optional = set(spec.optional)
        asked = {name for _, t in templates for name in placeholders(t)}
        for name in sorted(asked & optional):
            problems.append(f"{where}.optional: {name!r} is named by a question -> take it out of optional (a question "
                            f"cannot drop it) or out of the questions")
        if all(set(placeholders(t)) & optional for _, t in answers):
            problems.append(f"{where}.answers: every answer names an optional field ({sorted(optional)}) -> add a last "
                            f"answer without them, so a row missing them still gets an answer")
        for key, template in answers:
            if not set(placeholders(template)) - asked:
                problems.append(f"{key}: states no field the question does not already give, so it has no fact to "
                                f"check -> name at least one other field in the answer")
        facts = set.intersection(*(set(placeholders(t)) for _, t in answers)) - asked - optional
        for i, natural in enumerate(spec.natural_questions):
            for name in natural.asks or []:
                if name not in facts:
                    problems.append(f"{where}.natural_questions.{i}.asks: {name!r} is not a fact every answer of the kind "
                                    f"states -> ask for one of {sorted(facts)} (optional fields cannot be asked for)")
    return problems


def heldout_problems(options: TableQAOptions) -> list[str]:
    """Kinds that ask no held-out phrasing (for a gate that needs one), 'key: what -> fix' each."""
    return [f"kinds.{kind}.heldout_questions: none asked, but eval.gate.min_heldout_fact_accuracy needs held-out "
            f"phrasings -> add at least one (a wording never trained), or set min_heldout_fact_accuracy: null"
            for kind in options.kinds if options.per_row(kind)[1] == 0]


# ---- presets


def preset_names() -> list[str]:
    """The shipped presets' names."""
    return sorted(path.stem for path in PRESETS_DIR.glob("*.yaml"))


@cache
def _preset_text(name: str) -> str:
    return (PRESETS_DIR / f"{name}.yaml").read_text(encoding="utf-8")


def load_preset(name: str) -> dict:
    """A preset's options as a dict (ValueError naming the shipped ones when there is no such preset)."""
    if name not in preset_names():
        raise ValueError(f"preset {name!r} does not exist -> use one of {preset_names()}, or declare fields and kinds")
    return yaml.safe_load(_preset_text(name)) or {}
