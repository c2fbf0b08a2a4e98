"""Pretrained Llama-family models in and out (``MoDTransformer.from_hf`` / ``to_hf``, the state-dict
adapter ``modlm.model.hf_format``), against transformers' own models built here at a small size:
the same logits and greedy tokens, standard folders transformers loads without remote code, the
refusals, and the conversion to Mixture-of-Depths that starts at the pretrained function."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modlm import ModelConfig, MoDTransformer
from modlm.model.errors import UserError
from modlm.model.hf_format import UnsupportedCheckpoint, config_from_hf, read_config
from tests.helpers.pretrained import KINDS, cache_repo, hf_model, pretrained_folder, tokenizer_folder

TOLERANCE = 1e-5
"""Largest logit difference allowed, relative to the largest logit: fp32 rounding, nothing more."""


def logits_gap(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max absolute difference, the same relative to the largest |logit| of ``a``)."""
    gap = float((a - b).abs().max())
    return gap, gap / float(a.abs().max())


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pretrained")
    return {kind: pretrained_folder(root / kind, kind) for kind in KINDS}


@pytest.mark.parametrize("kind", list(KINDS))
def test_imported_model_gives_transformers_logits(kind, folders):
    """fp32 logits within 1e-5 of the largest logit, on inputs longer than Llama 3's scaled context."""
    hf = hf_model(kind)
    model = MoDTransformer.from_hf(folders[kind])
    assert not model.config.routed_layers and not model.training
    idx = torch.randint(0, hf.config.vocab_size, (3, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = hf(idx).logits, model(idx).logits
    gap, rel = logits_gap(want, got)
    assert rel < TOLERANCE, (kind, gap, rel)
    assert float(want.std()) > 0.5  # logits that vary: the comparison means something


def test_the_imported_shape_is_the_checkpoints(folders):
    cfg = MoDTransformer.from_hf(folders["llama-head-dim"]).config
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model, cfg.mlp_hidden) == (4, 1, 32, 64, 160)
    assert cfg.norm_eps == 1e-5 and not cfg.tie_embeddings and cfg.vocab_size == 416
    assert MoDTransformer.from_hf(folders["llama-mha-tied"]).config.tie_embeddings
    qwen = MoDTransformer.from_hf(folders["qwen2"])
    assert qwen.config.qkv_bias and qwen.blocks[0].attn.qkv.bias is not None
    assert MoDTransformer.from_hf(folders["llama3-rope"]).config.rope_scaling["factor"] == 8.0
    # grouped-query attention caches only the key/value heads
    assert MoDTransformer.from_hf(folders["llama-gqa-untied"]).new_state(1).caches[0].k.shape[1] == 2


def test_llama3_rope_scaling_changes_the_function(folders):
    """The scaled frequencies are what makes the parity above hold: plain RoPE on the same weights
    is far off."""
    scaled = MoDTransformer.from_hf(folders["llama3-rope"])
    plain = MoDTransformer(ModelConfig(**{**scaled.config.to_dict(), "rope_scaling": None}))
    plain.load_state_dict(scaled.state_dict())
    idx = torch.randint(0, 416, (2, 100), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert logits_gap(scaled(idx).logits, plain.eval()(idx).logits)[1] > 1e-2


@pytest.mark.parametrize("kind", ["llama-gqa-untied", "qwen2"])
def test_cached_greedy_generation_gives_transformers_tokens(kind, folders):
    hf = hf_model(kind)
    model = MoDTransformer.from_hf(folders[kind])
    prompt = torch.randint(0, 416, (2, 12), generator=torch.Generator().manual_seed(3))
    want = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=24,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    got = model.generate(prompt, max_new_tokens=24, temperature=0)
    assert torch.equal(got, want)
    assert all(len(set(row[-24:].tolist())) > 4 for row in got)  # continuations that vary


def test_a_hub_id_is_read_from_the_local_cache(folders, tmp_path, monkeypatch):
    from huggingface_hub import constants

    folder = folders["qwen2"]
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    cache_repo(tmp_path / "hf", "someone/tiny-qwen", {p.name: p.read_bytes() for p in folder.iterdir()})
    idx = torch.randint(0, 416, (1, 20))
    want = MoDTransformer.from_hf(folder)(idx).logits
    for spec in ("someone/tiny-qwen", "hub:someone/tiny-qwen"):
        assert torch.equal(MoDTransformer.from_hf(spec)(idx).logits, want), spec
    with pytest.raises(UnsupportedCheckpoint, match="nobody/absent.*Hub cannot give it"):
        MoDTransformer.from_hf("nobody/absent")


# --- refusals ----------------------------------------------------------------------------------------
def edited(folder: Path, tmp_path: Path, **changes) -> Path:
    """A copy of ``folder`` whose config.json has ``changes`` (None removes a key)."""
    out = tmp_path / "edited"
    out.mkdir(parents=True)
    for p in folder.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    config = read_config(out)
    for key, value in changes.items():
        config.pop(key, None) if value is None else config.__setitem__(key, value)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(
    "kind, changes, field",
    [
        ("llama-gqa-untied", {"model_type": "gpt2"}, "model_type='gpt2'"),
        ("llama-gqa-untied", {"architectures": ["LlamaForSequenceClassification"]}, "architectures="),
        ("llama-gqa-untied", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
        (
            "llama-gqa-untied",
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}},
            "rope_type='yarn'",
        ),
        ("llama-gqa-untied", {"attention_bias": True}, "attention_bias=True"),
        ("llama-gqa-untied", {"mlp_bias": True}, "mlp_bias=True"),
        ("llama-gqa-untied", {"num_local_experts": 8}, "num_local_experts=8"),
        ("mistral", {"sliding_window": 64}, "sliding_window=64"),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 32}, "use_sliding_window=True"),
    ],
)
def test_unsupported_checkpoints_are_refused_naming_the_field(folders, tmp_path, kind, changes, field):
    folder = edited(folders[kind], tmp_path, **changes)
    with pytest.raises(UnsupportedCheckpoint) as err:
        MoDTransformer.from_hf(folder, max_seq_len=128)
    message = str(err.value)
    assert field in message and "\n" not in message, message


