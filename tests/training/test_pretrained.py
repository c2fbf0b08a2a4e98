"""Fits that start from a pretrained transformers model (``--model.init_from``): converted to
Mixture-of-Depths with a capacity schedule, fine-tuned in full or router-only, resumed exactly, read
back by every command; and the bad input refused with one line, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modlm import MoDTransformer
from modlm.analysis.flops import flops_ratio_vs_dense, training_flops
from modlm.cli.eval import main as eval_main
from modlm.cli.generate import main as generate_main
from modlm.cli.train import main as train_main
from modlm.data.tokenizer import fingerprint, load_tokenizer
from modlm.saved import load_saved, read_checkpoint
from modlm.training.capacity import CapacitySchedule
from tests.helpers import VAL_FRACTION, assert_same_losses_after_resume, exact_fit, run_train, scalars
from tests.helpers.pretrained import pretrained_folder

SEQ, BATCH = 32, 4


def args(root: Path, corpus: str, folder: Path, *extra: str) -> list[str]:
    """A small fit from ``folder`` on the test corpus (the default config: tiny.yaml's model shape
    would conflict with the checkpoint's)."""
    return [
        *exact_fit(root, 6),
        "--data.source",
        corpus,
        "--data.val_fraction",
        VAL_FRACTION,
        "--data.seq_len",
        str(SEQ),
        "--data.batch_size",
        str(BATCH),
        "--data.val_windows",
        "8",
        "--data.num_workers",
        "0",
        "--model.warmup_steps",
        "2",
        "--model.init_from",
        str(folder),
        *extra,
    ]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_tokenizer) -> Path:
    """A transformers Llama (grouped-query attention, untied, vocabulary 416) with a 400-token tokenizer."""
    return pretrained_folder(tmp_path_factory.mktemp("llama") / "llama", "llama-gqa-untied", corpus=tiny_tokenizer[0])


SCHEDULE = (
    "--model.router_weight",
    "2sigmoid",
    "--model.capacity",
    "0.25",
    "--model.capacity_start",
    "1.0",
    "--model.capacity_steps",
    "10",
    "--model.capacity_shape",
    "cosine",
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_tokenizer, folder) -> Path:
    root = tmp_path_factory.mktemp("converted")
    assert train_main(["fit", *args(root, tiny_tokenizer[0], folder, *SCHEDULE, "--trainer.max_steps", "12")]) == 0
    return root


@pytest.mark.slow
def test_the_fit_builds_the_pretrained_model_with_its_tokenizer(converted, folder):
    saved = load_saved(str(converted / "checkpoints" / "last.ckpt"))
    cfg = saved.model.config
    assert (cfg.d_model, cfg.n_layers, cfg.n_kv_heads, cfg.mlp_hidden, cfg.tie_embeddings) == (64, 4, 2, 160, False)
    assert cfg.vocab_size == 416 and saved.tokenizer.get_vocab_size() == 400  # the checkpoint's vocabulary
    assert fingerprint(saved.tokenizer) == fingerprint(load_tokenizer(folder / "tokenizer.json"))
    assert cfg.routed_layers == [1, 3] and cfg.router_weight == "2sigmoid" and cfg.max_seq_len == SEQ
    # the first step starts from the pretrained weights (its dense blocks moved by 12 small steps only)
    pretrained = MoDTransformer.from_hf(folder, route_every=2, max_seq_len=SEQ)
    a, b = pretrained.blocks[0].mlp.up.weight.detach(), saved.model.blocks[0].mlp.up.weight.detach()
    assert float((a - b).abs().max()) < 0.05 * float(a.abs().max())


