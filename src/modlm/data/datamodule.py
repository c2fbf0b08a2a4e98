"""ModLMDataModule: corpus -> BPE tokens -> packed windows, for Lightning.

Batch format. Every train, validation and test batch is a LongTensor of shape
(batch_size, seq_len + 1) (the last validation batch may have fewer rows). A row is
seq_len + 1 consecutive tokens of the packed stream (documents joined by the
<|endoftext|> token, `eot_id`):

    inputs, targets = batch[:, :-1], batch[:, 1:]

Chat data (conversations: ``corpus/chat.py``) is one conversation per window, padded, and its batches are
dicts ``{"input_ids": (B, T), "targets": (B, T)}`` whose targets are ``IGNORE_INDEX`` except on the
assistant's tokens: the loss is taken on those alone (``stream/chat.py``).

Training data is endless (epochs cycle until the trainer's max_steps / max_time), so the
train dataloader has no length: give Lightning an integer `val_check_interval` (or
`check_val_every_n_epoch=None`). Validation is a fixed set of `val_windows` windows taken
from the validation split and divided across ranks; `test` uses the same windows.

Resume. `state_dict()` (saved by Lightning in every checkpoint) holds the train stream's state
after the batches actually trained on (for a text source every rank's position, for a prepared
folder the windows consumed) and what the corpus pins (a hub dataset's commit);
`load_state_dict()` makes the next train dataloader continue exactly there. See stream/loader.py
for why consumption is counted in `on_before_batch_transfer`.

Defaults. This signature owns the data settings' defaults (LightningCLI shows them as ``--data.*``;
the prepare command reads them from here); the window length and vocabulary size default to the
model's (``ModelConfig``), so a default run's data and model agree.
"""

import copy
import dataclasses
import inspect
import os
from functools import cached_property
from pathlib import Path
from typing import Optional

import lightning as L
import torch
import torch.distributed as dist

from ..model.config import ModelConfig
from .chat import chat_template_for
from .corpus import ChatCorpus, Corpus, open_corpus
from .errors import DataError
from .stream.loader import FixedBatches, ResumableLoader
from .tokenizer import TokenizerSettings, end_of_text_id, fingerprint

_MODEL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}


