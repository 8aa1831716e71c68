"""The serving queue: chat requests wait here, and one worker thread decodes those that can share a
decode (same adapter and sampling settings) in one batch through the generation engine, streaming
each row's text back to its request as it grows."""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from rlhflab.infer import engine
from rlhflab.infer.engine import SamplingParams


@dataclass
class ChatRequest:
    model: str
    messages: list[dict]
    prompt: list[int]
    temperature: float
    top_p: float
    max_tokens: int
    stop: tuple[str, ...]
    n: int
    seed: int | None
    stream: bool
    include_usage: bool

    def settings(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens,
                "stop": list(self.stop), "n": self.n, "seed": self.seed}


@dataclass
class Job:
    """One chat completion request being decoded: n rows of one prompt."""

    chat: ChatRequest
    emit: Callable[[tuple], None]   # thread-safe: hands an event to the request's handler
    cancelled: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def key(self) -> tuple:
        chat = self.chat
        greedy = chat.temperature == 0
        return (chat.model, 0.0 if greedy else chat.temperature, 1.0 if greedy else chat.top_p,
                self.id if chat.seed is not None and not greedy else None)


@dataclass
class Row:
    """One choice being decoded: what was streamed of it, and how it ended."""

    job: Job
    index: int
    sent: str = ""
    text: str | None = None        # the final answer, once ended
    finish: str | None = None      # "stop" or "length"
    tokens: int = 0

    def advance(self, text: str, n_tokens: int, ended: bool) -> bool:
        """Stream what is certain of `text`; True when this row is over."""
        if self.job.cancelled:
            return True
        self.tokens = n_tokens
        cuts = [text.find(s) for s in self.job.chat.stop if s in text]
        if cuts:
            text, ended = text[:min(cuts)], True
        over = ended or n_tokens >= self.job.chat.max_tokens
        visible = text if over else _certain(text, self.job.chat.stop)
        if over:
            visible = visible.rstrip("\ufffd")   # the bytes of a character cut off by max_tokens
        if visible.startswith(self.sent) and len(visible) > len(self.sent):
            self.job.emit(("delta", self.index, visible[len(self.sent):]))
            self.sent = visible
        if over:
            self.text, self.finish = self.sent, "stop" if ended else "length"
        return over


def _certain(text: str, stops: tuple[str, ...]) -> str:
    """`text` less what may still change: a character whose bytes are not all there yet (decoded as
    U+FFFD; streaming it would break Chinese text), or the start of a stop string."""
    text = text.rstrip("\ufffd")
    hold = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:size]):
                hold = size
                break
    return text[:len(text) - hold]


class Batcher:
    """The request queue and the one worker thread that decodes for it."""

    def __init__(self, models, max_batch_size: int, max_queue: int, batch_wait_s: float):
        # models: the server's ServedModels (its tokenizer, stop_ids, and using(name) for an adapter)
        self.models, self.max_rows, self.max_queue, self.wait = models, max_batch_size, max_queue, batch_wait_s
        self.waiting: deque[Job] = deque()
        self.cond = threading.Condition()
        self.closed = False
        self.batches = 0                 # decodes run (for tests and the bench)
        self.worker = threading.Thread(target=self._loop, name="rlhflab-serve-worker", daemon=True)
        self.worker.start()

    def submit(self, job: Job) -> None:
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                raise ApiError(503, f"the server is busy: {len(self.waiting)} requests are waiting (--max-queue "
                                    f"{self.max_queue}); retry shortly", code="server_busy", kind="server_error")
            self.waiting.append(job)
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()

    def _take(self) -> list[Job]:
        """The oldest waiting job and every later one that can share its decode, up to max_rows."""
        with self.cond:
            while self.waiting and self.waiting[0].cancelled:
                self.waiting.popleft()
            if not self.waiting:
                return []
            key, batch, rows, keep = self.waiting[0].key(), [], 0, deque()
            while self.waiting:
                job = self.waiting.popleft()
                if job.cancelled:
                    continue
                if job.key() == key and rows + job.chat.n <= self.max_rows or not batch:
                    batch.append(job)
                    rows += job.chat.n
                else:
                    keep.append(job)
            self.waiting = keep
            return batch

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.waiting and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return
            time.sleep(self.wait)
            batch = self._take()
            if batch:
                self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        rows = [Row(job, i) for job in batch for i in range(job.chat.n)]
        first = batch[0].chat
        params = SamplingParams(max_new_tokens=max(job.chat.max_tokens for job in batch), temperature=first.temperature,
                                top_p=first.top_p, do_sample=first.temperature > 0,
                                stop_token_ids=self.models.stop_ids, seed=first.seed)
        try:
            with self.models.using(first.model) as model:
                engine.generate(model, self.models.tokenizer, [row.job.chat.prompt for row in rows], params,
                                on_row=lambda i, text, n, ended: rows[i].advance(text, n, ended))
        except Exception as exc:   # noqa: BLE001 - one failed decode must not stop the server
            for job in batch:
                job.emit(("error", f"generation failed: {type(exc).__name__}: {exc}"))
            return
        finally:
            self.batches += 1
        for job in batch:
            mine = [row for row in rows if row.job is job]
            job.emit(("done", [(row.text or "", row.finish or "length") for row in mine],
                      sum(row.tokens for row in mine)))


class ApiError(Exception):
    """An OpenAI-shaped error answer."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
