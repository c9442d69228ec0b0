"""What every template shares: rendered segments, tokenizer facts, and the turn-by-turn renderer.

A template turns one conversation into `Rendered`: text segments that keep which characters are trained
(assistant content plus the end marker after it), the inference prompt (everything before the final
answer, generation prompt included) and the reference answer. Templates never tokenize; the tokenize
stage maps trained characters to tokens with offsets, so masking is exact for any tokenizer.
"""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Rendered:
    """One formatted example: `segments` (text, trained) concatenate to the full training text."""

    segments: tuple[tuple[str, bool], ...]
    prompt: str
    reference: str

    @property
    def text(self) -> str:
        return "".join(text for text, _ in self.segments)


@dataclass(frozen=True)
class TokenizerFacts:
    """What templates need to know about the tokenizer, probed once."""

    eos_text: str
    bos_text: str | None
    adds_bos: bool = False  # the tokenizer prepends BOS when called with add_special_tokens=True
    special_texts: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def probe(cls, tokenizer) -> "TokenizerFacts":
        bos_id = tokenizer.bos_token_id
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        without = tokenizer("a", add_special_tokens=False)["input_ids"]
        adds_bos = bos_id is not None and len(with_special) > len(without) and with_special[0] == bos_id
        special = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
        special.update(tokenizer.all_special_tokens)
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has no eos_token: set one (tokenizer_config.json) so answers can end")
        return cls(eos_text=tokenizer.eos_token, bos_text=tokenizer.bos_token, adds_bos=adds_bos,
                   special_texts=frozenset(special))

    def end_with_eos(self, marker: str) -> str:
        """`marker` plus EOS when the marker is not a special token (the model must learn to stop)."""
        stripped = marker.strip()
        if stripped and stripped in self.special_texts:
            return marker
        return marker + self.eos_text

    def bos_prefix(self, text: str) -> str:
        """The BOS text `text` needs in front: tokenize uses add_special_tokens=False, so a tokenizer that
        adds BOS gets it written as text here, and a template that writes it already gets no second one."""
        if self.adds_bos and self.bos_text and not text.startswith(self.bos_text):
            return self.bos_text
        return ""


def user_parts(message: dict) -> tuple[str, str | None]:
    """(instruction, input) of a user message; Alpaca-style rows carry `input` and content = instr + "\\n\\n" + input."""
    content, extra = message["content"], message.get("input")
    if not extra:
        return content, None
    suffix = "\n\n" + extra
    return (content[: -len(suffix)] if content.endswith(suffix) else content), extra


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """Messages as plain dicts, with `system_prompt` added when the conversation has no system turn."""
    plain = [{key: value for key, value in dict(m).items() if value is not None} for m in messages]
    if system_prompt is not None and (not plain or plain[0]["role"] != "system"):
        plain = [{"role": "system", "content": system_prompt}] + plain
    return plain


class SegmentWriter:
    """Collects (text, trained) pieces; remembers the prompt before the last answer."""

    def __init__(self):
        self.pieces: list[tuple[str, bool]] = []
        self.prompt = ""
        self.reference = ""

    def untrained(self, text: str) -> None:
        self._add(text, False)

    def answer(self, lead: str, content: str, end: str) -> None:
        """An assistant turn: `lead + content + end` is trained; the prompt is all text before it."""
        self.prompt = "".join(text for text, _ in self.pieces)
        self.reference = content
        self._add(lead + content + end, True)

    def rendered(self, facts: TokenizerFacts | None = None) -> Rendered:
        """The example; with `facts`, the BOS the tokenizer expects is written in front (once)."""
        bos = facts.bos_prefix("".join(text for text, _ in self.pieces)) if facts else ""
        pieces = list(self.pieces)
        if bos:
            pieces = [(bos, False)] + pieces if not pieces or pieces[0][1] else [(bos + pieces[0][0], False)] + pieces[1:]
        return Rendered(tuple(pieces), bos + self.prompt, self.reference)

    def _add(self, text: str, trained: bool) -> None:
        if not text:
            return
        if self.pieces and self.pieces[-1][1] == trained:
            self.pieces[-1] = (self.pieces[-1][0] + text, trained)
        else:
            self.pieces.append((text, trained))


class TurnTemplate:
    """A fixed-text template: head, one block per user turn, and an answer block per assistant turn.

    Subclasses set `name` and override `head`, `user`, and the answer's `lead` / `end` / `after` texts.
    """

    name = ""
    lead = ""  # trained text before the answer (llama2's space after [/INST]: BPE merges it into the first word)
    after = ""  # untrained text after each answer's end marker

    def __init__(self, facts: TokenizerFacts, tokenizer=None):
        self.facts = facts  # fixed texts need only the tokenizer's facts; the tokenizer is for templates that render with it

    def head(self, system: str | None) -> str:
        return ""

    def user(self, message: dict, turn: int, system: str | None) -> str:
        raise NotImplementedError

    def end(self) -> str:
        """Trained text after each answer (the end-of-turn marker, EOS added when not special)."""
        return self.facts.eos_text

    def stop_texts(self) -> set[str]:
        """Texts of tokens that may end a trained answer (EOS, or the end marker when it is special)."""
        return {t for t in self.facts.special_texts if t in self.end()} | {self.facts.eos_text}

    def render(self, messages: list[dict]) -> Rendered:
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
        turns = messages[1:] if system is not None else messages
        writer = SegmentWriter()
        writer.untrained(self.head(system))
        user_turn = 0
        for message in turns:
            if message["role"] == "user":
                writer.untrained(self.user(message, user_turn, system))
                user_turn += 1
            elif message["role"] == "assistant":
                writer.answer(self.lead, message["content"], self.end())
                writer.untrained(self.after)
            else:
                raise ValueError(f"template {self.name}: a {message['role']!r} turn after the first message is not supported")
        return writer.rendered(self.facts)


def render_text(content: str, facts: TokenizerFacts) -> Rendered:
    """kind == "text": plain language modelling, the content raw plus EOS, all trained."""
    writer = SegmentWriter()
    writer.answer("", content, facts.eos_text)
    return writer.rendered(facts)
