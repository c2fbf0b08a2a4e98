"""What the data tests share: the data module's defaults, for the lower-level constructors that
take the settings as required arguments (the data module's signature is their one owner)."""

import shutil
import sysconfig
from pathlib import Path

from modlm.data import ModLMDataModule
from modlm.data.corpus import open_corpus
from modlm.data.corpus.files import FileCorpus
from modlm.data.corpus.hub import HubCorpus

DATA_DEFAULTS = ModLMDataModule.defaults()
STDLIB = Path(sysconfig.get_paths()["stdlib"])
SMALL_FILES = [
    "bisect.py",
    "colorsys.py",
    "keyword.py",
    "this.py",
    "nturl2path.py",
    "struct.py",
    "token.py",
    "genericpath.py",
    "stat.py",
    "__future__.py",
]
"""Ten small standard-library modules, ~30 kB: a few thousand tokens, so epochs go by fast."""


def copy_stdlib(folder: Path, names=SMALL_FILES) -> Path:
    """``names`` from the standard library into ``folder`` (made if missing): a corpus of files."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(STDLIB / name, folder / name)
    return folder


def corpus_settings(**given) -> dict:
    """``text_field``, ``val_fraction`` and ``seed`` as a default run has them, unless given."""
    return {key: given.pop(key, DATA_DEFAULTS[key]) for key in ("text_field", "val_fraction", "seed")} | given


def file_corpus(source: str, min_val_chars: int = 0, **given) -> FileCorpus:
    return FileCorpus(source, min_val_chars=min_val_chars, **corpus_settings(**given))


def hub_corpus(source: str, **given) -> HubCorpus:
    return HubCorpus(source, **corpus_settings(**given))


def open_source(source: str, min_val_chars: int = 0, **given):
    return open_corpus(source, min_val_chars=min_val_chars, **corpus_settings(**given))


# The settings the `prepared` fixture (conftest.py) writes its folder with, and its runs' windows.
PREPARED_SETTINGS = dict(vocab_size=400, tokenizer_train_chars=50_000, val_fraction=0.2, seed=7)
SEQ, BATCH = 32, 4


def prepared_dm(source, cache, **given) -> ModLMDataModule:
    """A data module with the prepared folder's settings (on it, or on the corpus it was made from)."""
    settings = dict(
        source=str(source),
        seq_len=SEQ,
        batch_size=BATCH,
        val_windows=6,
        num_workers=0,
        cache_dir=str(cache),
        **PREPARED_SETTINGS,
    )
    return ModLMDataModule(**{**settings, **given})
