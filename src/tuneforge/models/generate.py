"""Generate replies with a loaded model: sampling settings, one reply streamed (with its token
counts, cancellable), and many chats at once in batches.

What replay data (data/replay.py), evaluation during training (train/hooks.py), the identity
evaluation (evaluate/) and the terminal chat and server (chat/, only the fronts) all use.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tuneforge.data.templates import Template, render, stop_token_ids


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0


def autocast_for(model: Any) -> Any:
    """bf16 matmuls for an fp32 model: on a CPU with native bf16 (about 2x the tokens per second,
    measured ad hoc on an AMD EPYC), and on a GPU with bf16, where fp32 weights are a full
    fine-tune's master copy being evaluated during training."""
    from tuneforge.models.load import autocast_dtype

    param = next(model.parameters())
    amp = None
    if param.dtype == torch.float32:
        gpu_bf16 = param.is_cuda and torch.cuda.is_bf16_supported()
        amp = torch.bfloat16 if gpu_bf16 else autocast_dtype("auto", param.device)
    return torch.autocast(param.device.type, dtype=amp or torch.float32, enabled=amp is not None)


def generate_kwargs(sampling: Sampling, stops: list[int], pad_token_id: int | None) -> dict[str, Any]:
    """The keyword arguments of ``model.generate`` for SAMPLING, stopping at STOPS."""
    kwargs: dict[str, Any] = dict(max_new_tokens=sampling.max_new_tokens, eos_token_id=stops,
                                  pad_token_id=pad_token_id,
                                  repetition_penalty=sampling.repetition_penalty)
    if sampling.temperature > 0:
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                      top_k=sampling.top_k)
    else:  # greedy; None silences "flags are not valid" warnings from the model's own defaults
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


def generate_batch(model: Any, tokenizer: Any, template: Template, chats: list[list[dict]],
                   sampling: Sampling, batch_size: int = 32, with_finished: bool = False,
                   on_batch: Callable[[int, int], None] | None = None) -> Any:
    """Greedy (or sampled) replies to many chats at once, left-padded: several times the
    throughput of one-by-one generation on a CPU. With WITH_FINISHED, also whether each reply
    ended by itself (a stop token) rather than at ``max_new_tokens``. ON_BATCH is called after
    each batch with (chats answered so far, size of that batch), for a progress display."""
    device = next(model.parameters()).device
    stops = stop_token_ids(template, tokenizer)
    kwargs = generate_kwargs(sampling, stops, tokenizer.pad_token_id)
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        # longest first: each batch pads to a similar length
        order = sorted(range(len(chats)), key=lambda i: -len(str(chats[i])))
        out_by_index: dict[int, str] = {}
        finished_by_index: dict[int, bool] = {}
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            prompts = [render(template, tokenizer, chats[i], add_generation_prompt=True) for i in idx]
            enc = tokenizer(prompts, add_special_tokens=False, return_tensors="pt", padding=True).to(device)
            with torch.no_grad(), autocast_for(model):
                out = model.generate(**enc, **kwargs)
            for i, row in zip(idx, out[:, enc["input_ids"].shape[1]:], strict=True):
                out_by_index[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
                finished_by_index[i] = any(t in stops for t in row.tolist())
            if on_batch is not None:
                on_batch(start + len(idx), len(idx))
        replies = [out_by_index[i] for i in range(len(chats))]
        finished = [finished_by_index[i] for i in range(len(chats))]
    finally:
        tokenizer.padding_side = side
        if was_training:
            model.train()
    return (replies, finished) if with_finished else replies


@dataclass(frozen=True)
class Reply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finished: bool  # ended by a stop token, not by max_new_tokens or a cancel


def prompt_ids(tokenizer: Any, template: Template, messages: list[dict]) -> list[int]:
    prompt = render(template, tokenizer, messages, add_generation_prompt=True)
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def generate_reply(model: Any, tokenizer: Any, template: Template, messages: list[dict],
                   sampling: Sampling, on_text: Callable[[str], None] | None = None,
                   cancelled: Callable[[], bool] | None = None) -> Reply:
    """Answer the last user turn of MESSAGES; ON_TEXT receives the reply as it streams;
    CANCELLED is asked after every token (a client that went away)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Cancel(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kw: Any) -> torch.Tensor:
            stop = bool(cancelled and cancelled())
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    ids = torch.tensor([prompt_ids(tokenizer, template, messages)], device=next(model.parameters()).device)
    stops = stop_token_ids(template, tokenizer)
    kwargs = generate_kwargs(sampling, stops, tokenizer.pad_token_id)
    streamer = _CallbackStreamer(tokenizer, on_text) if on_text else None
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast_for(model):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                             stopping_criteria=StoppingCriteriaList([_Cancel()]) if cancelled else None,
                             **kwargs)
    if was_training:
        model.train()
    new = out[0, ids.shape[1]:].tolist()
    return Reply(tokenizer.decode(new, skip_special_tokens=True).strip(), ids.shape[1], len(new),
                 any(t in stops for t in new))


def generate(model: Any, tokenizer: Any, template: Template, messages: list[dict],
             sampling: Sampling, on_text: Callable[[str], None] | None = None) -> str:
    """Answer the last user turn of MESSAGES; ON_TEXT receives the reply as it streams."""
    return generate_reply(model, tokenizer, template, messages, sampling, on_text).text


class _CallbackStreamer:
    """A minimal streamer: decodes the growing reply and hands each new piece of text on."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None]) -> None:
        self.tokenizer, self.on_text = tokenizer, on_text
        self.ids: list[int] = []
        self.sent = 0
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt
            self.prompt_seen = True
            return
        self.ids += value.flatten().tolist()
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        if len(text) > self.sent:
            self.on_text(text[self.sent:])
            self.sent = len(text)

    def end(self) -> None:
        pass


def is_4bit(model: Any) -> bool:
    """Whether MODEL holds bitsandbytes 4-bit weights."""
    return any(type(p).__name__ == "Params4bit" for p in model.parameters())


@contextmanager
def unquantized_on_cpu(model: Any, model_path: str | Path, trust_remote_code: bool = False) -> Iterator[Any]:
    """The model to generate many answers with: MODEL itself, or, where MODEL is 4-bit on a CPU,
    the base at MODEL_PATH loaded once more without quantization, freed again on exit.

    bitsandbytes' CPU 4-bit matmuls dequantize every weight on every token, and NF4 rounding
    changes the answers of a small model (the bundled one repeats words where the unquantized
    base does not); the unquantized base is what a user trains from. On a GPU the 4-bit model
    answers itself: there its matmuls are fast, and a second copy could run out of memory.
    """
    param = next(model.parameters())
    if param.device.type != "cpu" or not is_4bit(model):
        yield model
        return
    from tuneforge.models.load import load_model

    # the dtype the 4-bit model keeps its other weights (embeddings, norms) and computes in
    dtype = model.get_input_embeddings().weight.dtype
    base = load_model(model_path, torch.device("cpu"), dtype, trust_remote_code=trust_remote_code)
    try:
        yield base
    finally:
        del base
        gc.collect()
