"""A modlm model as lm-evaluation-harness sees a language model (``lm_eval.api.model.TemplateLM``):
``loglikelihood``, ``loglikelihood_rolling`` and ``generate_until``, batched, over a
``MoDTransformer`` and its ``tokenizers.Tokenizer``.

Text becomes tokens as lm-eval's own ``hf`` model makes them (the tokenizer's special tokens added,
a context's trailing spaces moved to the continuation, an empty context replaced by the start-of-
text token, or end-of-text where the tokenizer has none; rolling windows of ``max_seq_len`` from
``lm_eval.utils``), so a dense model scores exactly what lm-eval scores on its transformers export.
Written here rather than taken from ``HFLM`` because a routed model needs what that class cannot
give: the routing mode (``modes.py``: causal by default, top-k batched by length and marked as
leaking), generation through modlm's routed KV cache, and the tally of what each routed block
processed (``usage.py``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from ...model.errors import UserError
from ...model.hf_format import special_tokens
from .modes import mode_of
from .usage import Usage, pass_counts

log = logging.getLogger(__name__)


@dataclass
class Row:
    """One scored sequence: its tokens (context then continuation) and how many end it are scored."""

    tokens: list[int]
    n_scored: int
    task: Optional[str]


class ModLMHarness(TemplateLM):
    """lm-eval's view of a ``MoDTransformer``; pass it to ``lm_eval.simple_evaluate(model=...)``.

    Args:
        model: the model (its device and dtype are used as they are; put it in eval mode first or not:
            it is set to eval mode here)
        tokenizer: its ``tokenizers.Tokenizer``; its end-of-text token ends a generation, its
            start-of-text token (when it has one) stands for an empty context
        routing: ``causal`` (default) or ``topk`` (the training computation: scores leak the
            continuation; see ``modes.py``); a model that routes nothing runs causally either way
        batch_size: rows per forward pass (top-k: rows of one length only)
        max_gen_toks: tokens ``generate_until`` makes when a task sets no limit
        progress: show a progress bar per request type
    """

    def __init__(
        self,
        model,
        tokenizer,
        routing: str = "causal",
        batch_size: int = 8,
        max_gen_toks: int = 256,
        progress: bool = False,
    ):
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.mode = mode_of(routing, model.config)
        self.batch_size = int(batch_size)
        self._max_gen_toks = int(max_gen_toks)
        self.progress = progress
        _, self._eot_id, self._bos, bos_id = special_tokens(tokenizer.to_str())
        self._prefix_id = self._eot_id if bos_id is None else bos_id
        self.usage = Usage(model.config, self.mode.name)
        self._warned_sampling = False

    # --- what TemplateLM asks of a model -------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._eot_id

    @property
    def prefix_token_id(self) -> int:
        return self._prefix_id

    @property
    def max_length(self) -> int:
        return self.model.config.max_seq_len

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self) -> torch.device:
        return self.model.embed.weight.device

    @property
    def tokenizer_name(self) -> str:
        return "modlm"

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        if add_special_tokens is None:  # a string that already starts with the start-of-text token gets no second one
            add_special_tokens = not (self._bos is not None and string.startswith(self._bos))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens).ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # --- log-likelihoods -----------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), whether greedy decoding gives the continuation)`` per request."""
        rows = []
        for request in requests:
            context, continuation = request.args
            if context:
                ctx, cont = self._encode_pair(context, continuation)
            else:  # nothing to condition on: the start-of-text token (unless the continuation begins with it)
                cont = self.tok_encode(continuation, add_special_tokens=False)
                ctx, cont = (cont[:1], cont[1:]) if cont[:1] == [self._prefix_id] else ([self._prefix_id], cont)
            rows.append(Row(ctx + cont, len(cont), request.task_name))
        return self._score(rows, "loglikelihood", disable_tqdm)

    def _loglikelihood_tokens(self, requests, **kwargs) -> list[tuple[float, bool]]:
        return self._score([Row(ctx + cont, len(cont), None) for _, ctx, cont in requests], "loglikelihood")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole string, every token predicted once, in windows of
        ``max_seq_len`` tokens (the first conditioned on the start-of-text token)."""
        rows, owners = [], []
        for n, request in enumerate(requests):
            (string,) = request.args
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self._prefix_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for ctx, cont in map(make_disjoint_window, windows):
                rows.append(Row(ctx + cont, len(cont), request.task_name))
                owners.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owners, self._score(rows, "loglikelihood_rolling", disable_tqdm)):
            totals[n] += logprob
        return totals

    @torch.no_grad()
    def _score(self, rows: list[Row], request_type: str, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Log-probability of each row's scored tokens and whether each is the argmax, in batches of
        the mode; the input is the last ``max_seq_len`` tokens before the final one."""
        inputs = [row.tokens[-(self.max_length + 1) :][:-1] for row in rows]
        for row in rows:
            if row.n_scored > self.max_length:
                raise UserError(
                    f"a continuation of {row.n_scored} tokens (task {row.task}) exceeds the model's "
                    f"max_seq_len={self.max_length}"
                )
        results: list[Optional[tuple[float, bool]]] = [None] * len(rows)
        batches = self.mode.batches([len(x) for x in inputs], self.batch_size)
        for batch in tqdm(batches, desc=request_type, disable=disable_tqdm or not self.progress):
            lengths = [len(inputs[i]) for i in batch]
            ids = torch.full((len(batch), max(lengths)), self._eot_id, dtype=torch.long)
            for j, i in enumerate(batch):
                ids[j, : lengths[j]] = torch.tensor(inputs[i])
            out = self.model(ids.to(self.device), routing=self.mode.routing)
            logprobs = F.log_softmax(out.logits.float(), dim=-1)
            for j, i in enumerate(batch):
                n, k = lengths[j], rows[i].n_scored
                target = torch.tensor(rows[i].tokens[-k:], device=logprobs.device)
                scored = logprobs[j, n - k : n]
                results[i] = (float(scored.gather(1, target[:, None]).sum()), bool((scored.argmax(-1) == target).all()))
            for i, n, counts in zip(batch, lengths, pass_counts(self.model.config, out, lengths)):
                self.usage.add(rows[i].task, request_type, n, counts)
        return results

    # --- generation ----------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations up to the first stop string of the request (cut there), the end-of-text
        token or the request's token limit, whichever comes first."""
        groups: dict[str, list[int]] = {}
        for n, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(n)
        texts: list[str] = [""] * len(requests)
        for members in groups.values():
            options = normalize_gen_kwargs(requests[members[0]].args[1], self.max_gen_toks)
            if options.get("do_sample") and not self._warned_sampling:
                log.warning("a task asks for sampling; modlm's harness decodes greedily")
                self._warned_sampling = True
            until = [s for s in options["until"] if s]
            max_new = int(options["max_gen_toks"])
            room = max(1, self.max_length - max_new)  # the context's last tokens, leaving room to generate
            prompts = [self.tok_encode(requests[n].args[0])[-room:] for n in members]
            batches = self.mode.batches([len(p) for p in prompts], self.batch_size)
            for batch in tqdm(batches, desc="generate_until", disable=disable_tqdm or not self.progress):
                chosen = [prompts[i] for i in batch]
                made = self._generate(
                    chosen,
                    min(max_new, self.max_length - max(map(len, chosen))),
                    until,
                    [requests[members[i]].task_name for i in batch],
                )
                for i, text in zip(batch, made):
                    texts[members[i]] = text
        return texts

    def _generate(self, prompts: list[list[int]], new_tokens: int, until: list[str], tasks: list) -> list[str]:
        """Greedy continuations of a batch of prompts, each cut at its first stop string."""
        made: list[list[int]] = [[] for _ in prompts]
        # a stop string of n bytes lies within the last n + 1 tokens (a byte-level token holds at least one byte)
        tail = max((len(s.encode()) for s in until), default=0) + 1

        def stop_rows(tokens: torch.Tensor) -> Optional[torch.Tensor]:
            if not until:  # nothing to look for: no host read per token
                return None
            for row, token in zip(made, tokens.tolist()):
                row.append(token)
            return torch.tensor([any(s in self.tok_decode(row[-tail:]) for s in until) for row in made])

        outputs, fed, counts = self.mode.generate(self.model, prompts, new_tokens, self._eot_id, stop_rows)
        for task, n, count in zip(tasks, fed, counts):
            self.usage.add(task, "generate_until", n, count)
        texts = [self.tok_decode(out[len(prompt) :]) for out, prompt in zip(outputs, prompts)]
        return [postprocess_generated_text(text, until, None) for text in texts]
