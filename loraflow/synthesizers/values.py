"""Cell values as answers use them: list items split and joined, long texts cut at a sentence end.

Shared by anime_qa and table_qa, so both read a value the same way.
"""

import re

# Greedy: one match call finds the last sentence end (a stop, maybe a closing quote, then a space or the end).
_LAST_SENTENCE_END = re.compile(r".*[.!?。！？][\"'”’)\]]?(?=\s|$)", re.DOTALL)


def split_items(value: str, missing: set[str], separator: str = ",") -> tuple[str, ...] | None:
    """'A, B, UNKNOWN, A' -> ('A', 'B'); None when no item is left."""
    items = []
    for item in value.split(separator):
        item = item.strip()
        if item.casefold() not in missing and item not in items:
            items.append(item)
    return tuple(items) or None


def join_items(items: tuple[str, ...], join: str = ", ", last_join: str = " and ") -> str:
    """('A',) -> 'A'; ('A', 'B') -> 'A and B'; ('A', 'B', 'C') -> 'A, B and C'."""
    return items[0] if len(items) == 1 else join.join(items[:-1]) + last_join + items[-1]


def cut_synopsis(text: str, max_words: int) -> str:
    """At most `max_words` words, ending at the last sentence end among them when that keeps half of them."""
    words = text.split(" ", max_words)  # the rest stays in one piece: only the head is split
    if len(words) <= max_words:
        return text
    head = " ".join(words[:max_words])
    last_end = _LAST_SENTENCE_END.match(head)
    if last_end and head.count(" ", 0, last_end.end()) + 1 >= max_words // 2:
        return head[: last_end.end()]
    return head.rstrip(",;:") + "…"
