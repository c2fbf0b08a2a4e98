"""The evaluation command line: ``python eval.py CKPT [--json OUT] [--compare CKPT2] ...``.

    python eval.py runs/default/checkpoints/last.ckpt                     # table on stdout
    python eval.py CKPT --json results.json                              # every number as JSON
    python eval.py CKPT --compare runs/dense/checkpoints/last.ckpt       # side by side + PNG plot
    python eval.py CKPT --export exported/                               # a folder transformers loads too
    python eval.py CKPT --tasks hellaswag,arc_easy --json tasks.json     # lm-evaluation-harness tasks

(``modlm-eval`` once the package is installed.) The parser is jsonargparse's, as for
``train.py``: ``--config FILE`` reads any of the options from YAML, groups are dotted
(``--data.source``, ``--data.max_batches``), and ``--help`` shows the docstrings below.

CKPT is a Lightning checkpoint written by ``train.py`` (read with ``torch.load(weights_only=True)``:
no pickled code runs), an FSDP2 sharded checkpoint folder, a folder written by ``--export``, or a
Hugging Face Hub id of one. The data is the validation windows the checkpoint carries, tokenized
with its own tokenizer, so no corpus is needed (``--data.source`` evaluates on another corpus; an
export folder is evaluated on its training corpus's validation split). Chat data (a file of
conversations given as ``--data.source``) is held out already: every conversation of it is scored, one
per window, rendered with the model's chat template, the loss on the assistant's tokens alone, as the
run validated. JSON keys are flat and
dotted: ``topk.loss``, ``topk.ppl``, ``topk.bpb``, ``causal.loss``, ``causal.ppl``,
``causal.capacity_used``, ``causal.causal_acc.layer_3``, ``decode_tokens_per_s`` (batch 1),
``decode_tokens_per_s_batched`` (``decode_batch`` prompts at once), ...

With ``--tasks``, CKPT is scored on lm-evaluation-harness tasks instead (``modlm.cli.eval_tasks``;
keys ``harness.<task>.<metric>``, the routing and what each routed block processed; see
docs/evaluation.md).
"""

from __future__ import annotations

import json as json_lib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from ..analysis.batch import split_batch
from ..analysis.evaluate import (
    decode_speed,
    decode_throughput,
    evaluate_routing,
    flops_per_token,
    generation_share,
    token_byte_lengths,
)
from ..analysis.report import plot as draw_plot
from ..analysis.report import table
from ..model.errors import UserError, run_command
from ..model.hf_format import upload_folder
from ..model.version import __version__, describe
from ..saved import SavedModel, load_saved
from ..saved.travel import unpack
from ..training.export import model_card, write_export
from .generate import GenerateOptions
from .usage import parse_args

EVERY_WINDOW = 2**62
"""``val_windows`` that reads every conversation of a chat file."""


class EvalError(UserError):
    """A problem with the user's input: printed as one line, exit status 2."""


@dataclass
class DataOptions:
    """Which validation windows to evaluate on: by default those stored in the checkpoint (the ones
    its run validated on; an export folder or an older checkpoint has none: then its training
    corpus's), tokenized with the model's own tokenizer.

    Args:
        source: evaluate on this corpus instead (any form train.py's --data.source takes),
            tokenized with the model's tokenizer; chat data: every conversation of it (no split)
        tokenizer: use this tokenizer instead of the model's own (a tokenizer.json, a folder
            holding one, a Hub id)
        batch_size: rows per validation batch (0: the training run's)
        max_batches: evaluate on at most this many validation batches (0: all of them)
    """

    source: Optional[str] = None
    tokenizer: Optional[str] = None
    batch_size: int = 0
    max_batches: int = 0


SAMPLING = GenerateOptions()
"""modlm-generate's default sampling settings: those of the generation whose routing eval measures."""