def test_a_window_longer_than_the_context_is_no_window(folders, tmp_path):
    """A sliding window at least as long as the context never masks anything: read as full attention."""
    folder = edited(folders["mistral"], tmp_path, sliding_window=128)
    assert MoDTransformer.from_hf(folder, max_seq_len=128).config.max_seq_len == 128
    with pytest.raises(UnsupportedCheckpoint, match="sliding_window=128"):
        MoDTransformer.from_hf(folder, max_seq_len=256)
    unsaid = edited(folders["mistral"], tmp_path / "unsaid", sliding_window=None)  # transformers' Mistral: 4096 then
    assert MoDTransformer.from_hf(unsaid, max_seq_len=4096).config.max_seq_len == 4096
    with pytest.raises(UnsupportedCheckpoint, match="sliding_window=4096"):
        MoDTransformer.from_hf(unsaid, max_seq_len=4097)


def test_folders_without_safetensors_weights_are_refused(folders, tmp_path):
    folder = edited(folders["llama-gqa-untied"], tmp_path)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(UnsupportedCheckpoint, match="holds no weights.*pytorch_model.bin.*never read"):
        MoDTransformer.from_hf(folder)
    (folder / "config.json").unlink()
    with pytest.raises(UnsupportedCheckpoint, match="no config.json"):
        MoDTransformer.from_hf(folder)


def test_overrides_may_not_change_what_the_weights_decide(folders):
    hf = read_config(folders["llama-gqa-untied"])
    assert config_from_hf(hf, d_model=64).d_model == 64  # restating it is fine
    with pytest.raises(UserError, match="d_model=128 conflicts with the pretrained checkpoint's d_model=64"):
        config_from_hf(hf, d_model=128)
    with pytest.raises(UserError, match="n_experts=4"):
        config_from_hf(hf, n_experts=4)
    with pytest.raises(UserError, match="recursions=3"):
        config_from_hf(hf, recursions=3, route_every=0)


# --- out: standard transformers folders ------------------------------------------------------------
@pytest.mark.parametrize(
    "kind, architecture",
    [("llama-mha-tied", "LlamaForCausalLM"), ("llama3-rope", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM")],
)
def test_a_dense_model_exports_as_a_standard_transformers_model(kind, architecture, folders, tmp_path, tiny_tokenizer):
    import transformers

    model = MoDTransformer.from_hf(folders[kind])
    tokenizer = tokenizer_folder(tmp_path / "tok", tiny_tokenizer[0])
    out = tmp_path / "export"
    assert model.to_hf(out, tokenizer=tokenizer) == "standard"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [architecture] and "auto_map" not in config
    assert not list(out.glob("*.py"))  # no code of ours
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()  # no trust_remote_code
    assert type(hf).__name__ == architecture
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "</s>" and hf.generation_config.eos_token_id == tok.eos_token_id
    idx = torch.randint(0, 416, (2, 80))
    with torch.no_grad():
        want = model(idx).logits
        assert logits_gap(want, hf(idx).logits)[1] < TOLERANCE
        assert torch.equal(MoDTransformer.from_hf(out)(idx).logits, want)  # import(export(m)) == m


def test_a_modlm_dense_model_round_trips_through_a_llama_folder(tmp_path, tiny_tokenizer):
    """modlm's own dense model (its init, untied, GQA, a head size of its own) is a Llama as it is."""
    import transformers

    cfg = ModelConfig(
        vocab_size=512,
        d_model=48,
        n_layers=3,
        n_heads=6,
        n_kv_heads=2,
        head_size=16,
        route_every=0,
        tie_embeddings=False,
        max_seq_len=64,
        rope_theta=5e4,
        norm_eps=1e-6,
    )
    model = MoDTransformer(cfg).eval()
    with torch.no_grad():  # norm gains away from 1, so that a misplaced norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.to_hf(tmp_path / "llama", tokenizer=tiny_tokenizer[1])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "llama").eval()
    back = MoDTransformer.from_hf(tmp_path / "llama")
    idx = torch.randint(0, 512, (2, 64))
    with torch.no_grad():
        want = model(idx).logits
        assert logits_gap(want, hf(idx).logits)[1] < TOLERANCE
        assert torch.equal(back(idx).logits, want)
    assert {
        f: getattr(back.config, f) for f in ("n_kv_heads", "head_size", "rope_theta", "norm_eps", "max_seq_len")
    } == {"n_kv_heads": 2, "head_size": 16, "rope_theta": 5e4, "norm_eps": 1e-6, "max_seq_len": 64}


def test_models_that_are_not_llamas_keep_the_remote_code_export(tmp_path, tiny_tokenizer):
    for cfg in (
        ModelConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=2, max_seq_len=32, route_every=2),
        ModelConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=2, max_seq_len=32, route_every=0, mlp="gelu"),
    ):
        out = tmp_path / cfg.mlp
        assert MoDTransformer(cfg).to_hf(out, tokenizer=tiny_tokenizer[1]) == "remote-code"
        assert json.loads((out / "config.json").read_text())["architectures"] == ["ModLMForCausalLM"]
        assert (out / "modeling_modlm.py").is_file()
    with pytest.raises(UserError, match="needs the model's tokenizer"):
        MoDTransformer(cfg).to_hf(tmp_path / "none")


