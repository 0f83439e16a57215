"""One model, many requests: requests wait in a queue and one thread decodes them in batches.

A batch starts with the requests waiting (those on the same adapter, up to ``max_batch`` rows: a
request with ``n`` choices is ``n`` rows) and decodes them together, one token per row per step,
left-padded, on one KV cache. Continuous batching: between two steps, requests that have arrived
on the batch's adapter join it (they are prefilled together, and their cache rows are merged
into the running cache, both sides left-padded to one width), so a newcomer waits for one step
and its own prefill, not for the longest answer in the batch. A row that ends (stop token, stop
text, its limit) or whose client has gone leaves the cache at the next step, so the batch only
ever holds live work; a queued request whose client is gone never runs.

With ``join=False`` the worker batches in waves instead (requests that arrive while a batch
decodes wait for it to end): the baseline that benchmarks/bench_serve.py compares against, and
what any model whose cache is not a plain ``DynamicCache`` gets (sliding-window or linear
attention layers, a remote-code model's own cache), since only plain key/value rows can be
padded and stacked.

The decoding loop is our own rather than ``model.generate``: per-row sampling settings (seed,
logit bias, presence and frequency penalties, stop texts, log-probabilities) are what the OpenAI
API asks for, and ``generate`` applies one setting to the whole batch.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from tuneforge.chat.api import ApiError
from tuneforge.data.templates import Template, stop_token_ids
from tuneforge.models.generate import Reply, autocast_for, prompt_ids

BASE = "__base__"  # the adapter name that means "the adapter switched off"


@dataclass(frozen=True)
class Params:
    """How one request decodes: the OpenAI sampling fields, checked already."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stops: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass
class Job:
    """A request in the queue. ``emit`` receives, in order: ("start",), then per choice
    ("piece", index, text, logprobs) and ("end", index, Reply, finish_reason), or ("error", exc);
    finish_reason is "stop", "length" or "cancelled"."""

    prompt: list[int]
    params: Params
    question: str  # the last user message or the prompt: for logs and tests
    messages: list[dict] | None = None
    n: int = 1
    adapter: str | None = None  # None: the model as loaded; BASE: adapter off
    sink: Callable[[tuple], None] = lambda event: None
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.monotonic)

    def emit(self, event: tuple) -> None:
        self.sink(event)


@dataclass
class Stats:
    """What /metrics reports."""

    requests: int = 0
    dropped: int = 0  # queued requests whose client left before they ran
    generated: int = 0  # tokens
    running: int = 0  # rows in the current step
    busy_s: float = 0.0  # time spent decoding
    batch_sizes: collections.deque = field(default_factory=lambda: collections.deque(maxlen=100_000))


