"""Alpaca: `### System:` (optional), `### Instruction:`, `### Input:` (when the row has one), `### Response:`."""

from loraflow.templates.base import TurnTemplate, user_parts


class Alpaca(TurnTemplate):
    name = "alpaca"

    def head(self, system):
        return f"### System:\n{system}\n\n" if system else ""

    def user(self, message, turn, system):
        instruction, extra = user_parts(message)
        block = f"### Instruction:\n{instruction}\n\n"
        if extra:
            block += f"### Input:\n{extra}\n\n"
        # Later turns follow the previous answer's EOS after a blank line.
        return ("\n\n" if turn else "") + block + "### Response:\n"