@pytest.mark.slow
def test_flops_follow_the_capacity_schedule_and_resume_continues_it(converted, tmp_path, tiny_tokenizer, folder):
    log = scalars(next((converted / "lightning_logs").glob("version_*")))
    cfg = load_saved(str(converted / "checkpoints" / "last.ckpt")).model.config
    schedule = CapacitySchedule(1.0, 10, [0.25, 0.25], "cosine")
    for step in range(12):
        tokens = [cfg.topk_tokens(SEQ, c) for c in schedule(step)]
        assert log["flops/step"][step] == BATCH * training_flops(cfg, SEQ, tokens_per_routed_block=tokens), step
        assert log["flops/ratio_vs_dense"][step] == pytest.approx(
            flops_ratio_vs_dense(cfg, SEQ, tokens_per_routed_block=tokens)
        )
    assert log["flops/step"][0] > log["flops/step"][5] > log["flops/step"][10] == log["flops/step"][11]
    assert log["flops/measured_per_batch"][0] == log["flops/analytic_per_batch"][0]  # the cross-check at capacity 1
    ckpt = read_checkpoint(converted / "checkpoints" / "step=0000006.ckpt", purpose="read")
    assert ckpt["capacity_schedule"] == schedule.state_dict()

    # resumed from step 6 (with another schedule asked for: the checkpoint's plan wins): the same run
    root = tmp_path / "resumed"
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "step=0000006.ckpt").write_bytes(
        (converted / "checkpoints" / "step=0000006.ckpt").read_bytes()
    )
    changed = [a if a != "10" else "3" for a in SCHEDULE]
    assert (
        train_main(
            [
                "fit",
                *args(root, tiny_tokenizer[0], folder, *changed, "--trainer.max_steps", "12", "--ckpt_path", "last"),
            ]
        )
        == 0
    )
    again = scalars(next((root / "lightning_logs").glob("version_*")))
    assert_same_losses_after_resume(log, again, killed_at=6, steps=12, first_logged=6)  # a folder of its own
    assert all(again["flops/step"][s] == log["flops/step"][s] for s in range(6, 12))


