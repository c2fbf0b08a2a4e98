"""Fine-tuning a pretrained model on conversations: the presets end to end from a transformers Llama folder
with a chat template (full and LoRA, dense and converted to Mixture-of-Depths), the loss mask reaching the
training and validation loss, LoRA's trainable share, checkpoints and exact resume, merged exports that
transformers loads with modlm's logits, and bad input refused with one line, nothing written."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from modlm import ModelConfig, MoDTransformer
from modlm.analysis.evaluate import evaluate_routing
from modlm.cli.eval import main as eval_main
from modlm.cli.generate import main as generate_main
from modlm.cli.train import main as train_main
from modlm.data import ModLMDataModule
from modlm.saved import load_saved, read_checkpoint
from modlm.saved.adapters import ADAPTER_BASE_KEY, LoraSettings, add_adapters
from modlm.training.module import MoDLightningModule
from tests.helpers import REPO, assert_same_losses_after_resume, exact_fit, run_train, scalars
from tests.helpers.chat import CHATML_TEMPLATE, as_messages, chatml_tokenizer_folder, docstring_pairs, write_chats
from tests.helpers.pretrained import pretrained_folder

os.environ.setdefault("HF_MODULES_CACHE", str(Path(tempfile.gettempdir()) / "modlm-test-hf-modules"))
SEQ, BATCH = 128, 4
SFT, SFT_LORA = REPO / "configs" / "sft.yaml", REPO / "configs" / "sft_lora.yaml"


@pytest.fixture(scope="module")
def llama_chat(tmp_path_factory, tiny_tokenizer) -> Path:
    """A transformers Llama (grouped-query attention, untied, vocabulary 416) whose tokenizer (400 tokens,
    ChatML's special tokens) has the ChatML template in its tokenizer_config.json."""
    folder = pretrained_folder(tmp_path_factory.mktemp("llama") / "llama", "llama-gqa-untied")
    return chatml_tokenizer_folder(folder, tiny_tokenizer[0])


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> dict[str, Path]:
    """Question/answer pairs from the standard library's docstrings: ``train``, held-out ``val``, and
    ``val_more``: each held-out conversation with a user turn after its answer."""
    pairs = [p for p in docstring_pairs() if len(p["completion"]) < 100]
    root = tmp_path_factory.mktemp("chats")
    more = [
        {"messages": as_messages(p)["messages"] + [{"role": "user", "content": "Thanks! And an example?"}]}
        for p in pairs[:8]
    ]
    return {
        "train": write_chats(root / "train.jsonl", pairs[8:]),
        "val": write_chats(root / "val.jsonl", pairs[:8]),
        "val_more": write_chats(root / "val_more.jsonl", more),
    }


def fit_args(root: Path, folder: Path, chats: dict, *extra: str, init_from: bool = True) -> list[str]:
    """A short fit from ``folder`` (or, without ``init_from``, from scratch with its tokenizer) on the chats."""
    start = ["--model.init_from", str(folder)] if init_from else ["--data.tokenizer", str(folder)]
    return [
        *exact_fit(root, 2),
        "--model.warmup_steps",
        "1",
        *start,
        "--data.source",
        str(chats["train"]),
        "--data.val_source",
        str(chats["val"]),
        "--data.seq_len",
        str(SEQ),
        "--data.batch_size",
        str(BATCH),
        "--data.num_workers",
        "0",
        *extra,
    ]


def module_for(folder: Path, **model) -> MoDLightningModule:
    return MoDLightningModule(
        init_from=str(folder), vocab_size=400, max_seq_len=SEQ, warmup_steps=1, lr_decay_steps=4, **model
    )


def data_for(folder: Path, chats: dict, val: str) -> ModLMDataModule:
    return ModLMDataModule(
        source=str(chats[val]),
        val_source=str(chats[val]),
        tokenizer=str(folder),
        seq_len=SEQ,
        batch_size=BATCH,
        num_workers=0,
    )


def quiet_trainer(**given) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **given,
    )


