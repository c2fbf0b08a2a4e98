"""Evaluation's numbers recomputed by hand: the bytes each token stands for, and the loss, perplexity
and bits per byte of a tiny model on a batch whose text is known."""

import math

import pytest
import torch

from modlm import ModelConfig, MoDTransformer
from modlm.analysis.evaluate import evaluate_routing, token_byte_lengths
from modlm.data.tokenizer import EOT_TOKEN, train_tokenizer

TEXT = ("Le café coûte 3 € à Zürich; naïve façade, smörgåsbord. def naïve(x): return x * 2  # über-simple\n") * 3


def byte_of_char() -> dict[str, int]:
    """Byte-level BPE's alphabet, inverted: the printable bytes stand for themselves, the other 68
    are written as the characters 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in printable]
    table.update({chr(256 + n): b for n, b in enumerate(others)})
    return table


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([TEXT], vocab_size=300, max_chars=100_000)


def test_token_byte_lengths_add_up_to_the_text_bytes(tokenizer):
    V = tokenizer.get_vocab_size()
    lengths = token_byte_lengths(tokenizer, V)
    eot = tokenizer.token_to_id(EOT_TOKEN)
    assert lengths[eot] == 0, "the end-of-text token stands for no text"
    table = byte_of_char()
    for token, token_id in tokenizer.get_vocab().items():
        if token_id != eot:
            assert lengths[token_id] == len(bytes(table[c] for c in token)), token
    ids = tokenizer.encode(TEXT).ids
    assert len(TEXT.encode("utf-8")) > len(TEXT)  # the text has characters of 2 and 3 bytes
    assert int(lengths[ids].sum()) == len(TEXT.encode("utf-8"))
    # ids past the model's vocabulary are left out, the rest kept
    assert torch.equal(token_byte_lengths(tokenizer, 200), lengths[:200])


@pytest.mark.parametrize("routing", ["topk", "causal"])
def test_loss_perplexity_and_bits_per_byte_by_hand(tokenizer, routing):
    """Over two batches of two windows (end-of-text tokens inside them): the summed next-token
    negative log-likelihood in nats, over the targets' count (loss), exponentiated (ppl), and
    over ln 2 and the targets' UTF-8 bytes (bpb)."""
    V = tokenizer.get_vocab_size()
    eot = tokenizer.token_to_id(EOT_TOKEN)
    ids = tokenizer.encode(TEXT).ids
    ids = ids[:20] + [eot] + ids[20:]
    T = 16
    windows = torch.tensor([ids[i * (T + 1) : (i + 1) * (T + 1)] for i in range(4)])
    batches = [windows[:2], windows[2:]]
    torch.manual_seed(0)
    model = MoDTransformer(
        ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, max_seq_len=T, capacity=0.5, init_std=0.3)
    )
    result = evaluate_routing(model, batches, routing, byte_lengths=token_byte_lengths(tokenizer, V))

    table = byte_of_char()
    nll, n_bytes, n_targets = 0.0, 0, 0
    with torch.no_grad():
        for batch in batches:
            logits = model(batch[:, :-1], routing=routing).logits.double()
            log_probs = logits - logits.logsumexp(dim=-1, keepdim=True)
            targets = batch[:, 1:]
            nll -= float(log_probs.gather(-1, targets.unsqueeze(-1)).sum())
            n_targets += targets.numel()
            n_bytes += sum(
                len(bytes(table[c] for c in tokenizer.id_to_token(t))) for t in targets.flatten().tolist() if t != eot
            )
    assert eot in windows[1, 1:], "an end-of-text target, which counts in the loss but has no bytes"
    assert result["tokens"] == n_targets == 4 * T
    assert result["loss"] == pytest.approx(nll / n_targets, rel=1e-6)
    assert result["ppl"] == pytest.approx(math.exp(nll / n_targets), rel=1e-5)
    assert result["bpb"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-6)
