"""Generate a reply for a chat history, with the template the model was trained with."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tuneforge.data.templates import Template, get_template, load_template, render, stop_token_ids
from tuneforge.errors import UserError

# Sampling and batched generation live with the models (replay and evaluation use them too);
# re-exported here for chat's own users.
from tuneforge.models.generate import Sampling, autocast_for, generate_batch, generate_kwargs

__all__ = ["Reply", "Sampling", "generate", "generate_batch", "generate_reply", "prompt_ids", "template_for"]


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


def template_for(model_dir: str | Path | None, tokenizer: Any, override: str | None) -> Template:
    """``--prompt-template`` if given, else the template saved with the model, else its own."""
    if override:
        return get_template(override, tokenizer)
    saved = load_template(model_dir) if model_dir and Path(model_dir).is_dir() else None
    if saved is not None:
        return saved
    try:
        return get_template("auto", tokenizer)
    except UserError as err:
        raise UserError(f"{model_dir}: no saved template and {err}") from err
