"""Continuous batching in the serving worker, on the bundled model: a request that arrives while a
batch decodes joins it at the next step, and greedy decoding gives it, and the rows already
running, the tokens each gets alone (up to a near-tie that batched arithmetic may break the other
way: see same_greedy); a request on another adapter does not join, and goes
before later requests on the running one; with joining off (the benchmark's baseline) a newcomer
waits for the batch to end.

The joins are made deterministic without clocks: a job's sink runs on the worker's thread, so a
sink that submits the newcomers when its row emits its Nth piece puts them in the queue before
the worker looks for joiners after that step."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import pytest
from waits import limit, wait_for

from tuneforge.chat.cli import load_for_chat
from tuneforge.chat.worker import Job, Params, Worker, mergeable
from tuneforge.data.templates import template_for

QUESTIONS = {
    "colours": "Name three colours.",
    # longer than the running row's cache when it joins: the running rows get padded
    "long": "I am planning a small vegetable garden on a sunny balcony in a city with hot summers and "
            "mild winters. Which five vegetables would you grow there, and why would each one do well?",
    "short": "Hi!",  # shorter: the newcomer gets padded
    "sky": "Why is the sky blue?",
}


@pytest.fixture(scope="module")
def loaded(bundled_path):
    """The bundled model, decoding in fp32 even on a CPU with native bf16 (AVX512-BF16), where
    the server decodes under bf16 autocast: there a row's logits in a batch and alone differ by
    up to ~0.1 in log-probability (bf16 rounding of another matrix shape), greedy answers part at
    the first near-tie, and "the same tokens as alone" would test the rounding, not the batching."""
    from tuneforge.models import load

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(load, "cpu_has_fast_bf16", lambda: False)
        llm, tokenizer, template_dir = load_for_chat(str(bundled_path), None)
        yield llm, tokenizer, template_for(template_dir, tokenizer, None)


@pytest.fixture(scope="module")
def worker(loaded):
    return Worker(*loaded, max_prompt_tokens=300, max_batch=8)


class Run:
    """One job's events, recorded in the order the worker sent them to everyone."""

    log: list[tuple[str, str]]  # (event, job name), shared by the jobs of one test

    def __init__(self, worker: Worker, name: str, tokens: int, log: list, adapter: str | None = None,
                 on_piece: Callable[[int], None] | None = None) -> None:
        self.name, self.log, self.on_piece, self.pieces = name, log, on_piece, 0
        self.text, self.tokens, self.ended, self.error = "", [], threading.Event(), None
        self.entries: list[dict] = []  # per token: its logprob and the top alternatives
        messages = [{"role": "user", "content": QUESTIONS[name]}]
        self.job = Job(worker.chat_prompt(messages), Params(max_tokens=tokens, logprobs=True, top_logprobs=5), name, messages,
                       adapter=adapter, sink=self._sink)

    def _sink(self, event: tuple) -> None:
        if event[0] == "piece":
            self.tokens += [e["token"] for e in event[3]]
            self.entries += event[3]
            self.pieces += 1
            if self.on_piece:
                self.on_piece(self.pieces)
        elif event[0] == "end":
            self.text = event[2].text
            self.log.append(("end", self.name))
            self.ended.set()
        elif event[0] == "error":  # raised in the test's thread, not the worker's
            self.error = event[1]
            self.ended.set()
        else:
            self.log.append((event[0], self.name))

    def wait(self) -> Run:
        assert self.ended.wait(limit(300)), f"{self.name} did not end"
        if self.error is not None:
            raise self.error
        return self


def _alone(worker: Worker, name: str, tokens: int) -> Run:
    return _submit(worker, Run(worker, name, tokens, [])).wait()


def _submit(worker: Worker, run: Run) -> Run:
    worker.submit(run.job)
    return run


def _when(n: int, *runs: Run, worker: Worker) -> Callable[[int], None]:
    """A piece callback that submits RUNS at the Nth piece."""
    return lambda pieces: pieces == n and [_submit(worker, r) for r in runs] and None


