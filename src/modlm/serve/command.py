"""The serving command line: ``modlm-serve MODEL [--host 127.0.0.1] [--port 8000]``, an OpenAI-compatible server.

    modlm-serve runs/default/checkpoints/last.ckpt                        # http://127.0.0.1:8000/v1
    modlm-serve exported/ --host 0.0.0.0 --api_key "$KEY" --max_batch 32   # reachable from elsewhere, with a key
    MODLM_API_KEY=secret modlm-serve you/my-mod-model                      # a Hub id; the key from the environment

MODEL is anything ``modlm-generate`` reads (a checkpoint, a sharded checkpoint folder, an export
folder, a Hub id); clients name it by ``--model_name`` (default: MODEL as given). Any OpenAI client
talks to it::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything")
    client.completions.create(model="runs/default/checkpoints/last.ckpt", prompt="def f(", max_tokens=32)

Requests are decoded together, joining the running batch between steps (``modlm.serve.engine``).
SIGTERM or Ctrl-C stops accepting requests, lets those in flight finish for ``--shutdown_timeout``
seconds, cancels what is left and exits.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import sys
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from ..cli.usage import parse_args
from ..data.tokenizer import end_of_text_id
from ..model.errors import UserError, run_command
from ..saved import load_saved

API_KEY_ENV = "MODLM_API_KEY"
"""The environment variable read for the API key when ``--api_key`` is not given."""


@dataclass
class ServeOptions:
    """How to serve.

    Args:
        host: address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface)
        port: TCP port to listen on
        api_key: require 'Authorization: Bearer KEY' on every /v1 request (default: the MODLM_API_KEY
            environment variable; neither: no key)
        model_name: the name clients send as 'model' (default: MODEL as given)
        max_batch: requests decoded together (rows of the running batch); more wait in line
        max_queue: requests that may wait for a row; one more is answered 503
        prefill_chunk: prompt tokens prefilled between two decoding steps of the running requests
            (0: a whole prompt at once)
        max_body_bytes: the largest request body accepted (413 beyond)
        shutdown_timeout: seconds the requests in flight get to finish after SIGTERM or Ctrl-C
        device: cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)
        threads: CPU threads torch computes with (default: torch's own choice; on a shared machine 1 is
            often faster)
        precision: 32 (fp32) or bf16 (bf16 autocast)
        log_level: the server's log level (info logs every request)
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: Optional[str] = None
    model_name: Optional[str] = None
    max_batch: int = 16
    max_queue: int = 64
    prefill_chunk: int = 32
    max_body_bytes: int = 1 << 20
    shutdown_timeout: float = 30.0
    device: Optional[str] = None
    threads: Optional[int] = None
    precision: Literal["32", "bf16"] = "32"
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"


def parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(
        prog=os.path.basename(sys.argv[0]) or "modlm-serve",
        description="Serve a trained modlm model behind an OpenAI-compatible API.",
    )
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file of any of these options")
    p.add_argument("model", help="checkpoint (.ckpt), sharded checkpoint folder, export folder, or Hub id")
    p.add_class_arguments(ServeOptions, as_group=False)
    return p


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check(options: ServeOptions) -> None:
    for name in ("max_batch", "max_queue", "max_body_bytes"):
        if getattr(options, name) < 1:
            raise UserError(f"--{name}={getattr(options, name)} is invalid: must be at least 1")
    if options.prefill_chunk < 0:
        raise UserError(f"--prefill_chunk={options.prefill_chunk} is invalid: must be >= 0 (0: whole prompts)")
    if options.threads is not None and options.threads < 1:
        raise UserError(f"--threads={options.threads} is invalid: must be at least 1")
    if not 0 < options.port < 65536:
        raise UserError(f"--port={options.port} is invalid: must be in 1..65535")


def build(model_path: str, options: ServeOptions, api_key: Optional[str]):
    """The app serving ``model_path``: the model loaded, its engine made (not started)."""
    from ..data.chat import ChatEncoder
    from .app import create_app
    from .completions import Completions
    from .engine import Engine

    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if options.threads:
        torch.set_num_threads(options.threads)
    saved = load_saved(model_path, device)
    tokenizer = saved.tokenizer
    if tokenizer is None:
        raise UserError(
            f"{model_path} carries no tokenizer (its run's data module was not modlm's): serving needs the model's "
            "own tokenizer"
        )
    config = saved.model.config
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise UserError(
            f"{model_path}: its tokenizer has {tokenizer.get_vocab_size()} tokens, the model {config.vocab_size}"
        )
    chat = ChatEncoder(tokenizer.to_str(), saved.chat_template)  # a template that cannot serve is refused here
    if saved.chat_template is None:
        print(
            "modlm: the model has no chat template: /v1/chat/completions renders with modlm's default "
            "(docs/fine-tuning.md)",
            file=sys.stderr,
        )
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=options.precision == "bf16")
    engine = Engine(
        saved.model,
        max_batch=options.max_batch,
        max_queue=options.max_queue,
        prefill_chunk=options.prefill_chunk,
        autocast=autocast,
    )
    completions = Completions(
        engine, tokenizer, options.model_name or model_path, config.max_seq_len, config.vocab_size
    )
    app = create_app(
        completions, chat, end_of_text_id(tokenizer), api_key=api_key, max_body_bytes=options.max_body_bytes
    )
    return app, engine, saved


def start(argv):
    """The parsed command line and the server's parts, once every input is checked (``UserError`` if not)."""
    args = parse_args(parser(), argv)
    options = ServeOptions(**{k: v for k, v in args.as_dict().items() if k in ServeOptions.__dataclass_fields__})
    check(options)
    api_key = options.api_key or os.environ.get(API_KEY_ENV) or None
    if api_key is None and not is_loopback(options.host):  # said first, before the model loads
        print(
            f"modlm: warning: listening on {options.host} with no API key: anyone who can reach this port "
            f"can use the model (set --api_key or {API_KEY_ENV})",
            file=sys.stderr,
        )
    return (*build(args.model, options, api_key), args, options)


def main(argv=None) -> int:
    """Serve until SIGTERM or Ctrl-C; 0 then, 2 on a user error (``run_command``)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run_command(lambda: serve(*start(argv)))


def serve(app, engine, saved, args, options: ServeOptions) -> int:
    """Run the server ``start`` built until SIGTERM or Ctrl-C, the requests in flight drained."""
    import uvicorn

    config = saved.model.config
    kind = f"{len(saved.model.routers())} routed blocks" if saved.model.routers() else "dense"
    name = options.model_name or args.model
    print(
        f"modlm: serving {name} ({kind}, context {config.max_seq_len}) at http://{options.host}:{options.port}/v1; "
        f"{options.max_batch} requests decoded together, {options.max_queue} may wait",
        file=sys.stderr,
    )

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM, Ctrl-C: the requests in flight get the grace period
            engine.drain(options.shutdown_timeout)
            super().handle_exit(sig, frame)

    # uvicorn's own limit only backs the engine's up: past the grace period the engine ends every request
    # with an error its client reads, and the connections close by themselves
    server = Server(
        uvicorn.Config(
            app,
            host=options.host,
            port=options.port,
            log_level=options.log_level,
            timeout_graceful_shutdown=options.shutdown_timeout + 10,
        )
    )
    # uvicorn re-raises the signal that stopped it once it has shut down: as KeyboardInterrupt, an exit status of 0
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
