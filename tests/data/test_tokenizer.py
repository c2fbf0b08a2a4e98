"""Byte-level BPE: round trip, caching, explicit path, concurrent writers."""

import shutil
import sysconfig
import threading
from pathlib import Path

import pytest

from modlm.data import EOT_TOKEN, DataError, ModLMDataModule
from modlm.data import tokenizer as tokmod

STDLIB = Path(sysconfig.get_paths()["stdlib"])
FILES = ["abc.py", "bisect.py", "colorsys.py", "copy.py", "fnmatch.py", "heapq.py", "keyword.py", "string.py"]
NON_ASCII = "Grüße, 日本語のテキスト, emoji 🙂🚀, ñ, Ωμέγα, tab\tand\r\nCRLF, ZWJ 👩‍💻 and <|endoftext|> inline"


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in FILES:
        shutil.copy(STDLIB / name, folder / name)
    (folder / "intl.md").write_text(NON_ASCII * 20, encoding="utf-8")
    return folder


def make_dm(corpus_dir, tmp_path, **kw):
    args = dict(
        source=str(corpus_dir),
        vocab_size=400,
        tokenizer_train_chars=100_000,
        cache_dir=str(tmp_path / "cache"),
        val_fraction=0.3,
        seq_len=32,
        batch_size=4,
    )
    return ModLMDataModule(**{**args, **kw})


def test_round_trip_on_real_files_and_non_ascii(corpus_dir, tmp_path):
    dm = make_dm(corpus_dir, tmp_path)
    tok = dm.tokenizer
    # Real files, html/entities.py full of non-ASCII characters among them.
    texts = [(STDLIB / n).read_text(encoding="utf-8") for n in ("json/decoder.py", "textwrap.py", "html/entities.py")]
    texts += [NON_ASCII, "", " leading space", "\x00\x01 control", (corpus_dir / "copy.py").read_text()]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text
    # A literal <|endoftext|> in a document is text, never the separator.
    assert dm.eot_id not in tok.encode(NON_ASCII).ids
    assert dm.eot_id == tok.token_to_id(EOT_TOKEN) == 0


def test_vocab_size_available_right_after_init_and_capped(corpus_dir, tmp_path):
    dm = make_dm(corpus_dir, tmp_path)
    assert dm.tokenizer_vocab_size == 400
    assert dm.tokenizer_file.name == "tokenizer.json"
    assert dm.tokenizer_file.parent.parent == tmp_path / "cache"


def test_cache_is_reused(corpus_dir, tmp_path, monkeypatch):
    first = make_dm(corpus_dir, tmp_path)
    path, vocab = first.tokenizer_file, first.tokenizer.get_vocab()
    mtime = path.stat().st_mtime_ns

    def no_training(*a, **k):
        raise AssertionError("tokenizer retrained although cached")

    monkeypatch.setattr(tokmod, "train_tokenizer", no_training)
    second = make_dm(corpus_dir, tmp_path)
    assert second.tokenizer_file == path and second.tokenizer.get_vocab() == vocab
    assert path.stat().st_mtime_ns == mtime
    # Other settings -> another cache entry.
    monkeypatch.undo()
    other = make_dm(corpus_dir, tmp_path, vocab_size=300)
    assert other.tokenizer_file != path and other.tokenizer_vocab_size == 300


def test_explicit_tokenizer_path(corpus_dir, tmp_path):
    trained = make_dm(corpus_dir, tmp_path)
    copied = tmp_path / "mine.json"
    shutil.copy(trained.tokenizer_file, copied)
    dm = make_dm(corpus_dir, tmp_path, tokenizer=str(copied), cache_dir=str(tmp_path / "unused"))
    assert dm.tokenizer_vocab_size == 400 and dm.tokenizer_file == copied
    assert not (tmp_path / "unused").exists()
    with pytest.raises(DataError, match="does not exist"):
        _ = make_dm(corpus_dir, tmp_path, tokenizer=str(tmp_path / "missing.json")).tokenizer


def test_concurrent_processes_train_once(tmp_path):
    calls = []

    def train():
        calls.append(1)
        return tokmod.train_tokenizer(["some text here " * 50], vocab_size=300, max_chars=10_000)

    results = []
    threads = [
        threading.Thread(target=lambda: results.append(tokmod.cached_tokenizer(tmp_path / "k", train)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 4
    assert len({r.to_str() for r in results}) == 1
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["tokenizer.json"]  # no temp or lock left


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
    """The cache lock is the OS's: a process SIGKILLed while training releases it at once."""
    import os
    import signal
    import subprocess
    import sys
    import time

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time\n"
                "from filelock import FileLock\n"
                f"FileLock({str(tmp_path / 'k.lock')!r}).acquire()\n"
                "print('held', flush=True)\n"
                "time.sleep(600)\n"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    start = time.monotonic()
    tok = tokmod.cached_tokenizer(
        tmp_path / "k", lambda: tokmod.train_tokenizer(["text " * 50], 300, 10_000), wait_s=30
    )
    assert tok.get_vocab_size() >= 257 and time.monotonic() - start < 10
    assert (tmp_path / "k" / "tokenizer.json").is_file()
