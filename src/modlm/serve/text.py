"""A continuation's text as its tokens arrive: what may be sent now, and where a stop string ends it.

Tokens are decoded incrementally (``tokenizers``' ``DecodeStream``: whole characters only, a
character split across tokens waits for its last byte). A stop string may arrive split across
tokens too, so the end of the text that could be the start of one is held back until it is known
not to be; the stop string itself is never sent. The text sent, joined, is what ``modlm-generate``
prints for the same tokens: the tokenizer's decoding of them, cut at the first stop string.
"""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.decoder = DecodeStream(skip_special_tokens=True)
        self.ids: list[int] = []
        self.text = ""
        """The text of the tokens so far (cut at a stop string once one arrived)."""
        self.sent = 0
        """How much of ``text`` has been handed out."""
        self.stopped = False
        """Whether a stop string has arrived (then ``text`` ends before it)."""

    def push(self, token: int) -> str:
        """Take one token; return the text that may be sent now (possibly empty)."""
        self.ids.append(token)
        chunk = self.decoder.step(self.tokenizer, token)
        if chunk:
            # a stop string that arrives now ends in the chunk: search only where it could start
            start = max(0, len(self.text) - max(map(len, self.stops), default=0) + 1)
            self.text += chunk
            cuts = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if cuts:
                self.text, self.stopped = self.text[: min(cuts)], True
                return self._send(len(self.text))
        return self._send(len(self.text) - self._held())

    def finish(self) -> str:
        """The continuation has ended (its end-of-text token, its length): the rest of its text.
        Decoded whole, so that a character its last token left incomplete reads as the
        tokenizer's decoding has it."""
        if not self.stopped:
            whole = self.tokenizer.decode(self.ids)
            if whole.startswith(self.text[: self.sent]):
                self.text = whole
        return self._send(len(self.text))

    def _held(self) -> int:
        """Characters at the end of ``text`` that could be the start of a stop string."""
        return max(
            (k for s in self.stops for k in range(min(len(s) - 1, len(self.text)), 0, -1) if self.text.endswith(s[:k])),
            default=0,
        )

    def _send(self, upto: int) -> str:
        out = self.text[self.sent : upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return out
