"""The generation command line: ``modlm-generate MODEL [PROMPT ...]``, sampling with no evaluation first.

    modlm-generate runs/default/checkpoints/last.ckpt "def fibonacci(n):"      # streamed to stdout
    modlm-generate exported/ --prompt_file prompts.txt --temperature 0         # one prompt a line, batched
    echo "import os" | modlm-generate you/my-mod-model                          # stdin; a Hub id
    modlm-generate runs/default/checkpoints/last.ckpt --interactive            # a prompt, its continuation, again
    modlm-generate runs/sft/checkpoints/last.ckpt "What does textwrap.dedent do?" --chat   # an answer
    modlm-generate runs/sft/checkpoints/last.ckpt --chat --interactive         # a conversation, turn by turn

MODEL is anything modlm saves: a checkpoint written by ``train.py`` (it carries its tokenizer), an
FSDP2 sharded checkpoint folder, a folder written by ``eval.py --export``, or a Hugging Face Hub id
of one (``hub:OWNER/NAME`` or ``OWNER/NAME``). Prompts come from the command line, else from
``--prompt_file`` (one prompt a line, generated together), else from standard input. A single
continuation is streamed as it is generated; several are printed as each batch finishes,
separated by a line of dashes. Generation stops at ``--max_new_tokens``, at the tokenizer's
end-of-text token, or at a stop string (``--stop``, repeatable; the stop string is not printed).

The model decodes with causal routing and its KV caches, as at inference. ``--routing topk``
recomputes the whole sequence with top-k routing for every new token instead (k growing with the
sequence; no cache): what the training computation would generate, slow and not causal over the
prompt. A base language model has no chat template: ``--interactive`` continues each prompt on its
own, with no memory of the earlier ones.

``--chat`` makes each prompt a user's message (after ``--system``'s, if given), rendered with the model's
chat template (modlm's default where it has none, and the command says so) up to the assistant's header,
and prints the model's answer alone, which ends at the template's end-of-turn token. With
``--interactive`` the conversation goes on: each answer joins the messages the next prompt is rendered with.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

from ..data.tokenizer import end_of_text_id
from ..model.errors import UserError, run_command
from ..model.version import describe
from ..saved import load_saved
from .usage import parse_args


@dataclass
class GenerateOptions:
    """How to sample.

    Args:
        prompt_file: read the prompts from this file, one a line (batched)
        max_new_tokens: tokens to generate per continuation (fewer if the model's context ends first)
        temperature: softmax temperature (0: greedy)
        top_k: sample among the k most likely tokens (none: all)
        top_p: sample within this cumulative probability (nucleus sampling; none: off)
        num_samples: continuations per prompt
        seed: random seed of the sampling
        stop: stop a continuation where it produces this text (repeatable: --stop A --stop B)
        routing: causal (inference routing, KV cache) or topk (the training computation over the
            sequence so far, recomputed every token)
        device: cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)
        precision: 32 (fp32) or bf16 (bf16 autocast)
        interactive: read a prompt, stream its continuation, and loop until end of input
        batch_size: prompts generated together (from a file or stdin)
        chat: each prompt is a user's message, rendered with the model's chat template; print the answer
        system: with --chat, a system message before the first prompt
    """

    prompt_file: Optional[str] = None
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: Optional[int] = 50
    top_p: Optional[float] = None
    num_samples: int = 1
    seed: int = 1234
    stop: list[str] = field(default_factory=list)
    routing: Literal["causal", "topk"] = "causal"
    device: Optional[str] = None
    precision: Literal["32", "bf16"] = "32"
    interactive: bool = False
    batch_size: int = 16
    chat: bool = False
    system: Optional[str] = None


def parser():
    from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

    p = ArgumentParser(
        prog=os.path.basename(sys.argv[0]) or "modlm-generate",
        description="Sample continuations from a trained modlm model (no evaluation first).",
    )
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file of any of these options")
    p.add_argument("model", help="checkpoint (.ckpt), sharded checkpoint folder, export folder, or Hub id")
    p.add_argument("prompts", nargs="*", default=[], help="prompts (default: --prompt_file, else standard input)")
    p.add_class_arguments(GenerateOptions, as_group=False, skip={"interactive", "stop", "chat"})
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop a continuation where it produces TEXT (repeatable: --stop A --stop B)",
    )
    p.add_argument(
        "--interactive",
        action=ActionYesNo,
        default=False,
        help="read a prompt, stream its continuation, and loop until end of input",
    )
    p.add_argument(
        "--chat",
        action="store_true",  # a switch, taking no value
        help="each prompt is a user's message, rendered with the model's chat template; print the answer "
        "(with --interactive, a conversation)",
    )
    return p


class Streamer:
    """Prints one continuation as its tokens arrive (whole characters only) and ends it at a stop
    string: the ``on_tokens`` callback of ``generate`` for a batch of one row."""

    def __init__(self, tokenizer, stops: list[str], out=None):
        self.tokenizer, self.stops, self.out = tokenizer, stops, out or sys.stdout
        self.ids: list[int] = []
        self.printed = 0

    def text(self) -> str:
        return self.tokenizer.decode(self.ids)

    def __call__(self, tokens: torch.Tensor) -> Optional[torch.Tensor]:
        self.ids.append(int(tokens[0]))
        text = self.text()
        cut = min((text.find(s) for s in self.stops if s in text), default=-1)
        shown = text[:cut] if cut >= 0 else text.rstrip("\ufffd")  # hold back a character not complete yet
        if cut < 0:  # a stop string may be arriving: hold back what could be its start
            shown = shown[
                : len(shown)
                - max((k for s in self.stops for k in range(len(s), 0, -1) if shown.endswith(s[:k])), default=0)
            ]
        if len(shown) > self.printed:
            self.out.write(shown[self.printed :])
            self.out.flush()
            self.printed = len(shown)
        return torch.tensor([cut >= 0])


def cut_at_stop(text: str, stops: list[str]) -> str:
    cuts = [text.find(s) for s in stops if s in text]
    return text[: min(cuts)] if cuts else text


class Prompts:
    """How prompts become token ids, and which token ends a generation: the text itself (continued until the
    end-of-text token), or with ``--chat`` a user's message rendered with the model's chat template (answered
    until its end-of-turn token)."""

    def __init__(self, saved, options: GenerateOptions):
        self.tokenizer, self.chat = saved.tokenizer, None
        self.stop_id = end_of_text_id(saved.tokenizer)
        if options.chat:
            from ..data.chat import ChatEncoder

            if saved.chat_template is None:
                print(
                    "modlm: the model has no chat template: prompts are rendered with modlm's default "
                    "(docs/fine-tuning.md)",
                    file=sys.stderr,
                )
            self.chat = ChatEncoder(saved.tokenizer.to_str(), saved.chat_template)
            self.stop_id = self.chat.end_of_turn_id
        self.system = [{"role": "system", "content": options.system}] if options.system else []

    def ids(self, prompt) -> list[int]:
        """The token ids of a prompt: a text, or with ``--chat`` a user's message or the messages so far."""
        if self.chat is None:
            return self.tokenizer.encode(prompt).ids
        messages = prompt if isinstance(prompt, list) else [*self.system, {"role": "user", "content": prompt}]
        return self.chat.encode(messages, add_generation_prompt=True)[0]