# --- conversion to Mixture-of-Depths ----------------------------------------------------------------
def test_at_capacity_one_the_converted_model_is_the_pretrained_one(folders):
    """Zero routers and the 2*sigmoid weight: every routed block processes every token and scales its
    update by exactly 1. With sigmoid(r) the same routers halve every routed block's update."""
    dense = MoDTransformer.from_hf(folders["llama-gqa-untied"])
    idx = torch.randint(0, 416, (2, 60), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = dense(idx).logits
        for routing in (
            {"route_every": 2},
            {"route_every": 1},
            {"route_layers": [0, 3]},
            {"route_every": 2, "route_part": "attention"},
        ):
            mod = MoDTransformer.from_hf(folders["llama-gqa-untied"], capacity=1.0, **routing)
            assert mod.config.router_weight == "2sigmoid" and mod.config.routed_layers
            assert all(float(mod.blocks[i].router.weight.abs().max()) == 0 for i in mod.config.routed_layers)
            for mode in ("topk", "causal"):  # at capacity 1 the causal decision keeps every token too
                # attention-only routing adds the attention update to the stream before the MLP reads it,
                # (x + a) + m where the plain block sums x + (a + m): equal up to the rounding of that order
                exact = routing.get("route_part") != "attention"
                gap = logits_gap(want, mod(idx, routing=mode).logits)
                assert (gap[0] == 0.0) if exact else (gap[1] < 1e-6), (routing, mode, gap)
        halved = MoDTransformer.from_hf(
            folders["llama-gqa-untied"], capacity=1.0, route_every=2, router_weight="sigmoid"
        )
        assert logits_gap(want, halved(idx, routing="topk").logits)[1] > 1e-2


def test_conversion_picks_blocks_and_capacities(folders):
    mod = MoDTransformer.from_hf(folders["llama-gqa-untied"], route_layers=[1, 2, 3], capacities=[0.5, 0.25, 0.125])
    assert mod.config.routed_layers == [1, 2, 3]
    assert [mod.blocks[i].router.capacity for i in (1, 2, 3)] == [0.5, 0.25, 0.125]
    assert [mod.blocks[i].router.topk_tokens(64) for i in (1, 2, 3)] == [32, 16, 8]
    out = mod(torch.randint(0, 416, (2, 64)), routing="topk")
    assert [int(r.selected[0].sum()) for r in out.routing] == [32, 16, 8]
    spread = MoDTransformer.from_hf(folders["llama-gqa-untied"], route_every=1, capacity=0.25, capacity_depth=0.5)
    caps = [spread.blocks[i].router.capacity for i in range(4)]
    assert caps == sorted(caps, reverse=True) and caps[0] == pytest.approx(0.375) and caps[-1] == pytest.approx(0.125)
    assert sum(caps) / 4 == pytest.approx(0.25)


def test_reading_a_folder_needs_no_transformers(folders):
    """The adapter reads config.json and safetensors itself: a process where transformers cannot be
    imported still imports the checkpoint (the same logits as here)."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import torch\nfrom modlm import MoDTransformer\n"
        f"m = MoDTransformer.from_hf({str(folders['qwen2'])!r})\n"
        "print(float(m(torch.arange(20).unsqueeze(0)).logits.sum()))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    want = float(MoDTransformer.from_hf(folders["qwen2"])(torch.arange(20).unsqueeze(0)).logits.sum())
    assert float(done.stdout.strip()) == pytest.approx(want, rel=1e-6)
