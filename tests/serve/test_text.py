"""A continuation's text as its tokens arrive (``TextStream``): what is sent joins to the tokenizer's
decoding cut at the first stop string, a stop string split across tokens is never sent in part, and
a character split across tokens waits for its last byte."""

import pytest
from tokenizers import Tokenizer

from modlm.serve.text import TextStream

CODE = "def f(x):\n    return x + 1\n\nprint(f(2))  # naïve café 日本\n"


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer) -> Tokenizer:
    return Tokenizer.from_file(tiny_tokenizer[1])


def feed(tokenizer, text, stops):
    """Every piece sent, token by token, then the rest at the end; and the stream."""
    stream = TextStream(tokenizer, stops)
    pieces = []
    for token in tokenizer.encode(text).ids:
        pieces.append(stream.push(token))
        if stream.stopped:
            break
    pieces.append(stream.finish())
    return pieces, stream


def test_without_stops_the_pieces_join_to_the_decoding(tokenizer):
    pieces, stream = feed(tokenizer, CODE, [])
    assert "".join(pieces) == tokenizer.decode(tokenizer.encode(CODE).ids) == CODE and not stream.stopped
    assert "\ufffd" not in "".join(pieces[:-1]), "a split character was sent before its last byte"
    assert sum(1 for p in pieces if p) > 10  # sent as it came, not at the end


@pytest.mark.parametrize("stop", ["return", "x + 1\n\np", "café", "\n\n", "日"])
def test_a_stop_string_ends_the_text_before_it_and_is_never_sent_in_part(tokenizer, stop):
    pieces, stream = feed(tokenizer, CODE, ["zzz", stop])
    assert stream.stopped and "".join(pieces) == CODE[: CODE.find(stop)]
    sent = ""
    for piece in pieces:
        sent += piece
        assert CODE[: CODE.find(stop)].startswith(sent)  # never a character past the cut


def test_a_stop_that_never_comes_holds_back_only_while_it_might(tokenizer):
    stream = TextStream(tokenizer, ["return None"])
    sent = "".join(stream.push(t) for t in tokenizer.encode("def f(x):\n    return").ids)
    assert sent == "def f(x):\n    "  # " return" could still become the stop string
    sent += "".join(stream.push(t) for t in tokenizer.encode(" x").ids)
    assert sent == "def f(x):\n    return x" and not stream.stopped


def test_a_character_its_last_token_left_incomplete_ends_as_the_tokenizer_decodes_it(tokenizer):
    ids = tokenizer.encode("café").ids[:-1]  # the last byte of é missing
    stream = TextStream(tokenizer, [])
    sent = "".join(stream.push(t) for t in ids)
    assert "\ufffd" not in sent
    assert sent + stream.finish() == tokenizer.decode(ids)
