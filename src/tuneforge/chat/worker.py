"""One model, one generation at a time: requests wait in a queue and a single thread serves
them, so concurrent clients cannot race on the model or run it out of memory."""

from __future__ import annotations

import contextlib
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

from tuneforge.chat.api import ApiError, ChatRequest
from tuneforge.data.templates import Template
from tuneforge.models.generate import Reply, generate_reply, prompt_ids


@dataclass
class Job:
    request: ChatRequest
    prompt_tokens: int
    pieces: queue.Queue = field(default_factory=queue.Queue)  # str pieces, then a Reply or an Exception
    cancelled: threading.Event = field(default_factory=threading.Event)


class Worker:
    def __init__(self, model: Any, tokenizer: Any, template: Template, max_prompt_tokens: int,
                 max_queue: int = 64) -> None:
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.max_prompt_tokens, self.max_queue = max_prompt_tokens, max_queue
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.lock = threading.Lock()  # prompt tokenisation on request threads
        threading.Thread(target=self._serve, name="tuneforge-generate", daemon=True).start()

    def submit(self, request: ChatRequest) -> Job:
        if self.jobs.qsize() >= self.max_queue:
            raise ApiError(503, f"{self.max_queue} requests are already waiting; try again shortly",
                           kind="server_busy")
        with self.lock:
            n = len(prompt_ids(self.tokenizer, self.template, request.messages))
        if n > self.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {n} tokens; this server takes at most "
                                f"{self.max_prompt_tokens} (--max-prompt-tokens)", "messages")
        job = Job(request, n)
        self.jobs.put(job)
        return job

    def _serve(self) -> None:
        while True:
            job = self.jobs.get()
            if job.cancelled.is_set():
                continue
            try:
                no_adapter = self.model.disable_adapter() if job.request.base and hasattr(self.model, "disable_adapter") \
                    else contextlib.nullcontext()
                with no_adapter:
                    reply: Reply | Exception = generate_reply(
                        self.model, self.tokenizer, self.template, job.request.messages,
                        job.request.sampling, on_text=job.pieces.put, cancelled=job.cancelled.is_set)
            except Exception as err:  # noqa: BLE001 - reported to that client; the server keeps serving
                reply = err
            job.pieces.put(reply)