# How far apart two tokens' log-probabilities may be and still count as a tie. fp32 logits of one
# prompt computed in a batch of 3 (padded) or alone differ by ~1e-5 (another matrix blocking);
# a row that joined wrongly (a wrong cache, position or mask) gets a different distribution, off by
# far more than this at its first token.
TIE = 1e-3


def same_greedy(batched: Run, alone: Run) -> None:
    """BATCHED made ALONE's tokens, or the same ones up to a token where ALONE's two best were tied
    (within TIE) and the batch took the other one; past that the answers go their own ways."""
    d = next((i for i, (a, b) in enumerate(zip(batched.tokens, alone.tokens, strict=False)) if a != b), None)
    if d is None:
        assert batched.tokens == alone.tokens and batched.text == alone.text, (batched.name, batched.tokens)
        return
    best = alone.entries[d]
    other = {e["token"]: e["logprob"] for e in best["top_logprobs"]}
    assert batched.tokens[d] in other and best["logprob"] - other[batched.tokens[d]] < TIE, (
        batched.name, d, batched.tokens[:d + 1], alone.tokens[:d + 1], best)


def test_a_request_joins_the_running_batch_and_greedy_tokens_match_alone(worker):
    tokens = {"colours": 40, "long": 24, "short": 16, "sky": 12}
    alone = {name: _alone(worker, name, n) for name, n in tokens.items()}
    assert all(len(r.tokens) >= 8 for r in alone.values())  # "short" ends itself after ~10, the rest at their limit

    log: list = []
    sky = Run(worker, "sky", tokens["sky"], log)
    long, short = (Run(worker, name, tokens[name], log, on_piece=_when(5, sky, worker=worker) if name == "long"
                       else None) for name in ("long", "short"))
    first = Run(worker, "colours", tokens["colours"], log, on_piece=_when(3, long, short, worker=worker))
    sizes_before = len(worker.stats.batch_sizes)
    _submit(worker, first)
    for r in (first, long, short, sky):
        r.wait()
    # each joined while the first was decoding, and got its first token in the same batch
    assert log.index(("start", "long")) < log.index(("end", "colours")), log
    assert log.index(("start", "sky")) < log.index(("end", "colours")), log
    sizes = list(worker.stats.batch_sizes)[sizes_before:]
    assert sizes[:4] == [1, 1, 1, 3] and 4 in sizes and 0 not in sizes, sizes
    for r in (first, long, short, sky):
        same_greedy(r, alone[r.name])


def test_a_request_on_another_adapter_waits_and_goes_before_later_ones(worker, monkeypatch):
    # the bundled model has no adapters: switching is a no-op here, what is tested is the queue
    monkeypatch.setattr(worker, "_adapter", lambda name: contextlib.nullcontext())
    log: list = []
    other = Run(worker, "short", 4, log, adapter="other")
    later = Run(worker, "sky", 4, log)
    first = Run(worker, "colours", 12, log, on_piece=_when(2, other, later, worker=worker))
    for r in (_submit(worker, first), other, later):
        r.wait()
    assert log.index(("end", "colours")) < log.index(("start", "short")), log  # did not join
    assert log.index(("end", "short")) < log.index(("start", "sky")), log  # nor did the one behind it


def test_without_joining_a_newcomer_waits_for_the_batch_to_end(loaded):
    waves = Worker(*loaded, max_prompt_tokens=300, max_batch=8, join=False)
    log: list = []
    later = Run(waves, "sky", 4, log)
    first = Run(waves, "colours", 12, log, on_piece=_when(2, later, worker=waves))
    for r in (_submit(waves, first), later):
        r.wait()
    assert log.index(("end", "colours")) < log.index(("start", "sky")), log
    wait_for(lambda: waves.stats.running == 0, 60, "the wave worker to be idle")


def test_only_plain_dynamic_caches_are_merged(loaded):
    import torch
    from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer

    llm = loaded[0]
    out = llm(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
    assert mergeable(next(v for k, v in out.items() if k in ("cache", "past_key_values")))
    sliding = DynamicCache()
    sliding.layers = [DynamicSlidingWindowLayer(sliding_window=4)]
    sliding.update(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), 0)
    assert not mergeable(sliding) and not mergeable(None)
