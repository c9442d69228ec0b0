"""The tokenizer's own chat template (`apply_chat_template`), rendered fast and checked.

Calling `apply_chat_template` per example costs a Jinja render each (75k examples: tens of seconds). The
template is instead rendered once on probe conversations whose contents are sentinels; the text between
sentinels gives the glue for each role transition (head, user->assistant, assistant->user, tail, and the
generation prompt). Examples are then built by string concatenation. The derived glue is used only when
it reproduces `apply_chat_template` exactly on varied probes (multi-turn, with/without system, Korean,
padded whitespace) and on a sample of the real data (`verify`); otherwise, and for any role sequence the
probes did not cover, each example is rendered by `apply_chat_template` itself.
"""

import re

from loraflow.templates.base import Rendered, TokenizerFacts

_SENTINELS = {"system": "QzxSYSqz{}", "user": "QzxUSRqz{}", "assistant": "QzxASTqz{}"}

PROBE_CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "안녕하세요?"}, {"role": "assistant", "content": "네, 안녕하세요."},
     {"role": "user", "content": "  padded \n"}, {"role": "assistant", "content": " spaced answer\n\n"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}, {"role": "user", "content": "e"},
     {"role": "assistant", "content": "f"}],
]


class ChatTemplate:
    name = "chat_template"

    def __init__(self, facts: TokenizerFacts, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "format.template=chat_template but the tokenizer has no chat template: "
                "pick a fixed template (chatml, alpaca, ...) or use a model that ships one"
            )
        self.facts = facts
        self.tokenizer = tokenizer
        self._plans: dict[tuple, list[str] | None] = {}
        self.glue, self.marker = self._derive()
        self.fast = self.glue is not None and self.verify(PROBE_CONVERSATIONS) == []

    # ---- rendering
    def render(self, messages: list[dict]) -> Rendered:
        if self.fast:
            rendered = self._render_fast(messages)
            if rendered is not None:
                return rendered
        return self.render_slow(messages)

    def _render_fast(self, messages: list[dict]) -> Rendered | None:
        roles = tuple(m["role"] for m in messages)
        if roles not in self._plans:
            self._plans[roles] = self._plan(roles)
        plan = self._plans[roles]
        if not plan:
            return None  # a role sequence the probes did not cover
        marker, cut = self.marker, len(self.marker)
        pieces, pending, last_answer = [], [plan[0]], 0
        for message, following in zip(messages, plan[1:]):
            if message["role"] == "assistant":
                pieces.append(("".join(pending), False))
                last_answer = len(pieces)
                pieces.append((message["content"] + marker, True))
                pending = [following[cut:]]
            else:
                pending += [message["content"], following]
        tail = "".join(pending)
        if tail:
            pieces.append((tail, False))
        segments = tuple(p for p in pieces if p[0])
        return Rendered(segments, "".join(text for text, _ in pieces[:last_answer]), messages[-1]["content"])

    def _plan(self, roles: tuple[str, ...]) -> list[str] | None:
        """The glue texts around each message for this role sequence, or None if one is not known."""
        if not roles or roles[-1] != "assistant":
            return None
        glues = [self.glue.get(("head", roles[0]))]
        glues += [self.glue.get(("join", a, b)) for a, b in zip(roles, roles[1:])]
        glues.append(self.glue.get(("tail", roles[-1])))
        return None if any(g is None for g in glues) else glues

    def render_slow(self, messages: list[dict]) -> Rendered:
        """One `apply_chat_template` call per assistant turn (plus one for the whole text)."""
        full = self._apply(messages)
        spans, cursor, prompt = [], 0, ""
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._apply(messages[:index], generation=True)
            # Templates may trim contents: look for the content as given, then stripped.
            start, content = -1, message["content"]
            for content in (message["content"], message["content"].strip()):
                start = len(prompt) if full.startswith(prompt) and full.startswith(content, len(prompt)) else full.find(content, cursor)
                if start >= 0:
                    break
            if start < 0:
                raise ValueError(f"chat_template: assistant turn {index} does not appear verbatim in the rendered text")
            end = start + len(content)
            end += self._marker_length(full[end:])
            spans.append((start, end))
            cursor = end
        pieces, position = [], 0
        for start, end in spans:
            pieces += [(full[position:start], False), (full[start:end], True)]
            position = end
        pieces.append((full[position:], False))
        return Rendered(tuple((t, trained) for t, trained in pieces if t), prompt, messages[-1]["content"])

    def stop_texts(self) -> set[str]:
        """Texts of tokens that may end a trained answer."""
        found = {t for t in self.facts.special_texts if self.marker and t in self.marker}
        return found | {self.facts.eos_text}

    # ---- deriving and checking the glue
    def verify(self, conversations) -> list[int]:
        """Indices of conversations where the fast render differs from `apply_chat_template`."""
        bad = []
        for index, messages in enumerate(conversations):
            messages = [dict(m) for m in messages]
            rendered = self._render_fast(messages) if self.glue is not None else None
            try:
                same = rendered is not None and rendered.text == self._apply(messages) and \
                    rendered.prompt == self._apply(messages[:-1], generation=True)
            except Exception:  # a template that rejects the conversation (e.g. roles must alternate)
                same = False
            if not same:
                bad.append(index)
        return bad

    def _apply(self, messages, generation=False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    def _derive(self):
        glue: dict[tuple, str] = {}
        try:
            for first in (["system"], []):
                roles = first + ["user", "assistant", "user", "assistant"]
                messages = [{"role": r, "content": _SENTINELS[r].format(i)} for i, r in enumerate(roles)]
                pieces = _split(self._apply(messages), messages)
                generation = _split(self._apply(messages[:-1], generation=True), messages[:-1])
                if pieces is None or generation is None:
                    return None, ""
                entries = [(("head", roles[0]), pieces[0])]
                entries += [(("join", a, b), p) for a, b, p in zip(roles, roles[1:], pieces[1:])]
                entries += [(("tail", roles[-1]), pieces[-1]), (("join", "user", "assistant"), generation[-1])]
                for key, value in entries:
                    if glue.setdefault(key, value) != value:
                        return None, ""  # glue depends on position or on generation: not a fixed pattern
        except Exception:
            return None, ""
        tail = glue[("tail", "assistant")]
        marker = tail[: self._marker_length(tail)]
        if not glue[("join", "assistant", "user")].startswith(marker):
            return None, ""
        return glue, marker

    def _marker_length(self, after: str) -> int:
        """Length of the end-of-turn marker at the start of `after`: through the first special token, or
        the non-space text before the first line break when the template writes none."""
        match = self._special_pattern().match(after)
        if match:
            return match.end()
        stripped = after.split("\n", 1)[0]
        return len(stripped.rstrip()) if stripped.strip() else 0

    def _special_pattern(self):
        if not hasattr(self, "_pattern"):
            texts = sorted(self.facts.special_texts, key=len, reverse=True)
            self._pattern = re.compile(r"[ \t]*(?:" + "|".join(map(re.escape, texts)) + ")") if texts else re.compile(r"(?!x)x")
        return self._pattern


def _split(text: str, messages: list[dict]) -> list[str] | None:
    """The text between message contents, in order, or None when a content is not found verbatim."""
    pieces, position = [], 0
    for message in messages:
        at = text.find(message["content"], position)
        if at < 0:
            return None
        pieces.append(text[position:at])
        position = at + len(message["content"])
    pieces.append(text[position:])
    return pieces
