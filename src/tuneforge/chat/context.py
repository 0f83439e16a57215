"""Fitting a conversation into the model's context window: the oldest exchanges go first (never
the system prompt or the question being asked); a question too long on its own loses its
beginning (a pasted text usually ends with what is asked about it). What was dropped is said in
one line, so the user knows the model did not see it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

Tokens = Callable[[list[dict]], int]  # the prompt's length in tokens for these messages


def fit_history(history: list[dict], n_tokens: Tokens, limit: int) -> list[dict]:
    """Drop the oldest exchanges (never the system prompt or the last question) until
    N_TOKENS(history) fits LIMIT."""
    history = list(history)
    first = 1 if history and history[0]["role"] == "system" else 0
    while n_tokens(history) > limit and len(history) - first > 1:
        # a question goes with its answer
        drop = 2 if history[first]["role"] == "user" and len(history) - first > 2 else 1
        del history[first:first + drop]
    return history


@dataclass(frozen=True)
class Fitted:
    """A conversation fitted into LIMIT tokens, and what it took."""

    messages: list[dict]
    limit: int
    asked: int  # tokens of the prompt as the user made it
    sent: int  # tokens of the prompt the model gets
    dropped: int  # old messages dropped
    cut: int  # tokens cut from the start of the last question

    @property
    def fits(self) -> bool:
        return self.sent <= self.limit

    def warning(self) -> str | None:
        """One line saying what the model will not see, or None when it sees everything."""
        if not self.fits:
            return (f"[the prompt is {self.asked:,} tokens and the system prompt alone is over the "
                    f"{self.limit:,} that fit the context; shorten the system prompt (--system)]")
        if not (self.dropped or self.cut):
            return None
        what = ([f"dropped the {self.dropped} oldest message(s)"] if self.dropped else []) + (
            [f"cut the first {self.cut:,} tokens of your question"] if self.cut else [])
        return (f"[the prompt is {self.asked:,} tokens, over the {self.limit:,} that fit the context: "
                f"{' and '.join(what)}, {self.asked - self.sent:,} tokens in all]")


def fit_prompt(history: list[dict], n_tokens: Tokens, limit: int, encode: Callable[[str], list[int]],
               decode: Callable[[list[int]], str]) -> Fitted:
    """HISTORY (ending with the question) fitted into LIMIT tokens: old exchanges dropped first,
    then the question's first tokens cut (ENCODE/DECODE: the tokenizer on plain text)."""
    asked = n_tokens(history)
    messages = fit_history(history, n_tokens, limit)
    dropped, cut = len(history) - len(messages), 0
    sent = n_tokens(messages)
    if sent > limit:
        ids = encode(messages[-1]["content"])
        while sent > limit and cut < len(ids):
            # the prompt shrinks by about as many tokens as the text does; re-measured, since a cut
            # can join or split tokens at its edge
            cut = min(len(ids), cut + sent - limit)
            messages[-1] = {**messages[-1], "content": decode(ids[cut:])}
            sent = n_tokens(messages)
    return Fitted(messages, limit, asked, sent, dropped, cut)
