"""Which model-written paraphrases of a kind's trained phrasings table_qa may train on, and why the others not.

A paraphrase is a question template like the config's own ({field} placeholders). It is accepted only when it
- is one line, a well-formed template, of sane length, and ends like a question (a '?', or the same final mark
  as the phrasing it rewrites, for requests such as "Tell me about {name}.");
- names only fields of the table, keeps the kind's key (the fields every trained phrasing names, e.g. {name}),
  names no field the kind's answer states as a fact (it would leak the answer into the question), and no field
  the kind's questions do not ask by;
- is no duplicate (case-folded, whitespace collapsed, end punctuation ignored) of any trained, held-out or natural
  phrasing of any kind, nor of a paraphrase accepted before it;
- fits in `paraphrase.per_kind` (the first ones that pass, in candidate order, are kept).
Every candidate gets a verdict: accepted, or the reason it was refused; none is dropped unrecorded.
"""

from loraflow.synthesizers.table_qa_options import TableQAOptions, normalised_phrasing, placeholders, template_syntax_problem

MIN_WORDS = 3
QUESTION_ENDS = ("?", "？", "؟")


def cleaned(text: str) -> str:
    """A sampled paraphrase as the model meant it: outer whitespace and one pair of wrapping quotes removed."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`“”":
        text = text[1:-1].strip()
    if len(text) >= 2 and text[0] == "“" and text[-1] == "”":
        text = text[1:-1].strip()
    return text


def comparable(text: str) -> str:
    """How paraphrases are compared for duplicates: normalised_phrasing, end punctuation ignored."""
    return normalised_phrasing(text).rstrip("?？؟.!。 ")


def shape_problem(paraphrase: str, template: str) -> tuple[str, str] | None:
    """(rule, why) when a paraphrase does not read as one question (empty, several lines, length, ending), or None."""
    if not paraphrase:
        return "empty", "the model wrote nothing"
    if "\n" in paraphrase or "\r" in paraphrase:
        return "lines", "more than one line"
    words, source_words = len(paraphrase.split()), len(template.split())
    longest = max(2 * source_words, source_words + 8)
    if words < MIN_WORDS or words > longest:
        return "length", f"{words} words, outside {MIN_WORDS}..{longest} for a phrasing of {source_words} words"
    if not paraphrase.endswith(QUESTION_ENDS) and not (not template.endswith(QUESTION_ENDS) and paraphrase[-1] == template[-1]):
        return "ending", f"does not end like a question ({paraphrase[-1]!r})"
    return None


def field_problem(paraphrase: str, kind: str, options: TableQAOptions) -> tuple[str, str] | None:
    """(rule, why) when a paraphrase's placeholders cannot be used for `kind` (unknown field, leaked fact, key
    dropped), or None."""
    syntax = template_syntax_problem(paraphrase)
    if syntax:
        return "template", syntax.split(" -> ")[0]
    named = list(dict.fromkeys(placeholders(paraphrase)))
    unknown = [name for name in named if name not in options.fields]
    if unknown:
        return "unknown_field", f"names {{{unknown[0]}}}, which is no field (column) of the table"
    asked = options.question_fields(kind)
    answer_fields = {name for answer in options.kinds[kind].answers for name in placeholders(answer)}
    leaked = [name for name in named if name in answer_fields and name not in asked]
    if leaked:
        return "leaks_fact", f"leaks the answer fact {{{leaked[0]}}} ({options.fields[leaked[0]].column}) into the question"
    foreign = [name for name in named if name not in asked]
    if foreign:
        return "other_field", f"names {{{foreign[0]}}}, which the kind's questions do not ask by"
    dropped = sorted(options.key_fields(kind) - set(named))
    if dropped:
        return "drops_key", f"drops the key {{{dropped[0]}}} (every trained phrasing of the kind names it)"
    return None


def judge(candidates: list[dict], options: TableQAOptions) -> list[dict]:
    """Each candidate {kind, template, text} with `paraphrase` (cleaned), `accepted` and `reason` ('rule: why', ''
    if accepted), in the order given (which decides what per_kind keeps)."""
    existing = {comparable(template): template for template in options.all_phrasings()}
    accepted: dict[str, str] = {}
    kept = dict.fromkeys(options.kinds, 0)
    verdicts = []
    for candidate in candidates:
        kind, template = candidate["kind"], candidate["template"]
        paraphrase = cleaned(candidate["text"])
        key = comparable(paraphrase)
        problem = shape_problem(paraphrase, template) or field_problem(paraphrase, kind, options)
        if problem is None and key in existing:
            problem = "duplicate", f"the same as the configured phrasing {existing[key]!r}"
        if problem is None and key in accepted:
            problem = "duplicate", f"the same as the paraphrase {accepted[key]!r} accepted before it"
        if problem is None and kept[kind] >= options.paraphrase.per_kind:
            problem = "per_kind", f"{options.paraphrase.per_kind} already accepted for {kind} (paraphrase.per_kind)"
        if problem is None:
            accepted[key] = paraphrase
            kept[kind] += 1
        verdicts.append({**candidate, "paraphrase": paraphrase, "accepted": problem is None,
                         "rule": problem[0] if problem else "", "reason": f"{problem[0]}: {problem[1]}" if problem else ""})
    return verdicts


def accepted_by_kind(verdicts: list[dict], kinds) -> dict[str, list[str]]:
    """kind -> its accepted paraphrases, in verdict order (every kind present, maybe empty)."""
    return {kind: [v["paraphrase"] for v in verdicts if v["accepted"] and v["kind"] == kind] for kind in kinds}