@dataclass
class EvalRun:
    """Evaluate a modlm checkpoint under top-k and causal routing: loss, perplexity, bits per byte,
    capacity used, the causal decision against top-k, FLOPs per token and decode speed.

    Args:
        ckpt: checkpoint (.ckpt written by train.py, or an FSDP2 sharded checkpoint folder), a folder
            written by --export, or a Hugging Face Hub id (hub:OWNER/NAME) of one
        json: write every number to this JSON file (flat dotted keys)
        compare: a second checkpoint (e.g. the dense twin) to show side by side
        plot: PNG of the comparison (default: compare.png beside --json, or ./compare.png)
        export: write the model, its tokenizer and data settings to this folder as transformers
            loads it, with a model card of this evaluation's figures: a dense model as a standard
            LlamaForCausalLM (Qwen2ForCausalLM with query/key/value biases) folder, no remote code;
            a MoD or expert model with its code (AutoModelForCausalLM, trust_remote_code=True)
        push_to_hub: upload that folder (or, without --export, one made for it) to this Hugging Face
            Hub repository (OWNER/NAME; created if missing; needs a token: huggingface-cli login)
        data: the validation windows
        prompt_tokens: prompt length of the decode-speed test
        decode_tokens: tokens generated by the decode-speed test
        precision: 32 (fp32) or bf16 (bf16 autocast)
        decision: the causal decision to evaluate with (plain, calibrated or controlled; default:
            the model's own, ModelConfig.causal_decision)
        device: cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)
        seed: random seed (the sampled generation whose routing is measured)
        quiet: no progress bar
        tasks: score CKPT on these lm-evaluation-harness tasks instead (comma-separated task, group or
            tag names, or YAML files): lm-eval's figures, FLOPs per token and the share each routed
            block processed, under harness.* keys
        include_path: with --tasks: a folder of lm-eval task YAML files (local tasks)
        num_fewshot: with --tasks: few-shot examples per prompt (default: each task's own)
        limit: with --tasks: score at most this many documents per task
        batch_size: with --tasks: rows per forward pass
        routing: with --tasks: causal (default: each token routed from itself and the tokens before
            it, as at inference) or topk (the training computation; a continuation's score then
            depends on the continuation's own routing: marked harness.leaking)
    """

    ckpt: str
    json: Optional[str] = None
    compare: Optional[str] = None
    plot: Optional[str] = None
    export: Optional[str] = None
    push_to_hub: Optional[str] = None
    data: DataOptions = field(default_factory=DataOptions)
    prompt_tokens: int = 32
    decode_tokens: int = 64
    precision: Literal["32", "bf16"] = "32"
    decision: Optional[Literal["plain", "calibrated", "controlled"]] = None
    device: Optional[str] = None
    seed: int = 1234
    quiet: bool = False
    tasks: Optional[str] = None
    include_path: Optional[str] = None
    num_fewshot: Optional[int] = None
    limit: Optional[int] = None
    batch_size: int = 8
    routing: Literal["causal", "topk"] = "causal"

    def __post_init__(self):
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"


def parser():
    """jsonargparse's parser of ``EvalRun`` (CKPT positional), with ``--config`` and ``--print_config``."""
    from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

    p = ArgumentParser(prog=os.path.basename(sys.argv[0]) or "eval.py", description=EvalRun.__doc__.split("\n\n")[0])
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file of any of these options")
    p.add_class_arguments(EvalRun, as_positional=True, as_group=False, skip={"quiet"})
    # a plain switch, as in most tools (a bool field would need "--quiet true")
    p.add_argument("--quiet", action=ActionYesNo, default=False, help="no progress bar")
    return p


def parse(argv=None) -> EvalRun:
    """The settings of ``argv`` (``sys.argv[1:]`` when None); a bad flag exits with status 2."""
    values = parse_args(parser(), argv).as_dict()
    values.pop("config", None)
    values.pop("__path__", None)
    return EvalRun(**{**values, "data": DataOptions(**values["data"])})


def build_data(saved: SavedModel, options: DataOptions):
    """The data module of a saved model's validation windows and tokenizer, unless the options
    name others (see ``DataOptions``)."""
    from ..data import ModLMDataModule
    from ..data.corpus import holds_chats
    from ..data.tokenizer import fingerprint

    model, data = saved.model, saved.data
    settings = {**data, "seq_len": data.get("seq_len", model.config.max_seq_len), "num_workers": 0}
    settings["val_source"] = None  # the run's held-out file: its windows travel with the checkpoint
    if saved.tokenizer is not None:  # with the model's chat template beside it
        settings["chat_template"] = None
        settings["tokenizer"] = str(
            unpack(saved.tokenizer, None, data.get("cache_dir"), chat_template=saved.chat_template)
        )
        if saved.validation_windows is not None and options.tokenizer is None:  # windows of its own tokenizer
            settings["source"] = str(
                unpack(
                    saved.tokenizer,
                    saved.validation_windows,
                    data.get("cache_dir"),
                    loss_mask=saved.validation_loss_mask,
                    chat_template=saved.chat_template,
                )
            )
            settings["val_windows"] = len(saved.validation_windows)
    for key in ("source", "tokenizer"):
        if getattr(options, key) is not None:
            settings[key] = getattr(options, key)
    if options.source is not None and holds_chats(options.source, settings.get("text_field", "text")):
        settings.update(val_source=options.source, val_windows=EVERY_WINDOW)  # held out already: all of it
    if options.batch_size:
        settings["batch_size"] = options.batch_size
    dm = ModLMDataModule(**settings)
    if saved.tokenizer is not None:
        want, have = fingerprint(saved.tokenizer), dm.tokenizer_fingerprint  # each hashes a whole tokenizer.json
        if want != have:
            raise EvalError(
                f"tokenizer does not match the model: {dm.tokenizer_file} (fingerprint {have[:12]}) is not the "
                f"tokenizer it was trained with ({want[:12]}, carried in {saved.path}): leave out --data.tokenizer"
            )
    if dm.tokenizer_vocab_size > model.config.vocab_size:  # fewer is fine: a pretrained model's rows to spare
        raise EvalError(
            f"tokenizer does not match the model: {dm.tokenizer_vocab_size} tokens vs the model's "
            f"vocab_size={model.config.vocab_size} (evaluate with the tokenizer it was trained with)"
        )
    return dm


