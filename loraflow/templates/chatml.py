"""ChatML: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per turn, generation prompt `<|im_start|>assistant\\n`."""

from loraflow.templates.base import TurnTemplate


class ChatML(TurnTemplate):
    name = "chatml"
    after = "\n"

    def head(self, system):
        return f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""

    def user(self, message, turn, system):
        return f"<|im_start|>user\n{message['content']}<|im_end|>\n<|im_start|>assistant\n"

    def end(self):
        return self.facts.end_with_eos("<|im_end|>")
