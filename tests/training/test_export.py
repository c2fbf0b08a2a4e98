"""Export folders that transformers loads: the model through the folder's own code, the tokenizer
as a fast tokenizer, and generation through transformers' ``generate`` that decodes exactly as
``MoDTransformer.generate`` does (causal routing, modlm's KV cache with no entry for skipped tokens).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from modlm import ModelConfig, MoDTransformer
from modlm.data.tokenizer import EOT_TOKEN, train_tokenizer
from modlm.saved import load_saved
from modlm.training.export import ENTRY_FILES, relative_imports, remote_code_files
from modlm.training.export import write_export as export

# transformers copies remote code under HF_MODULES_CACHE (read once, when it is imported): keep
# the tests' copies out of the user's cache.
os.environ.setdefault("HF_MODULES_CACHE", str(Path(tempfile.gettempdir()) / "modlm-test-hf-modules"))
transformers = pytest.importorskip("transformers")

PROMPTS = ["def encode(self, o):", "import json", "x"]
TEXTS = ["caf\u00e9 <|endoftext|> ok", "a<|endoftext|>b", "  two  spaces\n\ttab"]
SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(scope="module")
def tokenizer():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / "json" / name).read_text() for name in ("encoder.py", "decoder.py", "__init__.py")]
    return train_tokenizer(texts, vocab_size=300, max_chars=200_000)


def tiny_model(tokenizer, **overrides) -> MoDTransformer:
    # init_std 0.3: a random model whose greedy continuations vary (at 0.02 they repeat one token)
    # and whose causal decisions process some tokens and skip others.
    torch.manual_seed(0)
    base = dict(
        vocab_size=tokenizer.get_vocab_size(),
        d_model=32,
        n_layers=4,
        n_heads=4,
        max_seq_len=64,
        capacity=0.5,
        init_std=0.3,
    )
    return MoDTransformer(ModelConfig(**{**base, **overrides})).eval()


CONFIGS = {
    "predictor-tied": dict(causal_method="predictor"),
    "router-untied": dict(causal_method="router", tie_embeddings=False),
}


@pytest.fixture(scope="module")
def folders(tokenizer, tmp_path_factory):
    """name -> (modlm model, its export folder), for each of ``CONFIGS``."""
    out = {}
    for name, overrides in CONFIGS.items():
        model = tiny_model(tokenizer, **overrides)
        folder = tmp_path_factory.mktemp(name)
        export(model, tokenizer, {"seq_len": 64}, folder)
        out[name] = model, folder
    return out


@pytest.fixture(scope="module", params=list(CONFIGS))
def exported(request, folders):
    """(modlm model, its export folder, the folder loaded by transformers in this process)."""
    model, folder = folders[request.param]
    return model, folder, transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)


def reference(model, tokenizer, prompts, new_tokens):
    """modlm's own greedy continuations, one list of ids per prompt (prompt included)."""
    ids = [tokenizer.encode(p).ids for p in prompts]
    eot = tokenizer.token_to_id(EOT_TOKEN)
    return [row.tolist() for row in model.generate(ids, max_new_tokens=new_tokens, temperature=0, eot_id=eot)]


def strip_left_padding(sequences, mask, pad_id):
    """transformers' rows without the left padding (and the padding after an early end)."""
    rows = []
    for row, m in zip(sequences.tolist(), mask.tolist()):
        row = row[m.index(1) :]
        while row and row[-1] == pad_id and len(row) > 1 and row[-2] == pad_id:
            row.pop()
        rows.append(row)
    return rows