@pytest.mark.slow
def test_every_reader_takes_the_converted_checkpoint(converted, tmp_path, capsys):
    ckpt = str(converted / "checkpoints" / "last.ckpt")
    assert (
        eval_main([ckpt, "--quiet", "--decode_tokens", "2", "--prompt_tokens", "2", "--json", str(tmp_path / "e.json")])
        == 0
    )
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["routed_layers"] == [1, 3] and "causal.loss" in result
    capsys.readouterr()
    assert generate_main([ckpt, "def f(", "--max_new_tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def f(")


@pytest.mark.slow
def test_router_only_tuning_trains_routers_and_predictors_alone(tmp_path, tiny_tokenizer, folder):
    root = tmp_path / "routers"
    assert (
        train_main(
            [
                "fit",
                *args(
                    root,
                    tiny_tokenizer[0],
                    folder,
                    "--model.tune",
                    "routers",
                    "--model.router_weight",
                    "2sigmoid",
                    "--trainer.max_steps",
                    "4",
                ),
            ]
        )
        == 0
    )
    ckpt = read_checkpoint(root / "checkpoints" / "last.ckpt", purpose="read")
    trained = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    start = MoDTransformer.from_hf(folder, route_every=2, max_seq_len=SEQ).state_dict()
    moving = sorted(k for k in start if ".router." in k)  # the routers, their predictors and decisions
    for name, tensor in start.items():
        if name in moving:
            continue
        assert torch.equal(trained[name], tensor), name  # frozen: bit for bit the pretrained weights
    assert all(float(trained[k].abs().max()) > 0 for k in moving if k.endswith("router.weight"))  # routers left zero
    # the optimizer holds (and the checkpoint keeps state for) exactly the router and predictor tensors: the
    # decisions' thresholds are calibrated, not trained
    weights = [k for k in moving if ".decision." not in k]
    assert len(weights) < len(moving)
    (optimizer,) = ckpt["optimizer_states"]
    held = [i for group in optimizer["param_groups"] for i in group["params"]]
    assert len(held) == len(weights) == len(optimizer["state"])
    sizes = sorted(state["exp_avg"].numel() for state in optimizer["state"].values())
    assert sizes == sorted(start[k].numel() for k in weights)


@pytest.mark.parametrize(
    "extra, edit, message",
    [
        (("--model.tune", "routers", "--model.route_every", "0"), None, "--model.tune routers trains only routers"),
        (("--model.capacity_start", "0.1", "--model.capacity_steps", "10"), None, "ends above its start"),
        (("--model.d_model", "128"), None, "--model.d_model=128 conflicts with the pretrained checkpoint's d_model=64"),
        ((), {"model_type": "gpt2"}, "unsupported: model_type='gpt2'"),
        ((), {"hidden_act": "gelu_new"}, "unsupported: hidden_act='gelu_new'"),
        ((), "no weights", "holds no weights"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(
    tmp_path, tiny_tokenizer, folder, capsys, extra, edit, message
):
    source = folder
    if edit is not None:
        source = tmp_path / "edited"
        source.mkdir()
        for p in folder.iterdir():
            if not (edit == "no weights" and p.suffix == ".safetensors"):
                (source / p.name).write_bytes(p.read_bytes())
        if isinstance(edit, dict):
            config = json.loads((source / "config.json").read_text())
            (source / "config.json").write_text(json.dumps({**config, **edit}))
    root = tmp_path / "run"
    code = train_main(["fit", *args(root, tiny_tokenizer[0], source, *extra, "--trainer.max_steps", "2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not root.exists()


@pytest.mark.slow
def test_a_dense_fine_tune_exports_as_a_plain_llama(tmp_path, tiny_tokenizer, folder, capsys):
    """route_every 0: the pretrained model fine-tuned dense; eval.py --export writes a standard
    LlamaForCausalLM folder (no code of ours) that transformers and modlm-generate read."""
    import transformers

    root = tmp_path / "dense"
    assert (
        train_main(
            ["fit", *args(root, tiny_tokenizer[0], folder, "--model.route_every", "0", "--trainer.max_steps", "2")]
        )
        == 0
    )
    out = tmp_path / "export"
    ckpt = str(root / "checkpoints" / "last.ckpt")
    assert eval_main([ckpt, "--quiet", "--decode_tokens", "2", "--prompt_tokens", "2", "--export", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert not list(out.glob("*.py")) and (out / "data.json").is_file()
    model = load_saved(ckpt).model
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    idx = torch.randint(0, 400, (2, SEQ))
    with torch.no_grad():
        want = model(idx).logits
        assert float((hf(idx).logits - want).abs().max()) <= 1e-5 * float(want.abs().max())
    capsys.readouterr()
    assert generate_main([ckpt, "def f(", "--max_new_tokens", "6", "--temperature", "0"]) == 0
    want_text = capsys.readouterr().out
    assert generate_main([str(out), "def f(", "--max_new_tokens", "6", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == want_text


@pytest.mark.slow
def test_router_only_tuning_under_fsdp2(tmp_path, tiny_tokenizer, folder):
    """Two processes, every block a fully_shard unit holding frozen and trained parameters: the run
    trains, and the frozen weights come back unchanged from the sharded checkpoint."""
    root = tmp_path / "fsdp"
    done = run_train(
        "fit",
        *args(
            root,
            tiny_tokenizer[0],
            folder,
            "--model.tune",
            "routers",
            "--model.router_weight",
            "2sigmoid",
            "--trainer.max_steps",
            "3",
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "2",
            "--trainer.strategy",
            '{"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}',
        ),
    )
    assert done.returncode == 0, done.stderr[-4000:]
    saved = load_saved(str(root / "checkpoints" / "last.ckpt")).model.state_dict()
    start = MoDTransformer.from_hf(folder, route_every=2, max_seq_len=SEQ).state_dict()
    for name, tensor in start.items():
        if ".router." not in name and ".predictor." not in name:
            assert torch.equal(saved[name], tensor), name
    assert float(saved["blocks.1.router.weight"].abs().max()) > 0


@pytest.mark.slow
def test_a_hub_id_starts_a_fit_from_the_local_cache(tmp_path, tiny_tokenizer, folder, monkeypatch):
    """``--model.init_from OWNER/NAME`` offline: weights, config and tokenizer from the Hugging Face
    cache (laid out here as a download leaves it)."""
    from huggingface_hub import constants

    from tests.helpers.pretrained import cache_repo

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    cache_repo(tmp_path / "hf", "someone/tiny-llama", {p.name: p.read_bytes() for p in folder.iterdir()})
    root = tmp_path / "run"
    fit = [a if a != str(folder) else "someone/tiny-llama" for a in args(root, tiny_tokenizer[0], folder)]
    assert train_main(["fit", *fit, "--model.route_every", "0", "--trainer.max_steps", "2"]) == 0
    saved = load_saved(str(root / "checkpoints" / "last.ckpt"))
    assert saved.model.config.d_model == 64 and saved.model.config.vocab_size == 416
    assert fingerprint(saved.tokenizer) == fingerprint(load_tokenizer(folder / "tokenizer.json"))
