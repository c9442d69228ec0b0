"""How tokenize turns formatted texts into token ids: whole texts in one batch of the Rust tokenizer, the next
slice encoded in a background thread while this one is labelled, and control-token text from the data encoded as
plain characters (`literal_spans`). The labelling, split and checks are tasks/tokenize.py's."""

import bisect
import functools
import re
from concurrent.futures import ThreadPoolExecutor

import pandas as pd


def texts_and_spans(segments_column) -> tuple[list[str], list[list[tuple[int, int]]]]:
    """Full texts and their trained character spans [start, end)."""
    texts, spans = [], []
    for segments in segments_column:
        parts, trained, position = [], [], 0
        for segment in segments:
            text = segment["text"]
            if segment["trained"] and text:
                trained.append((position, position + len(text)))
            parts.append(text)
            position += len(text)
        texts.append("".join(parts))
        spans.append(trained)
    return texts, spans


def encode(texts: list[str], tokenizer):
    """Encodings of whole texts in one batch, no special tokens added."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("tokenize needs a fast (Rust) tokenizer for character offsets: the model folder needs a tokenizer.json")
    backend.no_truncation()  # lengths are our policy, applied after; the backend must not cut silently
    backend.no_padding()
    return backend.encode_batch(texts, add_special_tokens=False)


def encoded_texts(formatted: pd.DataFrame, tokenizer) -> tuple[list[str], list, list]:
    """(texts, trained character spans, encodings) of a batch of formatted rows."""
    texts, spans = texts_and_spans(formatted["segments"])
    return texts, spans, encode(texts, tokenizer)


def encoded_ahead(formatted_batches, tokenizer, encode_rows: int):
    """(formatted rows, their `encoded_texts`) in slices of `encode_rows`, the next slice encoded in a background thread
    while the caller labels this one: the Rust tokenizer releases the GIL, so its threads and the per-row Python share
    the cores instead of taking turns (tokenize at 25,000 catalog rows: benchmarks/data_scale.py)."""
    slices = (formatted.iloc[first:first + encode_rows] for formatted in formatted_batches
              for first in range(0, len(formatted), encode_rows))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode") as encoder:
        waiting = None
        for formatted in slices:
            texts, spans = texts_and_spans(formatted["segments"])
            encoding = encoder.submit(encode, texts, tokenizer)
            if waiting is not None:
                yield waiting[0], (*waiting[1], waiting[2].result())
            waiting = (formatted, (texts, spans), encoding)
        if waiting is not None:
            yield waiting[0], (*waiting[1], waiting[2].result())


class PiecewiseEncoding:
    """ids and offsets of a text encoded piece by piece, with `char_to_token` like a tokenizers Encoding."""

    def __init__(self, ids: list[int], offsets: list[tuple[int, int]]):
        self.ids, self.offsets = ids, offsets
        self._starts = [start for start, _ in offsets]

    def __len__(self) -> int:
        return len(self.ids)

    def char_to_token(self, char: int) -> int | None:
        index = bisect.bisect_right(self._starts, char) - 1
        return index if index >= 0 and self.offsets[index][0] <= char < self.offsets[index][1] else None


def control_token_pattern(tokenizer):
    """A regex of every special token's text (longest first), or None."""
    texts = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    texts.update(tokenizer.all_special_tokens)
    texts = sorted((t for t in texts if t), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, texts))) if texts else None


@functools.lru_cache(maxsize=8)
def literal_backend(tokenizer):
    """A private copy of the Rust tokenizer for `encode_with_literals`, which switches `encode_special_tokens` on and
    off: the shared one may be encoding the next batch in another thread meanwhile (`encoded_ahead`)."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    return backend


def encode_with_literals(text: str, literal_spans, tokenizer, pattern) -> PiecewiseEncoding:
    """Encode `text` so that the characters in `literal_spans` ([start, end, ...]) are plain text even where they
    spell a control token; control tokens elsewhere (written by the template) stay control tokens."""
    backend = literal_backend(tokenizer)
    literal = [(int(a), int(b)) for a, b in zip(literal_spans[0::2], literal_spans[1::2])]
    # The tokenizer splits text at every control token anyway, so encoding the stretches between the template's
    # control tokens apart gives the same tokens as one call, except that literal control text stays characters.
    cuts = [m.span() for m in pattern.finditer(text) if not any(a < m.end() and m.start() < b for a, b in literal)]
    ids, offsets, position = [], [], 0
    pieces = []
    for start, end in cuts + [(len(text), len(text))]:
        if start > position:
            pieces.append((position, text[position:start], True))
        if end > start:
            pieces.append((start, text[start:end], False))
        position = end
    for offset, piece, plain in pieces:
        backend.encode_special_tokens = plain
        try:
            encoding = backend.encode(piece, add_special_tokens=False)
        finally:
            backend.encode_special_tokens = False
        ids += encoding.ids
        offsets += [(offset + a, offset + b) for a, b in encoding.offsets]
    return PiecewiseEncoding(ids, offsets)


@functools.lru_cache(maxsize=8)  # once per tokenizer, not per batch: reading the vocabulary costs 14 ms a batch
def unrepresentable_bytes(tokenizer) -> frozenset[int]:
    """Bytes a byte-level BPE vocabulary has no token for (SmolLM2 lacks 0x04, 0x06, 0x13, 0x14, 0x16, 0x1d, 0xf1,
    0xf2: text holding them tokenizes lossily); empty for other tokenizers, which fall back to <unk> or bytes."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or "ByteLevel" not in type(backend.pre_tokenizer).__name__:
        return frozenset()
    # GPT-2's byte -> character table, which every byte-level BPE vocabulary is written in.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    as_char = {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}
    vocabulary = backend.get_vocab()
    return frozenset(b for b, char in as_char.items() if char not in vocabulary)