class ModLMDataModule(L.LightningDataModule):
    """Streams a text corpus as packed token windows for language-model training.

    Args:
        source: Where the text comes from: ``stdlib`` (this Python's standard-library
            source, test folders excluded), a ``.txt``/``.md``/``.py``/``.jsonl``/
            ``.json``/``.parquet`` file, plain or compressed (``.gz``, ``.zst``, ``.bz2``), a
            folder or a glob of them, on disk or at an fsspec URL (``s3://``, ``gs://``, ``hf://``
            ..., with that filesystem's package), or ``hub:NAME[:CONFIG][@REVISION]`` for a Hugging
            Face dataset streamed over the network (pinned to a commit; offline, read from the local
            Hugging Face cache), or a folder written by ``python -m modlm.prepare`` (token shards:
            nothing is tokenized while training).
        seq_len: Tokens of model input per row; batches have ``seq_len + 1`` columns.
        batch_size: Rows per batch (per rank).
        vocab_size: Vocabulary size of the BPE tokenizer trained for this corpus (the
            actual size, ``tokenizer_vocab_size``, can be smaller on a tiny corpus).
        tokenizer: A pretrained or saved tokenizer to use instead of training one: a
            ``tokenizer.json``, a folder holding one (a transformers tokenizer folder, a modlm
            export), or a Hugging Face Hub id (``OWNER/NAME`` or ``hub:OWNER/NAME``). Its
            vocabulary sets the model's; its own end-of-text token separates documents.
        val_fraction: Share of documents held out for validation, chosen per document by a
            hash of its path (or text), the same on every run.
        val_windows: Number of validation windows (all ranks together); every validation
            run evaluates exactly these.
        num_workers: Dataloader worker processes per rank that read and tokenize (0: in the
            main process). Changing it changes the order of training data.
        seed: Seed of the per-epoch shuffle of training documents.
        text_field: Field (jsonl/json) or column (parquet, hub) holding the text. Records with no such field
            and with ``messages`` (OpenAI-style ``{"role": "system" | "user" | "assistant", "content":
            str}`` turns), or ``prompt`` and ``completion``, are chat data: one conversation per window,
            rendered with the tokenizer's chat template, the loss on the assistant's tokens alone.
        val_source: Chat data only: validate on every conversation of this source (the first
            ``val_windows`` that fit a window; any form ``source`` takes), and train on all of ``source``.
            Without it, ``val_fraction`` of the conversations are held out by a hash.
        chat_template: Chat data only: render conversations with this template (a jinja file, or a
            folder keeping one as transformers does) instead of the tokenizer's (its folder's
            ``chat_template.jinja`` or ``tokenizer_config.json``); a tokenizer with none gets modlm's
            default (docs/fine-tuning.md).
        tokenizer_train_chars: How many characters of training text the tokenizer is
            trained on (at most).
        cache_dir: Where trained tokenizers are cached (default: the repository's
            ``data/cache``).
    """

    def __init__(
        self,
        source: str = "stdlib",
        seq_len: int = _MODEL_DEFAULTS["max_seq_len"],
        batch_size: int = 16,
        vocab_size: int = _MODEL_DEFAULTS["vocab_size"],
        tokenizer: Optional[str] = None,
        val_fraction: float = 0.05,
        val_windows: int = 64,
        num_workers: int = 1,
        seed: int = 1234,
        text_field: str = "text",
        tokenizer_train_chars: int = 4_000_000,
        cache_dir: Optional[str] = None,
        val_source: Optional[str] = None,
        chat_template: Optional[str] = None,
    ):
        super().__init__()
        checks = [
            (seq_len >= 1, f"seq_len={seq_len}: expected >= 1"),
            (batch_size >= 1, f"batch_size={batch_size}: expected >= 1"),
            (vocab_size >= 257, f"vocab_size={vocab_size}: expected >= 257 (256 bytes + end-of-text)"),
            (0.0 <= val_fraction < 1.0, f"val_fraction={val_fraction}: expected 0 <= val_fraction < 1"),
            (val_windows >= 0, f"val_windows={val_windows}: expected >= 0"),
            (num_workers >= 0, f"num_workers={num_workers}: expected >= 0"),
            (tokenizer_train_chars >= 1, f"tokenizer_train_chars={tokenizer_train_chars}: expected >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise DataError(message)
        # logger=False: Lightning would log these unprefixed beside the model's ``model/...``; ``setup``
        # logs them as ``data/...``. The checkpoint keeps them all the same.
        self.save_hyperparameters(logger=False)
        self.source, self.seq_len, self.batch_size = source, seq_len, batch_size
        self.vocab_size, self.tokenizer_spec = vocab_size, tokenizer
        self.val_fraction, self.val_windows = val_fraction, val_windows
        self.num_workers, self.seed, self.text_field = num_workers, seed, text_field
        self.tokenizer_train_chars, self.cache_dir = tokenizer_train_chars, cache_dir
        self.val_source, self.chat_template_spec = val_source, chat_template
        self._train_loader: Optional[ResumableLoader] = None
        self._resume: Optional[dict] = None  # a checkpoint's train stream state, not yet applied

    @classmethod
    def defaults(cls) -> dict:
        """Every setting's default, as this signature (their one owner) gives it: for the commands
        and scripts that take the same settings (the prepare command)."""
        return {
            name: p.default
            for name, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty
        }

    # ---- lazily built pieces (usable right after __init__, no setup() needed) ----------

    @cached_property
    def corpus(self) -> Corpus:
        """The opened source (files indexed and split; hub reachability checked)."""
        # A corpus too small to hold whole documents out holds out their ends, enough for about one
        # window (byte-level BPE averages well over 2 characters a token; 4 leaves room).
        return open_corpus(
            self.source,
            text_field=self.text_field,
            val_fraction=self.val_fraction,
            seed=self.seed,
            min_val_chars=4 * (self.seq_len + 1),
            seq_len=self.seq_len,
            val_source=self.val_source,
            chat_template=self.chat_template_spec,
        )

    @property
    def is_chat(self) -> bool:
        """Whether the data is conversations (one per window, loss on the assistant's tokens)."""
        return isinstance(self.corpus, ChatCorpus)

    @property
    def chat_template(self) -> Optional[str]:
        """The chat template that travels with the model this data trains: chat data's (what its
        conversations are rendered with, modlm's default included), else the one kept beside the tokenizer
        or named by ``chat_template`` (None: none)."""
        if self.is_chat:
            _ = self.tokenizer  # builds the corpus's encoder
            return self.corpus.encoder.template
        return chat_template_for(self.chat_template_spec, self.tokenizer_file)

    @cached_property
    def _tokenizer_and_file(self):
        settings = TokenizerSettings(self.tokenizer_spec, self.vocab_size, self.tokenizer_train_chars, self.cache_dir)
        return self.corpus.tokenizer(settings)

    @property
    def tokenizer(self):
        """The `tokenizers.Tokenizer` (loaded from cache or trained on first access)."""
        return self._tokenizer_and_file[0]

    @property
    def tokenizer_file(self) -> Path:
        """Path of the tokenizer.json in use."""
        return self._tokenizer_and_file[1]

    @property
    def tokenizer_vocab_size(self) -> int:
        """The tokenizer's actual vocabulary size: what the model's vocab_size must be."""
        return self.tokenizer.get_vocab_size()

    @property
    def eot_id(self) -> int:
        """Id of the tokenizer's end-of-text token, which separates documents."""
        return end_of_text_id(self.tokenizer)

    @property
    def tokenizer_fingerprint(self) -> str:
        return fingerprint(self.tokenizer)

    @cached_property
    def validation_windows(self) -> torch.Tensor:
        """Every validation window of every rank, (n, seq_len + 1): the same on every run (empty
        when validation is off)."""
        if not self._validates:
            return torch.empty(0, self.seq_len + 1, dtype=torch.long)
        return self.corpus.val_windows(self.tokenizer, self.seq_len, self.val_windows)

    @cached_property
    def validation_loss_mask(self) -> Optional[torch.Tensor]:
        """Which targets of ``validation_windows`` carry the loss, (n, seq_len) bools (chat data: the
        assistant's tokens); None: every target (text)."""
        if not self._validates:
            return None if not self.is_chat else torch.zeros(0, self.seq_len, dtype=torch.bool)
        return self.corpus.val_loss_mask(self.tokenizer, self.seq_len, self.val_windows)

    @property
    def _validates(self) -> bool:
        return self.val_windows > 0 and (self.val_fraction > 0 or self.val_source is not None)

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    # ---- Lightning hooks ---------------------------------------------------------------

    def setup(self, stage: Optional[str] = None) -> None:
        _ = self.tokenizer  # fail early (bad source, offline hub) and train/load once
        for logger in self.trainer.loggers if self.trainer is not None else []:
            logger.log_hyperparams({f"data/{k}": v for k, v in self.hparams.items() if not k.startswith("_")})
        if stage in (None, "fit", "validate", "test"):
            _ = self.validation_windows, self.validation_loss_mask

    def train_dataloader(self) -> ResumableLoader:
        rank, world = self._rank_world()
        if self.num_workers > 0:
            # Workers tokenize in parallel already; also silences the tokenizers fork warning.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        stream = self.corpus.train_stream(
            self.tokenizer,
            seq_len=self.seq_len,
            batch_size=self.batch_size,
            rank=rank,
            world_size=world,
            num_workers=self.num_workers,
        )
        loader = ResumableLoader(stream, self.num_workers, pin_memory=torch.cuda.is_available())
        # In a fit, Lightning fetches ahead; count only batches it actually trains on.
        loader.track_consumption = self.trainer is not None
        self._train_loader = loader
        self._apply_resume()
        return loader

    def val_dataloader(self) -> FixedBatches:
        """This rank's share of the fixed validation windows, in batches."""
        rank, world = self._rank_world()
        windows, mask = self.validation_windows, self.validation_loss_mask
        per_rank = len(windows) // world  # equal counts, so ranks stay in lockstep
        return FixedBatches(
            windows[rank::world][:per_rank], self.batch_size, None if mask is None else mask[rank::world][:per_rank]
        )

    def test_dataloader(self) -> FixedBatches:
        """Same windows as validation (the corpus has no separate test split)."""
        return self.val_dataloader()

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if self.trainer is not None and self.trainer.training and self._train_loader is not None:
            self._train_loader.mark_consumed()
        return batch

    # ---- checkpointed state ------------------------------------------------------------

    def state_dict(self) -> dict:
        """``{"train": the train stream's saved state, **the corpus's pins}`` (empty before training).

        Called on every rank when Lightning saves a checkpoint (a text stream gathers the positions
        of all ranks then): the checkpoint file is written by rank 0 alone."""
        if self._train_loader is None:
            return {"train": copy.deepcopy(self._resume)} if self._resume else {}
        return {"train": self._train_loader.saved_state(), **self.corpus.pins()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume the train stream at the saved state (from the next train_dataloader
        iteration on)."""
        pins = {key: value for key, value in state_dict.items() if key != "train"}
        if pins:
            self.corpus.check_pins(pins)
        self._resume = copy.deepcopy(state_dict.get("train")) or None
        if self._train_loader is not None:
            self._apply_resume()

    def _apply_resume(self) -> None:
        if self._resume and self._train_loader is not None:
            self._train_loader.restore(self._resume)
            self._resume = None