class _Row:
    """One choice of one request while it decodes."""

    def __init__(self, job: Job, index: int, tokenizer: Any, stop_ids: set[int], vocab: int) -> None:
        self.job, self.index, self.tokenizer, self.stop_ids = job, index, tokenizer, stop_ids
        p = job.params
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already emitted
        self.pending: list[dict] = []  # log-probabilities of tokens whose text is not emitted yet
        self.done = False
        self.holdback = max((len(s) for s in p.stops), default=1) - 1  # a stop text may be forming
        self.gen = None
        if p.temperature > 0:
            self.gen = torch.Generator()
            # the same seed and settings give the same text; each choice its own stream
            self.gen.manual_seed(p.seed + index if p.seed is not None else int(torch.seed()) + index)
        self.bias = None
        if p.logit_bias:
            self.bias = torch.zeros(vocab)
            for token, b in p.logit_bias:
                if 0 <= token < vocab:
                    self.bias[token] = b
        self.counts = torch.zeros(vocab) if p.presence_penalty or p.frequency_penalty else None

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.job.params
        if self.bias is not None:
            logits = logits + self.bias
        if self.counts is not None:
            logits = logits - p.frequency_penalty * self.counts - p.presence_penalty * (self.counts > 0)
        return logits

    def choose(self, logits: torch.Tensor) -> int:
        p = self.job.params
        logits = self.adjust(logits)
        if self.gen is None:
            token = int(logits.argmax())
        else:
            probs = torch.softmax(logits / p.temperature, -1)
            if p.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                outside = sorted_p.cumsum(-1) - sorted_p > p.top_p  # keep the smallest set over top_p
                probs = probs.scatter(0, order, sorted_p.masked_fill(outside, 0.0))
            token = int(torch.multinomial(probs, 1, generator=self.gen))
        if p.logprobs:
            self.pending.append(self._logprob(logits, token))
        return token

    def _logprob(self, logits: torch.Tensor, token: int) -> dict:
        lp = torch.log_softmax(logits, -1)
        entry = self._entry(token, float(lp[token]))
        if self.job.params.top_logprobs:
            values, idx = lp.topk(self.job.params.top_logprobs)
            entry["top_logprobs"] = [self._entry(int(i), float(v)) for v, i in zip(values, idx, strict=True)]
        else:
            entry["top_logprobs"] = []
        return entry

    def _entry(self, token: int, logprob: float) -> dict:
        text = self.tokenizer.decode([token])
        return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode("utf-8", "replace"))}

    def push(self, token: int) -> None:
        """Take the token chosen for this row: emit the text it completes, or end the row."""
        if token in self.stop_ids:
            return self._end(self._text(), "stop", finished=True)
        self.ids.append(token)
        if self.counts is not None:
            self.counts[token] += 1
        text = self._text()
        for stop in self.job.params.stops:
            at = text.find(stop, max(0, self.sent - len(stop)))
            if at >= 0:
                return self._end(text[:at], "stop", finished=True)
        if len(self.ids) >= self.job.params.max_tokens:
            return self._end(text, "length", finished=False)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return None
        self._emit(text[:len(text) - self.holdback] if self.holdback else text)
        return None

    def cancel(self) -> None:
        self._end(self._text()[:self.sent], "cancelled", finished=False)

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _emit(self, upto: str) -> None:
        if len(upto) > self.sent or (self.pending and len(upto) >= self.sent):
            self.job.emit(("piece", self.index, upto[self.sent:], self.pending))
            self.sent, self.pending = max(self.sent, len(upto)), []

    def _end(self, text: str, reason: str, finished: bool) -> None:
        self._emit(text)
        self.done = True
        self.job.emit(("end", self.index, Reply(text.strip(), len(self.job.prompt), len(self.ids), finished),
                       reason))


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """T with zeros before it along DIM, to WIDTH."""
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def mergeable(cache: Any) -> bool:
    """Whether CACHE's rows can be padded and stacked with another's: every layer a plain
    ``DynamicLayer`` of [batch, heads, seq, dim] keys and values (a sliding-window layer keeps a
    window per row and counts tokens for the whole batch; a linear-attention layer has no rows
    of positions to pad)."""
    return isinstance(cache, DynamicCache) and bool(cache.layers) and all(
        type(layer) is DynamicLayer and layer.is_initialized for layer in cache.layers)


