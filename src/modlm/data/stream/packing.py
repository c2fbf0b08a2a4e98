"""Packing: documents' tokens cut into windows of seq_len + 1 tokens, back to back.

Documents arrive already joined with the end-of-text token. Windows are cut back to back (no
overlap, no padding, nothing dropped), so every token of the stream lands in exactly one window; a
document may span several windows and a window several documents. After each window the packer
reports the stream position of the first token it has not emitted yet, `{"epoch", "pos", "offset"}`:
document `pos` of epoch `epoch`, token `offset` inside it. The packing carry-over (tokens read but
not yet emitted) is exactly the tail of the stream from that position, so the position alone is
enough to resume.

Validation windows are packed the same way (``first_windows``), from the validation documents in
their fixed order, so that they are the same tokens on every run.
"""

from collections import deque
from typing import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer

from ..tokenizer import encode_documents, in_chunks

DOCS_PER_ENCODE = 64  # documents tokenized per encode_batch call


def pack_windows(docs: Iterator[tuple[int, int, np.ndarray, int]], window: int) -> Iterator[tuple[np.ndarray, dict]]:
    """docs: (epoch, pos, token ids, base) where `ids` are the document's tokens from
    offset `base` on (base > 0 only for the document a resumed stream starts in).

    Yields (window of `window` int64 tokens, position after it)."""
    pending: deque = deque()  # [epoch, pos, ids, next index into ids, base]
    buffered = 0
    for epoch, pos, ids, base in docs:
        if len(ids) == 0:
            continue
        pending.append([epoch, pos, ids, 0, base])
        buffered += len(ids)
        while buffered >= window:
            pieces, need = [], window
            while need:
                doc = pending[0]
                take = min(need, len(doc[2]) - doc[3])
                pieces.append(doc[2][doc[3] : doc[3] + take])
                doc[3] += take
                need -= take
                if doc[3] == len(doc[2]):
                    pending.popleft()
            buffered -= window
            if pending:
                head = pending[0]
                position = {"epoch": head[0], "pos": head[1], "offset": head[4] + head[3]}
            else:  # ended on a document boundary: resume at the next document of the part
                position = {"epoch": epoch, "pos": pos + 1, "offset": 0}
            yield np.concatenate(pieces), position


def first_windows(texts: Iterable[str], tokenizer: Tokenizer, window: int, count: int) -> list[np.ndarray]:
    """The first ``count`` windows of ``window`` tokens of ``texts`` packed in order (fewer when
    the texts run out)."""

    def docs():
        pos = 0
        for chunk in in_chunks(texts, DOCS_PER_ENCODE):
            for ids in encode_documents(tokenizer, chunk):
                yield 0, pos, ids, 0
                pos += 1

    return [w for w, _ in zip((w for w, _ in pack_windows(docs(), window)), range(count))]