@pytest.mark.parametrize("routing", ["dense", "converted"])
def test_a_user_turn_after_the_last_answer_changes_no_loss(routing, llama_chat, chats):
    """The loss mask reaches the loss: the training step's loss, the validation loss (and, converted, the
    causal one: top-k routing sees the whole window, so the extra turn may move a routed block's picks) and
    eval's loss are the same with and without a user turn after each conversation's answer; and the
    validation loss is the mean over the assistant's tokens, as eval's is."""
    model = {"route_every": 0} if routing == "dense" else {"route_every": 2, "router_weight": "2sigmoid"}
    keys = ["val/loss"] if routing == "dense" else ["val/loss_causal"]
    results = {}
    for val in ("val", "val_more"):
        torch.manual_seed(0)
        module, dm = module_for(llama_chat, **model), data_for(llama_chat, chats, val)
        (validated,) = quiet_trainer().validate(module, datamodule=dm, verbose=False)
        batches = list(dm.val_dataloader())
        evaluated = evaluate_routing(module.model, batches, "causal")
        trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
        trainer.fit(module, datamodule=dm)
        results[val] = {
            **{k: validated[k] for k in keys},
            "eval": evaluated["loss"],
            "tokens": evaluated["tokens"],
            "train": float(trainer.callback_metrics["train/loss"]),
        }
        assert validated[keys[0]] == pytest.approx(evaluated["loss"], abs=1e-5)  # weighted by assistant tokens
    assert results["val"]["tokens"] == results["val_more"]["tokens"] > 0
    for key, value in results["val"].items():
        assert results["val_more"][key] == pytest.approx(value, abs=1e-5), key


def test_lora_trains_a_few_percent_of_the_default_runs_shape():
    """The dense default run's shape (d_model 256, 6 blocks, vocabulary 8192, tied), converted or not:
    adapters of rank 8 on every projection, plus the routers and predictors of a converted model."""
    shares = {}
    for name, routing in (("dense", {"route_every": 0}), ("converted", {})):
        with torch.device("meta"):
            model = MoDTransformer(ModelConfig(**routing))
        total_before = model.num_params()
        add_adapters(model, LoraSettings())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        shares[name] = trainable / total_before
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        assert all(".lora_" in n or ".router." in n or ".predictor." in n for n in names)
        adapted = {n.split(".lora_")[0].rsplit(".", 1)[1] for n in names if ".lora_" in n}
        assert adapted == {"qkv", "proj", "up", "gate", "down"}
    assert 0.02 < shares["dense"] < 0.05 and shares["dense"] < shares["converted"] < 0.06, shares


PRESETS = {
    "sft-dense": ([SFT], ()),
    "sft_lora-dense": ([SFT, SFT_LORA], ()),
    "sft-converted": ([SFT], ("--model.route_every", "2", "--model.capacity_steps", "2")),
    "sft_lora-converted": ([SFT, SFT_LORA], ("--model.route_every", "2", "--model.capacity_steps", "2")),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, llama_chat, chats):
    """name -> run folder of each preset, trained 4 steps when first asked for."""
    done = {}

    def run(name: str) -> Path:
        if name not in done:
            configs, extra = PRESETS[name]
            root = tmp_path_factory.mktemp(name)
            args = [a for c in configs for a in ("--config", str(c))]
            fit = fit_args(root, llama_chat, chats, *extra, "--trainer.max_steps", "4")
            assert train_main(["fit", *args, *fit]) == 0
            done[name] = root
        return done[name]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PRESETS))
