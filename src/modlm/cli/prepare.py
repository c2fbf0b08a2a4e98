"""``python -m modlm.prepare SOURCE OUT``: tokenize a corpus once into token shards to train from.

    python -m modlm.prepare ~/corpus/ data/corpus-tokens --num_proc 16
    python train.py fit --data.source data/corpus-tokens          # no tokenization while training

(``modlm-prepare`` once the package is installed.) The parser is jsonargparse's, as for
``train.py`` and ``eval.py``: ``--config FILE`` reads any of the options from YAML,
``--print_config`` shows them, and ``--help`` shows the docstrings below.

SOURCE is anything ``--data.source`` accepts (files, folder, glob, ``stdlib``, ``hub:NAME``); the
tokenizer is the one a run on SOURCE with the same settings would train or load (cached), and is
stored in OUT. Every default a training run also has is the data module's (``ModLMDataModule``).
The folder's format is ``modlm.data.corpus.prepared``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, fields
from typing import Optional

from ..data import ModLMDataModule
from ..data.prepare import PrepareSettings, prepare_corpus
from ..model.errors import run_command
from .usage import parse_args

_DATA_DEFAULTS = ModLMDataModule.defaults()


@dataclass
class PrepareRun:
    """Tokenize a corpus once into a folder of token shards (train with --data.source OUT).

    Args:
        source: corpus: a file, folder or glob of text/jsonl/json/parquet, 'stdlib' or 'hub:NAME'
        out: the prepared folder to write (must not exist)
        vocab_size: vocabulary size of the BPE tokenizer trained for the corpus
        tokenizer: use this tokenizer (a tokenizer.json, a folder holding one, or a Hub id) instead of training one
        text_field: field (jsonl/json) or column (parquet, hub) holding the text
        val_fraction: share of documents held out for validation
        seed: seed the corpus is opened with, as a training run would (the tokens written do not depend on
            it: a run's --data.seed orders them)
        tokenizer_train_chars: how many characters of training text the tokenizer is trained on (at most)
        cache_dir: where trained tokenizers are cached (default: the repository's data/cache)
        num_proc: tokenizing processes (default: all cores)
        shard_tokens: tokens per shard file
        no_progress: no progress bars
    """

    source: str
    out: str
    vocab_size: int = _DATA_DEFAULTS["vocab_size"]
    tokenizer: Optional[str] = _DATA_DEFAULTS["tokenizer"]
    text_field: str = _DATA_DEFAULTS["text_field"]
    val_fraction: float = _DATA_DEFAULTS["val_fraction"]
    seed: int = _DATA_DEFAULTS["seed"]
    tokenizer_train_chars: int = _DATA_DEFAULTS["tokenizer_train_chars"]
    cache_dir: Optional[str] = _DATA_DEFAULTS["cache_dir"]
    num_proc: int = os.cpu_count() or 1
    shard_tokens: int = 2**27
    no_progress: bool = False

    def settings(self) -> PrepareSettings:
        """The data layer's settings of this run (every option but SOURCE and OUT)."""
        given = {f.name: getattr(self, f.name) for f in fields(PrepareSettings) if f.name != "progress"}
        return PrepareSettings(**given, progress=not self.no_progress)


def parser():
    """jsonargparse's parser of ``PrepareRun`` (SOURCE and OUT positional), with ``--config`` and
    ``--print_config``."""
    from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

    p = ArgumentParser(prog="python -m modlm.prepare", description=PrepareRun.__doc__.split("\n\n")[0])
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file of any of these options")
    p.add_class_arguments(PrepareRun, as_positional=True, as_group=False, skip={"no_progress"})
    # a plain switch, as in most tools (a bool field would need "--no_progress true")
    p.add_argument("--no_progress", action=ActionYesNo(no_prefix=None), default=False, help="no progress bars")
    return p


def parse(argv=None) -> PrepareRun:
    """The options of ``argv`` (``sys.argv[1:]`` when None); a bad flag exits with status 2."""
    values = parse_args(parser(), argv).as_dict()
    values.pop("config", None)
    values.pop("__path__", None)
    return PrepareRun(**values)


def main(argv=None) -> int:
    """Run the command; return the exit status (0 ok, 2 user error: ``run_command``)."""
    return run_command(lambda: execute(parse(argv)))


def execute(run: PrepareRun) -> int:
    corpus = prepare_corpus(run.source, run.out, run.settings())
    print(f"modlm: prepared {corpus.describe()}; train with --data.source {run.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