def continuations(
    saved, prompts: list, options: GenerateOptions, stream: bool, how: Optional[Prompts] = None
) -> list[str]:
    """Each prompt's continuation text (``num_samples`` each, in order), streamed to stdout when
    ``stream`` (one prompt, one sample); ``how`` turns prompts into ids (default: as text)."""
    model, tokenizer = saved.model, saved.tokenizer
    how = how or Prompts(saved, options)
    eot = how.stop_id
    ids = [how.ids(p) for p in prompts for _ in range(options.num_samples)]
    if any(not i for i in ids):
        raise UserError("a prompt is empty (it encodes to no token)")
    longest = max(map(len, ids))
    model.check_length(longest, f"a prompt of {longest} tokens")
    new = min(options.max_new_tokens, model.config.max_seq_len - longest)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(options.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=options.precision == "bf16")
    texts = []
    for start in range(0, len(ids), options.batch_size):
        batch = ids[start : start + options.batch_size]
        watch = Streamer(tokenizer, options.stop) if stream else StopStrings(tokenizer, options.stop, len(batch))
        with autocast:
            out = model.generate(
                batch,
                new,
                temperature=options.temperature,
                top_k=options.top_k,
                top_p=options.top_p,
                eot_id=eot,
                generator=generator,
                on_tokens=watch,
                routing=options.routing,
            )
        for prompt_ids, row in zip(batch, out):
            gen = row[len(prompt_ids) :].tolist()
            texts.append(cut_at_stop(tokenizer.decode([t for t in gen if t != eot]), options.stop))
    return texts