@pytest.mark.slow
def test_folder_loads_and_generates_in_a_process_without_modlm(folders, tokenizer, tmp_path):
    """The folder is self-contained: a fresh interpreter in which ``import modlm`` fails loads it
    with the two auto classes (the tokenizer's as a user would call it) and generates modlm's tokens."""
    model, folder = folders["router-untied"]
    script = f"""
import json, sys
sys.modules["modlm"] = None  # any import of modlm now fails
try:
    import modlm
    raise SystemExit("modlm is importable")
except ImportError:
    pass
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(folder)!r})
model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
batch = tok({PROMPTS!r}, return_tensors="pt", padding=True)
out = model.generate(**batch, max_new_tokens=10, do_sample=False)
print()  # transformers may have asked a question on stdout (AutoConfig of remote code)
print(json.dumps({{"module": type(model).__module__, "file": sys.modules[type(model).__module__].__file__,
                  "eos": tok.eos_token_id, "ids": tok({TEXTS[1]!r}).input_ids,
                  "sequences": out.tolist(), "mask": batch.attention_mask.tolist()}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["module"].startswith("transformers_modules.") and got["file"].startswith(str(tmp_path / "modules"))
    assert got["eos"] == tokenizer.token_to_id(EOT_TOKEN)
    assert got["ids"] == tokenizer.encode(TEXTS[1]).ids
    rows = strip_left_padding(torch.tensor(got["sequences"]), torch.tensor(got["mask"]), got["eos"])
    assert rows == reference(model, tokenizer, PROMPTS, 10)


def test_greedy_generate_equals_modlm_generate(exported, tokenizer):
    model, folder, hf = exported
    tok = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    for prompts in (PROMPTS, PROMPTS[:1]):  # left-padded batch, and one row without padding
        batch = tok(prompts, return_tensors="pt", padding=True)
        out = hf.generate(**batch, max_new_tokens=16, do_sample=False)
        expected = reference(model, tokenizer, prompts, 16)
        assert strip_left_padding(out, batch.attention_mask, tok.eos_token_id) == expected
        assert any(len(set(row[-16:])) > 4 for row in expected)  # continuations that vary
    # top-k sampling with k=1 is greedy: the sampling path decodes the same way
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    sampled = hf.generate(**batch, max_new_tokens=8, do_sample=True, top_k=1, temperature=0.7)
    expected = reference(model, tokenizer, PROMPTS, 8)
    assert strip_left_padding(sampled, batch.attention_mask, tok.eos_token_id) == expected


def test_generation_uses_causal_routing_and_caches_only_processed_tokens(exported, tokenizer, monkeypatch):
    """Every step goes through modlm's cache (never a whole-sequence pass); a routed block's cache
    holds exactly the tokens its causal decision processed, a dense block's every token."""
    model, folder, hf = exported
    core = hf.core
    monkeypatch.setattr(core, "forward", lambda *a, **k: pytest.fail("generate ran a whole-sequence pass"))
    calls = []
    prefill, decode_step = core.prefill, core.decode_step
    monkeypatch.setattr(core, "prefill", lambda idx, *a, **k: calls.append(tuple(idx.shape)) or prefill(idx, *a, **k))
    monkeypatch.setattr(
        core, "decode_step", lambda tok, *a, **k: calls.append((tok.size(0), 1)) or decode_step(tok, *a, **k)
    )
    ids = [tokenizer.encode(p).ids for p in PROMPTS]
    width = max(map(len, ids))
    batch = torch.tensor([[0] * (width - len(r)) + r for r in ids])
    mask = (torch.arange(width) >= torch.tensor([width - len(r) for r in ids]).unsqueeze(1)).long()
    new = 12
    out = hf.generate(
        input_ids=batch, attention_mask=mask, max_new_tokens=new, do_sample=False, return_dict_in_generate=True
    )
    assert calls == [(3, width)] + [(3, 1)] * (new - 1)  # one prompt pass, then one token per row per step
    state = out.cache.state
    monkeypatch.undo()
    rows = strip_left_padding(out.sequences, mask, 0)
    assert [len(r) for r in rows] == [len(r) + new for r in ids]  # nothing ended early
    for b, row in enumerate(rows):
        fed = torch.tensor([row[:-1]])  # the last token is sampled, never fed back
        assert int(state.seen[b]) == fed.size(1)
        with torch.no_grad():
            routing = {info.layer: info.selected[0] for info in model(fed, routing="causal").routing}
        for layer, cache in enumerate(state.caches):
            stored = int(cache.length[b])
            if layer in routing:
                assert stored == int(routing[layer].sum()) < fed.size(1)
                kept = cache.positions[b, :stored]
                assert torch.equal(kept, routing[layer].nonzero()[:, 0])  # original positions, in order
            else:
                assert stored == fed.size(1)