def test_a_preset_runs_end_to_end_from_a_llama_folder_with_a_chat_template(
    name, runs, llama_chat, chats, tmp_path, capsys
):
    """Fit; the checkpoint carries the folder's chat template (and, for LoRA, only what trains); eval on the
    held-out file scores what the run validated; the export keeps the template; generation chats."""
    root = runs(name)
    ckpt = str(root / "checkpoints" / "last.ckpt")
    saved = load_saved(ckpt)
    converted = name.endswith("converted")
    assert saved.chat_template == CHATML_TEMPLATE and bool(saved.model.config.routed_layers) == converted
    raw = read_checkpoint(ckpt, purpose="read")
    if "lora" in name:
        assert raw[ADAPTER_BASE_KEY]["init_from"] == str(llama_chat)
        trained = list(raw["state_dict"])
        assert trained and all(".lora_" in k or ".router." in k or ".predictor." in k for k in trained)
    else:
        assert ADAPTER_BASE_KEY not in raw and "model.lm_head.weight" in raw["state_dict"]
    logged = scalars(next((root / "lightning_logs").glob("version_*")))
    key = "val/loss_causal" if converted else "val/loss"
    out = tmp_path / "eval.json"
    assert (
        eval_main(
            [
                ckpt,
                "--quiet",
                "--data.source",
                str(chats["val"]),
                "--json",
                str(out),
                "--decode_tokens",
                "2",
                "--prompt_tokens",
                "2",
                "--export",
                str(tmp_path / "export"),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["causal.loss"] == pytest.approx(logged[key][3], abs=1e-5)
    # the held-out windows and their loss mask travel with the checkpoint: the same loss with no data named
    assert eval_main([ckpt, "--quiet", "--json", str(out), "--decode_tokens", "2", "--prompt_tokens", "2"]) == 0
    assert json.loads(out.read_text())["causal.loss"] == pytest.approx(logged[key][3], abs=1e-5)
    assert (tmp_path / "export" / "chat_template.jinja").read_text() == CHATML_TEMPLATE
    generation = json.loads((tmp_path / "export" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [0, 2]  # <|endoftext|>, and ChatML's end of turn <|im_end|>
    kind = json.loads((tmp_path / "export" / "config.json").read_text())["architectures"]
    assert kind == (["ModLMForCausalLM"] if converted else ["LlamaForCausalLM"])
    capsys.readouterr()
    question = "What does `json.dumps` do?"
    assert generate_main([ckpt, question, "--chat", "--max_new_tokens", "8", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.slow
def test_a_merged_lora_export_gives_the_adapters_logits_in_transformers(runs, llama_chat, tmp_path):
    """load_saved merges the adapters (peft's merge_and_unload) into a plain model: its logits are the
    adapted model's, and the standard Llama folder it exports gives them in transformers, chat template
    and special tokens kept."""
    import transformers

    ckpt = runs("sft_lora-dense") / "checkpoints" / "last.ckpt"
    merged = load_saved(str(ckpt)).model
    adapted = MoDTransformer.from_hf(llama_chat, max_seq_len=SEQ, route_every=0)
    add_adapters(adapted, LoraSettings())
    trained = {k.removeprefix("model."): v for k, v in read_checkpoint(ckpt, purpose="read")["state_dict"].items()}
    assert not set(adapted.load_state_dict(trained, strict=False).unexpected_keys)
    idx = torch.randint(0, 400, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = adapted.eval()(idx).logits
        got = merged(idx).logits
        pretrained = MoDTransformer.from_hf(llama_chat, max_seq_len=SEQ, route_every=0)(idx).logits
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= 1e-5 * scale
    assert float((pretrained - want).abs().max()) > 1e-3 * scale  # the adapters moved it
    merged.to_hf(tmp_path / "export")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        assert float((hf(idx).logits - got).abs().max()) <= 1e-5 * scale
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    assert tokenizer.chat_template == CHATML_TEMPLATE and tokenizer.eos_token == "<|endoftext|>"


@pytest.mark.slow
def test_lora_resumes_exactly(runs, llama_chat, chats, tmp_path):
    """3 steps, then resumed to 6 (adapter dropout on: the generator states resume too), logs the losses of
    6 steps in one go; the checkpoint of step 2 resumes from what trains alone."""
    lora = [a for c in (SFT, SFT_LORA) for a in ("--config", str(c))]
    steps = ("--model.lr_decay_steps", "6", "--trainer.max_steps")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert train_main(["fit", *lora, *fit_args(whole, llama_chat, chats), *steps, "6"]) == 0
    assert train_main(["fit", *lora, *fit_args(cut, llama_chat, chats), *steps, "3"]) == 0
    (cut / "checkpoints" / "step=0000003.ckpt").unlink(missing_ok=True)
    (cut / "checkpoints" / "last.ckpt").unlink()  # resume from step 2, which holds what trains and nothing else
    assert train_main(["fit", *lora, *fit_args(cut, llama_chat, chats), *steps, "6", "--ckpt_path", "last"]) == 0
    want = scalars(whole / "lightning_logs" / "version_0")
    got = scalars(cut / "lightning_logs" / "version_0")
    assert_same_losses_after_resume(want, got, killed_at=2, steps=6)


@pytest.mark.slow
def test_lora_checkpoints_need_their_pretrained_folder(runs, llama_chat, tmp_path, capsys):
    copy = shutil.copytree(llama_chat, tmp_path / "llama")
    ckpt = read_checkpoint(runs("sft_lora-dense") / "checkpoints" / "last.ckpt", purpose="read")
    ckpt["hyper_parameters"]["init_from"] = ckpt[ADAPTER_BASE_KEY]["init_from"] = str(copy)
    torch.save(ckpt, tmp_path / "moved.ckpt")
    assert load_saved(str(tmp_path / "moved.ckpt")).chat_template == CHATML_TEMPLATE  # the same weights: fine
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-4:] = bytes(4)  # the last weight's last value changed
    weights.write_bytes(bytes(data))
    shutil.rmtree(tmp_path / "gone", ignore_errors=True)
    for edit, message in (
        (None, "whose weights files have changed since"),
        (str(tmp_path / "gone"), "which cannot be read now"),
    ):
        if edit:
            ckpt["hyper_parameters"]["init_from"] = edit
            torch.save(ckpt, tmp_path / "moved.ckpt")
        capsys.readouterr()
        assert eval_main([str(tmp_path / "moved.ckpt"), "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize(
    "extra, edit, message",
    [
        ((), "bad line", "val.jsonl line 3: message 1: role 'bot' is not one of system, user, assistant"),
        ((), "not json", "val.jsonl line 3: not JSON"),
        (("--model.tune", "lora"), "no init_from", "--model.tune lora adapts a pretrained model"),
        (("--model.lora_rank", "0", "--model.tune", "lora"), None, "--model.lora_rank=0: expected >= 1"),
        (("--model.tune", "lora", "--model.lora_targets", "[router]"), None, "names no nn.Linear layer"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(extra, edit, message, llama_chat, chats, tmp_path, capsys):
    files = dict(chats)
    if edit in ("bad line", "not json"):
        lines = chats["val"].read_text().splitlines()
        lines[2] = json.dumps({"messages": [{"role": "bot", "content": "hi"}]}) if edit == "bad line" else "{oops"
        files["val"] = tmp_path / "val.jsonl"
        files["val"].write_text("\n".join(lines) + "\n")
    root = tmp_path / "run"
    args = fit_args(root, llama_chat, files, *extra, "--trainer.max_steps", "2", init_from=edit != "no init_from")
    code = train_main(["fit", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) >= 1 and message in err[-1], err
    assert not [line for line in err if line.startswith("Traceback")]
    assert not (root / "checkpoints").exists()


@pytest.mark.slow
def test_lora_under_fsdp2_trains_and_resumes(tmp_path, llama_chat, chats):
    """Two gloo processes, ModelParallelStrategy: every block a fully_shard unit holding frozen weights and
    trained adapters; 4 steps, then resumed to 6 from its sharded checkpoint, log the losses of 6 in one go;
    the sharded checkpoint reads back merged, the frozen weights the pretrained ones."""
    lora = [a for c in (SFT, SFT_LORA) for a in ("--config", str(c))]
    fsdp = (
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--model.lr_decay_steps",
        "6",
        "--trainer.strategy",
        '{"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}',
    )
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    for root, steps, more in ((whole, "6", ()), (cut, "4", ()), (cut, "6", ("--ckpt_path", "last"))):
        done = run_train("fit", *lora, *fit_args(root, llama_chat, chats, *fsdp, *more), "--trainer.max_steps", steps)
        assert done.returncode == 0, done.stderr[-4000:]
    assert (cut / "checkpoints" / "last.ckpt").is_dir()
    assert_same_losses_after_resume(
        scalars(whole / "lightning_logs" / "version_0"),
        scalars(cut / "lightning_logs" / "version_0"),
        killed_at=4,
        steps=6,
    )
    merged = load_saved(str(whole / "checkpoints" / "last.ckpt")).model.state_dict()
    start = MoDTransformer.from_hf(llama_chat, max_seq_len=SEQ, route_every=0).state_dict()
    assert torch.equal(merged["lm_head.weight"], start["lm_head.weight"])
    assert torch.equal(merged["embed.weight"], start["embed.weight"])
    assert not torch.equal(merged["blocks.0.attn.qkv.weight"], start["blocks.0.attn.qkv.weight"])