def evaluate_checkpoint(path: str, run: EvalRun) -> tuple[dict, SavedModel, object]:
    """Every number of one checkpoint (flat dotted keys), the saved model and its data module."""
    from tqdm import tqdm

    saved = load_saved(path, run.device)
    if run.decision:
        saved.model = saved.model.reconfigured(causal_decision=run.decision)
    model = saved.model
    dm = build_data(saved, run.data)
    dm.setup("validate")
    batches = list(dm.val_dataloader())[: run.data.max_batches or None]
    if not batches:
        raise EvalError(f"no validation windows for source {dm.source!r} (val_fraction or val_windows is 0?)")
    byte_lengths = token_byte_lengths(dm.tokenizer, model.config.vocab_size)
    autocast = torch.autocast(run.device.split(":")[0], dtype=torch.bfloat16, enabled=run.precision == "bf16")
    result = {
        "checkpoint": str(path),
        "modlm_version": __version__,
        "written_by": saved.written_by,
        "params": model.num_params(),
        "routed_layers": model.config.routed_layers,
    }
    modes = ["topk", "causal"] if model.config.routes_tokens else ["topk"]
    with (
        autocast,
        tqdm(total=len(batches) * len(modes), desc=f"evaluating {Path(path).name}", disable=run.quiet) as bar,
    ):
        for mode in modes:
            figures = evaluate_routing(model, batches, mode, byte_lengths, progress=bar, eot_id=dm.eot_id)
            result.update({f"{mode}.{k}": v for k, v in figures.items()})
    if "causal" not in modes:  # a dense model routes nothing: both modes are the same computation
        result.update({k.replace("topk.", "causal.", 1): v for k, v in list(result.items()) if k.startswith("topk.")})
    inputs = [split_batch(batch)[0] for batch in batches]
    seq_len = inputs[0].shape[1]
    used = [result[f"causal.capacity_used.layer_{i}"] for i in model.config.routed_layers] or None
    passes = [result.get(f"causal.expert_slots.layer_{i}", 0.0) for i in model.config.expert_layers] or None
    steps = [
        result[f"causal.capacity_used.step_{r}"]
        for r in range(model.config.recursions)
        if model.config.routes_recursion
    ] or None
    result["flops_per_token"] = flops_per_token(model, seq_len, used, passes, steps)
    result["flops_per_token_topk"] = flops_per_token(model, seq_len)
    prompt_len = min(run.prompt_tokens, model.config.max_seq_len // 2)  # leave room to generate
    prompt = inputs[0][:1, :prompt_len].to(run.device)
    new_tokens = min(run.decode_tokens, model.config.max_seq_len - prompt_len)
    # serving view: many prompts at once (up to 16 validation rows), tokens/s over all rows
    rows = torch.cat(inputs)[:16, :prompt_len].to(run.device)
    with autocast:
        # routing while sampling as modlm-generate samples by default
        share = generation_share(model, rows, new_tokens, SAMPLING.temperature, SAMPLING.top_k, run.seed)
        result.update({f"generate.{k}": v for k, v in share.items()})
        result["decode_tokens_per_s"] = decode_speed(model, prompt, new_tokens)
        result["decode_batch"] = rows.shape[0]
        result["decode_tokens_per_s_batched"] = decode_throughput(model, rows, new_tokens)["tokens_per_s"]
    return result, saved, dm


def main(argv=None) -> int:
    """Run the command; return the exit status (0 ok, 2 user error: ``run_command``)."""
    return run_command(lambda: execute_run(parse(argv)))


def execute_run(run: EvalRun) -> int:
    torch.manual_seed(run.seed)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if run.tasks is not None:
        from .eval_tasks import execute_tasks

        return execute_tasks(run)
    return execute(run)


def execute(run: EvalRun) -> int:
    result, saved, dm = evaluate_checkpoint(run.ckpt, run)
    print(describe(saved.written_by))
    model = saved.model
    results = [result]
    if run.compare:
        results.append(evaluate_checkpoint(run.compare, run)[0])
    print(table(results))
    if run.compare:
        out = (
            Path(run.plot)
            if run.plot
            else (Path(run.json).with_name("compare.png") if run.json else Path("compare.png"))
        )
        draw_plot(results, out)
        print(f"plot: {out}")
    if run.json:
        payload = result if not run.compare else {**result, "compare": results[1]}
        Path(run.json).parent.mkdir(parents=True, exist_ok=True)
        Path(run.json).write_text(json_lib.dumps(payload, indent=2, default=float) + "\n")
        print(f"json: {run.json}")
    if run.export or run.push_to_hub:
        import tempfile

        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(run.export or scratch)
            write_export(model, dm.tokenizer, saved.data, folder, card=model_card(model.config, saved.trained, result))
            if run.export:
                print(f"exported: {run.export}")
            if run.push_to_hub:
                print(f"pushed: {upload_folder(folder, run.push_to_hub)}")
    return 0