def test_forward_matches_modlm_in_both_routing_modes(exported, tokenizer):
    model, _, hf = exported
    idx = torch.tensor([tokenizer.encode(PROMPTS[0] + " return x").ids])
    with torch.no_grad():
        causal = model(idx, routing="causal").logits
        topk = model(idx, routing="topk").logits
        assert torch.equal(hf(idx, use_cache=False).logits, causal)
        assert torch.equal(hf(idx, use_cache=False, routing="topk").logits, topk)
        cached = hf(idx)  # a prompt pass into a fresh cache
        torch.testing.assert_close(cached.logits, causal, rtol=1e-5, atol=1e-5)
        assert cached.cache.state.filled == idx.size(1)
        # a left-padded row gives its unpadded logits at its real positions, with and without a cache
        padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), idx], dim=1)
        mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(idx)], dim=1)
        torch.testing.assert_close(
            hf(padded, attention_mask=mask, use_cache=False).logits[:, 3:], causal, rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(hf(padded, attention_mask=mask).logits[:, 3:], causal, rtol=1e-5, atol=1e-5)
        # labels: mean next-token cross-entropy, -100 ignored
        labels = idx.clone()
        labels[0, :4] = -100
        loss = hf(idx, labels=labels, use_cache=False).loss
        torch.testing.assert_close(
            loss, F.cross_entropy(causal[0, 3:-1], idx[0, 4:]), rtol=1e-6, atol=0
        )  # summed in another order
        with pytest.raises(ValueError, match="causal routing only"):
            hf(idx, routing="topk")
        with pytest.raises(ValueError, match="max_seq_len"):
            hf(torch.zeros(1, 65, dtype=torch.long))


def test_unsupported_generation_modes_are_refused(exported, tokenizer):
    _, _, hf = exported
    idx = torch.tensor([tokenizer.encode(PROMPTS[1]).ids])
    with pytest.raises(ValueError, match="only supports"):
        hf.generate(idx, max_new_tokens=2, num_beams=2, do_sample=False)


def test_tokenizer_reads_as_in_training(exported, tokenizer):
    _, folder, _ = exported
    tok = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    eot = tokenizer.token_to_id(EOT_TOKEN)
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id, tok.bos_token) == (EOT_TOKEN, eot, eot, None)
    assert tok.padding_side == "left" and tok.model_max_length == 64
    for text in TEXTS:
        ids = tok(text).input_ids
        assert ids == tokenizer.encode(text).ids  # no token added, nothing split differently
        assert tok.decode(ids) == text
    # the separator typed as text is text, as in training; the id itself decodes to it
    assert eot not in tok(EOT_TOKEN).input_ids and len(tok(EOT_TOKEN).input_ids) > 1
    assert tok.decode([eot]) == EOT_TOKEN and tok.decode([eot], skip_special_tokens=True) == ""


def test_modlm_reads_its_export_folder_back(exported, tokenizer):
    """The export's layer of saving (the weights' round trip through ``save_pretrained`` is the
    model's, ``test_model.py``): ``load_saved`` reads an export folder, transformers' keys in its
    ``config.json`` included, with the data settings and the folder's own tokenizer; transformers
    loads the same tensors; the folder holds transformers' files and copies of the model package."""
    model, folder, hf = exported
    saved = load_saved(str(folder))
    loaded, data = saved.model, saved.data
    assert loaded.config == model.config and not loaded.training
    assert data == {"seq_len": 64, "tokenizer": str(folder)}
    assert saved.tokenizer.to_str() == tokenizer.to_str()
    assert set(hf.state_dict()) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(hf.state_dict()[name], tensor), name
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_modlm.ModLMForCausalLM"
    assert config["tie_word_embeddings"] == model.config.tie_embeddings == hf.config.tie_word_embeddings
    assert (hf.lm_head.weight is hf.embed.weight) == model.config.tie_embeddings
    assert hf.config.hidden_size == model.config.d_model and hf.config.num_hidden_layers == model.config.n_layers
    names = {p.name for p in folder.iterdir()}
    assert names == {
        "config.json",
        "model.safetensors",
        "README.md",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "data.json",
        *remote_code_files(),
    }
    for name in remote_code_files():  # copies, not rewrites, of modlm's own files
        assert (folder / name).read_bytes() == (SRC / "modlm" / "model" / name).read_bytes()


def test_remote_code_is_the_model_package_and_stands_alone():
    files = remote_code_files()
    assert set(ENTRY_FILES) | {"config.py", "transformer.py", "kv_cache.py", "layers.py", "routing.py"} <= set(files)
    assert set(files) == {p.name for p in (SRC / "modlm" / "model").glob("*.py")} - {"__init__.py"}
    for name in files:
        assert relative_imports(SRC / "modlm" / "model" / name) <= set(files), name  # closed under imports
        text = (SRC / "modlm" / "model" / name).read_text()
        assert "import lightning" not in text and "from lightning" not in text and "from modlm" not in text


def test_relative_imports_reads_every_form(tmp_path):
    (tmp_path / "a.py").write_text(
        "from .b import x\nfrom .c.d import y\nfrom . import e, f\nimport os\nfrom json import dumps\n"
        "if False:\n    from .g import z\n"
    )
    assert relative_imports(tmp_path / "a.py") == {"b.py", "c.py", "e.py", "f.py", "g.py"}
    (tmp_path / "h.py").write_text("from ..up import x\n")
    with pytest.raises(ValueError, match="parent package"):
        relative_imports(tmp_path / "h.py")
