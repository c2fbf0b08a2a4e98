"""Resume inside a real Lightning fit: the batches after a mid-run checkpoint are the ones an
uninterrupted run trains on (Lightning fetches one batch ahead; that one must not be lost), from
plain files and from compressed ones (.jsonl.gz, .txt.zst)."""

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from modlm.data import ModLMDataModule
from tests.data.helpers import SMALL_FILES, STDLIB, copy_stdlib


class TinyLM(L.LightningModule):
    """Embedding + Linear bigram LM that records every batch it trains on."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab_size, 8)
        self.head = torch.nn.Linear(8, vocab_size)
        self.seen: list[torch.Tensor] = []

    def loss(self, batch):
        logits = self.head(self.emb(batch[:, :-1]))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    def training_step(self, batch, batch_idx):
        self.seen.append(batch.clone())
        return self.loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(tmp_path, corpus, max_steps, ckpt_path=None, ckpt_dir=None):
    dm = ModLMDataModule(
        source=str(corpus),
        seq_len=32,
        batch_size=4,
        vocab_size=300,
        tokenizer_train_chars=20_000,
        val_fraction=0.2,
        val_windows=8,
        num_workers=2,
        seed=3,
        cache_dir=str(tmp_path / "cache"),
    )
    model = TinyLM(dm.tokenizer_vocab_size)
    callbacks = (
        [ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_top_k=-1, filename="{step}")] if ckpt_dir else []
    )
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(ckpt_dir),
        callbacks=callbacks,
        val_check_interval=3,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=1,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model.seen


def write_corpus(corpus: Path, stored: str) -> None:
    """The files as they are, or as people ship corpora: a gzipped jsonl (a document per line) and
    zstd-compressed text files."""
    if stored == "plain":
        copy_stdlib(corpus)
        return
    corpus.mkdir()
    import gzip
    import json

    zstandard = pytest.importorskip("zstandard")
    lines = "".join(json.dumps({"text": (STDLIB / name).read_text()}) + "\n" for name in SMALL_FILES[:6])
    (corpus / "docs.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    for name in SMALL_FILES[6:]:
        (corpus / f"{name}.txt.zst").write_bytes(zstandard.ZstdCompressor().compress((STDLIB / name).read_bytes()))


@pytest.mark.parametrize("stored", ["plain", "compressed"])
def test_fit_resume_sees_the_same_batches(tmp_path, stored):
    corpus = tmp_path / "corpus"
    write_corpus(corpus, stored)
    straight = fit(tmp_path, corpus, max_steps=9, ckpt_dir=tmp_path / "ckpt")
    assert len(straight) == 9
    resumed = fit(tmp_path, corpus, max_steps=9, ckpt_path=str(tmp_path / "ckpt" / "step=4.ckpt"))
    assert len(resumed) == 5
    assert all(torch.equal(a, b) for a, b in zip(straight[4:], resumed))
    ckpt = torch.load(tmp_path / "ckpt" / "step=4.ckpt", weights_only=True)
    assert ckpt["ModLMDataModule"]["train"]["ranks"][0]["batches"] == 4
