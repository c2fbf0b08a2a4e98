"""hub:NAME sources: fail fast offline; the streamed parts on a local stream; the pinned commit."""

import itertools
import json
import time

import datasets
import pytest

from modlm.data import DataError, ModLMDataModule
from modlm.data.corpus.hub import HubCorpus, parse_hub_source
from tests.data.helpers import hub_corpus


def test_offline_hub_fails_fast_with_advice(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    start = time.monotonic()
    dm = ModLMDataModule(source="hub:roneneldan/TinyStories")
    with pytest.raises(DataError, match=r"hub:roneneldan/TinyStories.*unreachable.*--data.source PATH"):
        _ = dm.tokenizer_vocab_size
    assert time.monotonic() - start < 5


def test_unreachable_endpoint_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    start = time.monotonic()
    with pytest.raises(DataError, match="unreachable"):
        hub_corpus("hub:some/dataset")
    assert time.monotonic() - start < 5


def test_parse_hub_source():
    assert parse_hub_source("hub:HuggingFaceFW/fineweb:sample-10BT") == ("HuggingFaceFW/fineweb", "sample-10BT")
    assert parse_hub_source("hub:roneneldan/TinyStories") == ("roneneldan/TinyStories", None)
    with pytest.raises(DataError, match="expected hub:NAME"):
        parse_hub_source("hub:")


def local_stream_corpus(tmp_path) -> HubCorpus:
    """A HubCorpus whose stream is a local streaming dataset of the same type `datasets`
    returns for the hub (2 files, which split_dataset_by_node deals out to the parts)."""
    files = []
    for f in range(2):
        path = tmp_path / f"part{f}.jsonl"
        path.write_text("\n".join(json.dumps({"text": f"story {f}-{i}"}) for i in range(40)))
        files.append(str(path))
    corpus = HubCorpus.__new__(HubCorpus)
    corpus.source, corpus.name, corpus.config = "hub:local", "local", None
    corpus.text_field, corpus.val_fraction, corpus.seed = "text", 0.2, 5
    corpus._stream = datasets.load_dataset("json", data_files=files, split="train", streaming=True)
    return corpus


def test_hub_stream_parts_partition_and_resume(tmp_path):
    corpus = local_stream_corpus(tmp_path)
    val = set(corpus.val_texts())
    train = set(corpus.train_texts())
    assert val and train and not val & train and len(val | train) == 80
    parts = [list(corpus.part_docs(part, 4, epoch=0)) for part in range(4)]
    texts = [t for docs in parts for _, t in docs]
    assert sorted(texts) == sorted(train)  # disjoint and complete
    # Resuming a part at a position gives the same remaining documents.
    pos = parts[1][3][0]
    assert list(corpus.part_docs(1, 4, 0, start=pos)) == parts[1][3:]
    # Another epoch, another order.
    assert [t for _, t in corpus.part_docs(0, 1, 1)] != [t for _, t in corpus.part_docs(0, 1, 0)]
    assert list(itertools.islice(corpus.part_docs(0, 1, 1), 5)) == list(itertools.islice(corpus.part_docs(0, 1, 1), 5))


def test_every_epoch_shuffles_the_stream_with_the_seed_it_always_had(tmp_path, monkeypatch):
    """(seed * 1_000_003 + epoch) mod 2^32: a resumed run of an earlier version reads the same order."""
    corpus = local_stream_corpus(tmp_path)
    corpus.seed = 10**6 + 7  # large enough for the 32-bit reduction to matter
    stream_type, seeds = type(corpus._stream), []
    real = stream_type.shuffle
    monkeypatch.setattr(
        stream_type, "shuffle", lambda self, seed=None, **kw: seeds.append(seed) or real(self, seed=seed, **kw)
    )
    for epoch in (0, 1, 5):
        next(corpus.part_docs(0, 2, epoch))
    assert seeds == [3577587349, 3577587350, 3577587354]


def test_missing_text_column_is_named_on_every_path(tmp_path):
    corpus = local_stream_corpus(tmp_path)
    corpus.text_field = "body"
    for read in (lambda: next(corpus.train_texts()), lambda: next(corpus.part_docs(0, 2, epoch=0))):
        with pytest.raises(DataError, match="no 'body' column"):
            read()


class FakeHub:
    """The hub's answers, from local files: commits per revision, splits, streams."""

    def __init__(self, tmp_path, splits=("train",)):
        self.commits = {None: "c0ffee" * 6 + "abcd", "v1": "1" * 40}
        self.splits = list(splits)
        self.files = {}
        for split in splits:
            path = tmp_path / f"{split}.jsonl"
            path.write_text("\n".join(json.dumps({"text": f"{split} story {i}"}) for i in range(30)))
            self.files[split] = str(path)
        self.loaded = []

    def install(self, monkeypatch):
        import huggingface_hub

        import modlm.data.corpus.hub as hub

        hub_self, real_load = self, datasets.load_dataset

        def dataset_info(api, name, revision=None, **kw):
            if revision not in hub_self.commits:
                raise ValueError(f"Revision Not Found for url: .../{name}/revision/{revision}")
            return type("Info", (), {"sha": hub_self.commits[revision]})()

        def load_dataset(name, config=None, split="train", streaming=True, revision=None, **kw):
            hub_self.loaded.append((split, revision))
            return real_load("json", data_files=hub_self.files[split], split="train", streaming=True)

        monkeypatch.setattr(hub, "hub_unreachable_reason", lambda: None)
        monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", dataset_info)
        monkeypatch.setattr(datasets, "get_dataset_split_names", lambda *a, **kw: hub_self.splits)
        monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def test_hub_revision_is_pinned_in_the_cache_key_and_the_checkpoint(tmp_path, monkeypatch):
    fake = FakeHub(tmp_path)
    fake.install(monkeypatch)
    latest, v1 = hub_corpus("hub:org/set"), hub_corpus("hub:org/set@v1")
    assert latest.revision == fake.commits[None] and v1.revision == "1" * 40
    assert ("train", "1" * 40) in fake.loaded  # streamed at the resolved commit, not the branch name
    assert latest.source_id != v1.source_id and v1.source_id.endswith("@" + "1" * 40)
    assert parse_hub_source("hub:org/set:cfg@v1") == ("org/set", "cfg")
    with pytest.raises(DataError, match=r"hub:org/set@nope.*cannot resolve revision 'nope'"):
        hub_corpus("hub:org/set@nope")

    def dm(source):
        return ModLMDataModule(
            source=source,
            seq_len=8,
            batch_size=2,
            vocab_size=300,
            val_windows=2,
            num_workers=0,
            val_fraction=0.3,
            cache_dir=str(tmp_path / "cache"),
        )

    first = dm("hub:org/set@v1")
    next(iter(first.train_dataloader()))
    state = first.state_dict()
    assert state["hub_revision"] == "1" * 40
    dm("hub:org/set@v1").load_state_dict(state)  # same commit: fine
    with pytest.raises(DataError, match=r"commit 1{40}.*resume with --data.source hub:org/set@1{40}"):
        dm("hub:org/set").load_state_dict(state)  # the branch moved on since


def test_a_dataset_with_its_own_validation_split_uses_it(tmp_path, monkeypatch):
    FakeHub(tmp_path, splits=("train", "validation")).install(monkeypatch)
    corpus = hub_corpus("hub:org/set")
    assert corpus.own_validation
    assert list(corpus.val_texts()) == [f"validation story {i}" for i in range(30)]
    assert sorted(corpus.train_texts()) == sorted(f"train story {i}" for i in range(30))  # all of train
    assert sorted(t for p in range(2) for _, t in corpus.part_docs(p, 2, 0)) == sorted(corpus.train_texts())


def cache_dataset(cache, repo_id: str, commit: str, files: dict[str, str], branch: str = "main") -> None:
    """Lay ``files`` out as the local Hugging Face cache holds a downloaded dataset repository."""
    repo = cache / f"datasets--{repo_id.replace('/', '--')}"
    for name, text in files.items():
        (repo / "snapshots" / commit / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / "snapshots" / commit / name).write_text(text)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / branch).write_text(commit)


