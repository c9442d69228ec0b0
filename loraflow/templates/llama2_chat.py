"""Llama 2 chat: `<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>`, then
`<s>[INST] {user} [/INST] {answer} </s>` per later turn.

The space after `[/INST]` is trained with the answer, so the prompt ends at `[/INST]`: BPE tokenizers merge
that space into the answer's first word, and inference must be given the prompt without it.
"""

from loraflow.templates.base import TurnTemplate


class Llama2Chat(TurnTemplate):
    name = "llama2_chat"
    lead = " "

    def user(self, message, turn, system):
        if turn == 0 and system:
            return f"<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{message['content']} [/INST]"
        return f"<s>[INST] {message['content']} [/INST]"

    def end(self):
        return self.facts.end_with_eos(" </s>")