class StopStrings:
    """The rows of a batch that have produced a stop string: the ``on_tokens`` callback of
    ``generate`` for a batch printed when it finishes (does nothing without stop strings)."""

    def __init__(self, tokenizer, stops: list[str], rows: int):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[list[int]] = [[] for _ in range(rows)]

    def __call__(self, tokens: torch.Tensor) -> Optional[torch.Tensor]:
        if not self.stops:
            return None
        for ids, token in zip(self.ids, tokens.tolist()):
            ids.append(token)
        return torch.tensor([any(s in self.tokenizer.decode(ids) for s in self.stops) for ids in self.ids])


def read_prompts(args) -> list[str]:
    if args.prompts:
        return list(args.prompts)
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompts = [line.rstrip("\n") for line in f if line.strip()]
        except OSError as err:
            raise UserError(f"cannot read --prompt_file {args.prompt_file}: {err.strerror}") from None
        if not prompts:
            raise UserError(f"--prompt_file {args.prompt_file} holds no prompt")
        return prompts
    if sys.stdin.isatty():
        raise UserError("no prompt: give one on the command line, --prompt_file FILE, or pipe them to standard input")
    prompts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise UserError("no prompt on standard input")
    return prompts


def lines_typed():
    """The non-blank lines typed after a ``> `` prompt, until Ctrl-D."""
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if line.strip():
            yield line


def interactive(saved, options: GenerateOptions) -> None:
    if options.chat:
        return conversation(saved, options)
    print(
        "modlm: interactive generation. A base language model continues text: it has no chat template, and each "
        "prompt is continued on its own (--chat: a conversation). End with Ctrl-D.",
        file=sys.stderr,
    )
    for prompt in lines_typed():
        sys.stdout.write(prompt)
        continuations(saved, [prompt], GenerateOptions(**{**options.__dict__, "num_samples": 1}), stream=True)
        sys.stdout.write("\n")
        sys.stdout.flush()


def conversation(saved, options: GenerateOptions) -> None:
    """``--chat --interactive``: a user's message, the model's answer streamed, and on, every turn rendered
    with the messages before it."""
    how = Prompts(saved, options)
    print(
        "modlm: chat. Each line is your message; the model answers with the conversation so far. End with Ctrl-D.",
        file=sys.stderr,
    )
    messages = list(how.system)
    single = GenerateOptions(**{**options.__dict__, "num_samples": 1})
    for prompt in lines_typed():
        messages.append({"role": "user", "content": prompt})
        (answer,) = continuations(saved, [list(messages)], single, stream=True, how=how)
        messages.append({"role": "assistant", "content": answer})
        sys.stdout.write("\n")
        sys.stdout.flush()


def main(argv=None) -> int:
    """Run the command; 0 ok, 2 user error (``run_command``)."""
    return run_command(lambda: execute(parse_args(parser(), argv)))


def execute(args) -> int:
    values = {k: v for k, v in args.as_dict().items() if k in GenerateOptions.__dataclass_fields__}
    options = GenerateOptions(**values)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    saved = load_saved(args.model, device)
    if saved.tokenizer is None:
        raise UserError(
            f"{args.model} carries no tokenizer (its run's data module was not modlm's): generating needs the "
            "model's own tokenizer"
        )
    if saved.tokenizer.get_vocab_size() > saved.model.config.vocab_size:
        raise UserError(
            f"{args.model}: its tokenizer has {saved.tokenizer.get_vocab_size()} tokens, the model "
            f"{saved.model.config.vocab_size}"
        )
    if options.interactive:
        print(describe(saved.written_by), file=sys.stderr)  # stdout is the text alone
        interactive(saved, options)
        return 0
    prompts = read_prompts(args)
    stream = len(prompts) == 1 and options.num_samples == 1
    shown = "" if options.chat else None  # a chat prints the answer alone
    if stream:
        sys.stdout.write(prompts[0] if shown is None else shown)
        continuations(saved, prompts, options, stream=True)
        sys.stdout.write("\n")
    else:
        texts = continuations(saved, prompts, options, stream=False)
        for n, (prompt, text) in enumerate(zip([p for p in prompts for _ in range(options.num_samples)], texts)):
            if n:
                sys.stdout.write("-" * 40 + "\n")
            sys.stdout.write((prompt if shown is None else shown) + text + "\n")
    sys.stdout.flush()
    print(describe(saved.written_by), file=sys.stderr)  # after the text: an error before it stays one line
    return 0


if __name__ == "__main__":
    sys.exit(main())
