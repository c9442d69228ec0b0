"""Gemma turns: `<start_of_turn>user\\n…<end_of_turn>\\n<start_of_turn>model\\n…<end_of_turn>\\n`.

Gemma has no system role: a system turn is put in front of the first user message, as Gemma's own chat
template does.
"""

from loraflow.templates.base import TurnTemplate


class Gemma(TurnTemplate):
    name = "gemma"
    after = "\n"

    def user(self, message, turn, system):
        content = f"{system}\n\n{message['content']}" if turn == 0 and system else message["content"]
        return f"<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n"

    def end(self):
        return self.facts.end_with_eos("<end_of_turn>")
