"""The Korean instruction template (KoAlpaca style), with and without an input, exactly as users write it.

A system turn, when present, is written on its own line before the fixed preamble; later user turns repeat
the `###지시사항:` / `###답변:` block without the preamble.
"""

from loraflow.templates.base import TurnTemplate, user_parts

WITH_INPUT = (
    "아래는 문제를 설명하는 지시사항과, 구체적인 답변을 방식을 요구하는 입력이 함께 있는 문장입니다. "
    "이 요청에 대해 적절하게 답변해주세요.\n###입력:{input}\n###지시사항:{instruction}\n###답변:"
)
WITHOUT_INPUT = "아래는 문제를 설명하는 지시사항입니다. 이 요청에 대해 적절하게 답변해주세요.\n###지시사항:{instruction}\n###답변:"


class KoInstruction(TurnTemplate):
    name = "ko_instruction"

    def head(self, system):
        return f"{system}\n" if system else ""

    def user(self, message, turn, system):
        instruction, extra = user_parts(message)
        if turn == 0:
            template = WITH_INPUT if extra else WITHOUT_INPUT
            return template.format(input=extra, instruction=instruction)
        block = f"\n###입력:{extra}" if extra else ""
        return f"{block}\n###지시사항:{instruction}\n###답변:"
