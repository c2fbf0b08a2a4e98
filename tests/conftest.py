"""Test-wide setup: no network, one thread per process, and the tokenizer every tiny training run shares
(trained once)."""

import os
import shutil
import sysconfig
from pathlib import Path

import pytest

from tests.helpers import TINY_DATA, VAL_FRACTION

# Tests never touch the network: the Hugging Face hub must look offline (and fail fast).
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread per process (this one and every subprocess a test starts), set before torch is
# imported: the tiny models gain nothing from a second thread, and on a machine whose cores are busy with
# other work an OpenMP thread left waiting for a descheduled peer spins, which made the same tests 5 to 10
# times slower.
os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> tuple[str, str]:
    """``(corpus folder, tokenizer.json)`` for tiny runs: 80 stdlib modules copied under tmp (opening
    the whole stdlib costs seconds per process) and a tokenizer trained on them once."""
    from modlm.data import ModLMDataModule

    corpus = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py"))[:80]:
        shutil.copy(path, corpus / path.name)
    cache = tmp_path_factory.mktemp("tokenizer")
    dm = ModLMDataModule(
        source=str(corpus), num_workers=0, cache_dir=str(cache), val_fraction=float(VAL_FRACTION), **TINY_DATA
    )
    return str(corpus), str(dm.tokenizer_file)