def test_offline_a_dataset_in_the_local_cache_is_read_from_it(tmp_path, monkeypatch):
    """Offline, ``hub:NAME`` reads the cached snapshot of the main branch (or of ``@REVISION``), pins
    its commit like a streamed one, and a dataset or revision that is not cached is refused."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    rows = lambda tag: "".join(json.dumps({"text": f"{tag} story {i}"}) + "\n" for i in range(40))  # noqa: E731
    cache_dataset(tmp_path / "hf", "someone/stories", "a" * 40, {"data/train.jsonl": rows("old")}, branch="v1")
    cache_dataset(
        tmp_path / "hf",
        "someone/stories",
        "b" * 40,
        {"data/train.jsonl": rows("new"), "data/validation.jsonl": rows("held")},
    )

    corpus = hub_corpus("hub:someone/stories", val_fraction=0.2)
    assert corpus.revision == "b" * 40 and corpus.pins() == {"hub_revision": "b" * 40}
    assert corpus.own_validation and corpus.describe().startswith(
        "hub:someone/stories (from the local cache at commit bbbb"
    )
    assert {text for _, text in corpus.part_docs(0, 1, epoch=0)} == {f"new story {i}" for i in range(40)}
    assert sorted(corpus.val_texts()) == sorted(f"held story {i}" for i in range(40))

    old = hub_corpus("hub:someone/stories@v1", val_fraction=0.2)
    assert old.revision == "a" * 40 and not old.own_validation
    assert set(old.train_texts()) | set(old.val_texts()) == {f"old story {i}" for i in range(40)}
    with pytest.raises(
        DataError, match=r"read hub:someone/stories at commit a{40}.*--data.source hub:someone/stories@a{40}"
    ):
        corpus.check_pins(old.pins())

    for missing in ("hub:someone/stories@v2", "hub:nobody/else"):
        with pytest.raises(
            DataError, match=r"unreachable \(HF_HUB_OFFLINE is set\) and the dataset is not in the local"
        ):
            hub_corpus(missing)