@dataclass
class _Batch:
    """The rows decoding together: their KV cache, attention mask (0 = left padding), the
    position of each row's next token, and the logits each row chooses its next token from."""

    rows: list[_Row]
    cache: Any
    mask: torch.Tensor
    nxt: torch.Tensor
    logits: torch.Tensor

    def keep(self, keep: list[int]) -> None:
        """Only rows KEEP stay (in the cache too); padding no row needs any more is dropped."""
        if len(keep) < len(self.rows):
            index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
            self.cache.batch_select_indices(index)
            self.mask, self.nxt, self.logits = self.mask[index], self.nxt[index], self.logits[index]
            self.rows = [self.rows[i] for i in keep]
        if self.rows and mergeable(self.cache):
            unused = int((self.mask.sum(0) == 0).long().cumprod(0).sum())  # leading all-padding columns
            if unused:
                for layer in self.cache.layers:
                    layer.keys, layer.values = layer.keys[..., unused:, :], layer.values[..., unused:, :]
                self.mask = self.mask[:, unused:]

    def merge(self, other: _Batch) -> None:
        """OTHER's rows join these, after them. Both caches are left-padded to the wider one, so
        every row's tokens stay in order and end at the last column; the masks hide the padding
        and the positions are each row's own, so a row attends to exactly what it did alone."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width, 2), _left_pad(theirs.keys, width, 2)])
            mine.values = torch.cat([_left_pad(mine.values, width, 2), _left_pad(theirs.values, width, 2)])
        self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(other.mask, width, 1)])
        self.nxt = torch.cat([self.nxt, other.nxt])
        self.logits = torch.cat([self.logits, other.logits])
        self.rows += other.rows


class Worker:
    def __init__(self, model: Any, tokenizer: Any, template: Template, max_prompt_tokens: int,
                 max_queue: int = 64, max_batch: int = 8, join: bool = True) -> None:
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.max_prompt_tokens, self.max_queue, self.max_batch = max_prompt_tokens, max_queue, max_batch
        self.join = join  # False: waves (requests arriving during a batch wait for it to end)
        self.stop_ids = set(stop_token_ids(template, tokenizer))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.stop_ids, default=0)
        self.waiting: collections.deque[Job] = collections.deque()
        self.cond = threading.Condition()
        self.tokenize_lock = threading.Lock()  # tokenizers are not safe across threads
        self.stats = Stats()
        self.vocab = model.get_output_embeddings().weight.shape[0]
        self.device = next(model.parameters()).device
        # transformers 5 renamed past_key_values to cache; older and remote-code models keep the old name
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = inspect.signature(base.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        # a prefill needs the logits of each row's last position only, not a vocabulary's worth for
        # every prompt token (8 prompts of 40 tokens: 63 MB; and the vocabulary projection is about
        # a fifth of SmolLM2-135M's multiply-adds per token, counted from its shapes)
        self.last_logits = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        threading.Thread(target=self._serve, name="tuneforge-generate", daemon=True).start()

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        with self.tokenize_lock:
            return prompt_ids(self.tokenizer, self.template, messages)

    def text_prompt(self, text: str) -> list[int]:
        with self.tokenize_lock:
            return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def queued(self) -> int:
        """Requests waiting whose client is still there."""
        with self.cond:
            return sum(not j.cancelled.is_set() for j in self.waiting)

    def submit(self, job: Job) -> Job:
        if len(job.prompt) > self.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(job.prompt)} tokens; this server takes at most "
                                f"{self.max_prompt_tokens} (--max-prompt-tokens)", "messages")
        with self.cond:
            self._drop_cancelled()
            if len(self.waiting) >= self.max_queue:
                raise ApiError(503, f"{self.max_queue} requests are already waiting; try again shortly",
                               kind="server_busy", headers={"Retry-After": "5"})
            self.waiting.append(job)
            self.stats.requests += 1
            self.cond.notify()
        return job

    def _drop_cancelled(self) -> None:
        live = [j for j in self.waiting if not j.cancelled.is_set()]
        self.stats.dropped += len(self.waiting) - len(live)
        self.waiting = collections.deque(live)

    def _take_wave(self) -> list[Job]:
        """The next batch: the oldest live request and the ones after it on the same adapter,
        up to max_batch rows (a request with more choices than that runs alone)."""
        with self.cond:
            while True:
                self._drop_cancelled()
                if self.waiting:
                    break
                self.cond.wait()
            first = self.waiting.popleft()
            wave, rows, rest = [first], first.n, collections.deque()
            while self.waiting:
                job = self.waiting.popleft()
                if job.adapter == first.adapter and rows + job.n <= self.max_batch:
                    wave.append(job)
                    rows += job.n
                else:
                    rest.append(job)
            self.waiting = rest
            return wave

    def _take_joiners(self, adapter: str | None, free: int) -> list[Job]:
        """Requests that join a running batch on ADAPTER with FREE rows left: from the front of
        the queue, in order, as long as they fit. A request on another adapter at the front stops
        the joining, so the batch drains and that request goes next (no adapter starves)."""
        joiners: list[Job] = []
        with self.cond:
            self._drop_cancelled()
            while self.waiting and self.waiting[0].adapter == adapter and self.waiting[0].n <= free:
                joiners.append(self.waiting.popleft())
                free -= joiners[-1].n
        return joiners

    def _serve(self) -> None:
        while True:
            jobs = self._take_wave()
            try:
                self._run(jobs)
            except Exception as err:  # noqa: BLE001 - reported to those clients; the server keeps serving
                for job in jobs:
                    job.emit(("error", err))
            finally:
                self.stats.running = 0

    def _adapter(self, name: str | None) -> Any:
        if name == BASE and hasattr(self.model, "disable_adapter"):
            return self.model.disable_adapter()
        if name not in (None, BASE) and hasattr(self.model, "set_adapter"):
            self.model.set_adapter(name)
        return contextlib.nullcontext()

    def _cache(self, out: Any) -> Any:
        return out["cache"] if self.cache_arg == "cache" else out.past_key_values

    def _prefill(self, jobs: list[Job]) -> _Batch:
        """JOBS' prompts through the model together, left-padded: a batch ready to choose each
        row's first token."""
        rows = [_Row(job, i, self.tokenizer, self.stop_ids, self.vocab) for job in jobs for i in range(job.n)]
        for job in jobs:
            job.emit(("start",))
        width = max(len(r.job.prompt) for r in rows)
        ids = torch.tensor([[self.pad_id] * (width - len(r.job.prompt)) + r.job.prompt for r in rows])
        mask = torch.tensor([[0] * (width - len(r.job.prompt)) + [1] * len(r.job.prompt) for r in rows])
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **self.last_logits)
        return _Batch(rows, self._cache(out), mask, pos[:, -1] + 1, out.logits[:, -1, :].float().cpu())

    def _step(self, batch: _Batch, tokens: list[int]) -> None:
        """Each row's chosen token through the model: the logits for the next."""
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=1)
        step = torch.tensor([[t] for t in tokens], device=self.device)
        out = self.model(input_ids=step, attention_mask=batch.mask, position_ids=batch.nxt[:, None],
                         use_cache=True, **{self.cache_arg: batch.cache})
        batch.cache, batch.nxt = self._cache(out), batch.nxt + 1
        batch.logits = out.logits[:, -1, :].float().cpu()

    def _choose(self, batch: _Batch) -> list[int]:
        """Each row's next token, taken by its row (which emits text or ends); the rows that
        ended or whose client has gone leave the batch, and the tokens of those that stay."""
        rows = batch.rows
        self.stats.running = len(rows)
        self.stats.batch_sizes.append(len(rows))
        tokens = [r.choose(batch.logits[i]) for i, r in enumerate(rows)]
        for r, t in zip(rows, tokens, strict=True):
            r.push(t)
            if not r.done and r.job.cancelled.is_set():
                r.cancel()
        self.stats.generated += len(rows)
        keep = [i for i, r in enumerate(rows) if not r.done]
        batch.keep(keep)
        return [tokens[i] for i in keep]

    def _run(self, jobs: list[Job]) -> None:
        """Decode JOBS, and (joining) those that arrive meanwhile on the same adapter, until no row
        is left. JOBS grows with each joiner, so an error reaches every client in the batch."""
        adapter = jobs[0].adapter
        self.model.eval()
        started = time.monotonic()
        with self._adapter(adapter), torch.no_grad(), autocast_for(self.model):
            batch = self._prefill(jobs)
            while True:
                tokens = self._choose(batch)
                if batch.rows:
                    self._step(batch, tokens)
                joinable = self.join and (not batch.rows or mergeable(batch.cache))
                joiners = self._take_joiners(adapter, self.max_batch - len(batch.rows)) if joinable else []
                if joiners:
                    jobs += joiners
                    newcomers = self._prefill(joiners)
                    if batch.rows:
                        batch.merge(newcomers)
                    else:
                        batch = newcomers
                if not batch.rows:
                    break
        self.stats.busy_s += time.monotonic() - started
