"""`rlhflab serve MODEL_OR_RUN_DIR`: an OpenAI-compatible chat API and a chat page, on FastAPI + uvicorn.

    GET  /v1/models             the base model and every --adapter, by id
    POST /v1/chat/completions   messages, temperature, top_p, max_tokens, stop, n, seed, stream
    POST /feedback              the chat page's votes (stored with --log-db)
    GET  /                      the chat page (rlhflab/infer/web/, no build step, works offline)

Batching: request handlers tokenize and validate, then put a `Job` on one queue. A single worker
thread owns the model: it waits `--batch-wait-ms` for requests that arrive together, takes every
waiting job that can share a decode (same model or adapter, temperature and top_p; a request
with a seed decodes alone so that its answer does not depend on its neighbours) up to
`--max-batch-size` rows, and runs them through the one generation engine as one left-padded
batch. Each row carries its request's own stop strings and max_tokens (engine.generate's
`on_row` hook ends it there) and streams its text back to its handler as it grows. A full queue
answers 503 at once instead of growing without bound.

Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}}, so the `openai`
client raises its usual exceptions; a bad request never stops the server.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request), which
# are imported inside create_app because FastAPI is an optional dependency.
import asyncio
import hmac
import json
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from peft import PeftModel

from rlhflab.config import opt
from rlhflab.data.template import encode_prompt, stop_token_ids
from rlhflab.errors import UsageError
from rlhflab.infer.batching import ApiError, Batcher, ChatRequest, Job
from rlhflab.infer.chat import resolve_model
from rlhflab.infer.convlog import ConversationLog
from rlhflab.infer.quantize import load_quantized, ready_for_inference
from rlhflab.models.loading import (
    choose_placement,
    context_limit,
    is_adapter_dir,
    load_causal_lm,
    load_tokenizer,
    resize_for_tokenizer,
)

WEB = Path(__file__).parent / "web"
ROLES = ("system", "user", "assistant", "developer")   # "developer" is OpenAI's newer name for system


@dataclass
class ServeConfig:
    """Serve a model (and LoRA adapters on it) with an OpenAI-compatible API and a chat page."""

    stage = "serve"
    model: str | None = opt(None, "model directory, LoRA adapter, or run directory (its best finished policy)")
    adapter: str = opt("", "a LoRA adapter on the same base, served as model NAME: NAME=DIR", repeatable=True)
    name: str = opt("", "the base model's id in the API; empty: the model directory's name")
    host: str = opt("127.0.0.1", "address to listen on (0.0.0.0 opens it to the network)")
    port: int = opt(8000, "port to listen on")
    api_key: str = opt("", "require `Authorization: Bearer KEY` on the API; empty: no key")
    log_db: str = opt("", "SQLite file logging every conversation, its settings and votes; empty: no log")
    load_in_4bit: bool = opt(False, "load the weights in 4-bit NF4 (bitsandbytes) on the fly")
    max_batch_size: int = opt(64, "most answers (requests x n) decoded together")
    max_queue: int = opt(256, "most requests waiting; beyond it a request is answered 503 at once")
    batch_wait_ms: float = opt(5.0, "how long the worker waits for requests that arrive together")
    max_body_kb: int = opt(1024, "largest request body in KiB (larger: 413)")
    default_max_tokens: int = opt(256, "max_tokens of a request that gives none (capped by the context)")
    device: str = opt("auto", "where to run", ("auto", "cpu", "cuda"))
    dtype: str = opt("auto", "weights dtype", ("auto", "fp32", "bf16", "fp16"))
    trust_remote_code: bool = opt(False, "allow the model repo's own Python code to run")

    def check(self) -> None:
        if not 0 < self.port < 65536:   # the other numbers: their ranges (config.RANGES) are checked before this
            raise UsageError(f"--port: must be in 1..65535, got {self.port}")
        adapters(self)   # raises on a malformed --adapter

    @property
    def adapters(self) -> dict[str, str]:
        return adapters(self)


def adapters(config: ServeConfig) -> dict[str, str]:
    out = {}
    for item in filter(None, (a.strip() for a in config.adapter.split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--adapter {item}: expected NAME=DIR")
        if name in out:
            raise UsageError(f"--adapter {item}: the name {name!r} is given twice")
        out[name] = path
    return out


# ---------------------------------------------------------------------------------------------
# The models: one base, adapters on it by name.


class ServedModels:
    """The base model and its adapters; `using(id)` makes one of them the active model."""

    def __init__(self, model, tokenizer, base_id: str, adapter_dirs: dict[str, str]):
        if base_id in adapter_dirs:
            raise UsageError(f"--adapter {base_id}=...: the name is the base model's id; choose another (or --name)")
        for name, path in adapter_dirs.items():
            if not is_adapter_dir(path):
                raise UsageError(f"--adapter {name}={path}: no adapter_config.json there")
            if isinstance(model, PeftModel):
                model.load_adapter(path, adapter_name=name)
            else:
                model = PeftModel.from_pretrained(model, path, adapter_name=name)
        self.model, self.tokenizer, self.base_id = ready_for_inference(model).eval(), tokenizer, base_id
        self.ids = [base_id, *adapter_dirs]
        self.context = context_limit(model)
        self.stop_ids = tuple(stop_token_ids(tokenizer))

    @contextmanager
    def using(self, model_id: str):
        if not isinstance(self.model, PeftModel):
            yield self.model
        elif model_id == self.base_id:
            with self.model.disable_adapter():
                yield self.model
        else:
            self.model.set_adapter(model_id)
            yield self.model


def load_models(config: ServeConfig) -> ServedModels:
    name, chosen = resolve_model(config.model)
    print(chosen.replace("chatting with", "serving"), file=sys.stderr)
    placement = choose_placement(config.device, config.dtype)
    if config.load_in_4bit:
        model = load_quantized(name, 4, placement, config.trust_remote_code)
    else:
        model = load_causal_lm(name, placement, config.trust_remote_code, option="--model")
    tokenizer = load_tokenizer(name, config.trust_remote_code)
    resize_for_tokenizer(model, tokenizer)
    base_id = config.name or (Path(name).resolve().name if Path(name).exists() else name)
    return ServedModels(model, tokenizer, base_id, config.adapters)


# ---------------------------------------------------------------------------------------------
# The batching queue.


# ---------------------------------------------------------------------------------------------
# Request checking.


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"{name}: expected a number, got {json.dumps(value)[:40]}", name)
    if value < low or value > high or (low_open and value == low):
        raise ApiError(400, f"{name}: must be in {'(' if low_open else '['}{low}, {high}], got {value}", name)
    return float(value)


def _integer(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ApiError(400, f"{name}: expected an integer, got {json.dumps(value)[:40]}", name)
    return value


def _messages(value) -> list[dict]:
    if not isinstance(value, list):
        raise ApiError(400, "messages: expected a list of {role, content} objects", "messages")
    if not value:
        raise ApiError(400, "messages: must not be empty", "messages")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where}: expected an object with role and content", "messages")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ApiError(400, f"{where}.role: expected one of {', '.join(ROLES)}, got {json.dumps(role)[:40]}",
                           "messages")
        if isinstance(content, list):   # content parts: only text can be read by these models
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"{where}.content: only text parts ({{'type': 'text', 'text': ...}}) are "
                                    "supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"{where}.content: expected a string", "messages")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    if out[-1]["role"] != "user":
        raise ApiError(400, "messages: the last message must be the user's (the model answers it)", "messages")
    return out


def parse_request(body: dict, models: ServedModels, config: ServeConfig) -> ChatRequest:
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "model: expected a string (GET /v1/models lists them)", "model")
    if model not in models.ids:
        raise ApiError(404, f"the model {model!r} does not exist; served: {', '.join(models.ids)}", "model",
                       "model_not_found")
    messages = _messages(body.get("messages"))
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    n = _integer(body, "n")
    n = 1 if n is None else n
    if not 1 <= n <= config.max_batch_size:
        raise ApiError(400, f"n: must be in 1..{config.max_batch_size}, got {n}", "n")
    seed = _integer(body, "seed")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop: expected a non-empty string or a list of up to 4 of them", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise ApiError(400, "stream: expected true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options: expected an object", "stream_options")

    prompt = encode_prompt(models.tokenizer, messages)
    context = models.context
    if context and len(prompt) >= context:
        raise ApiError(400, f"messages: the conversation is {len(prompt)} tokens; the model's context holds "
                            f"{context}", "messages", "context_length_exceeded")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, name)
    if max_tokens is None:
        max_tokens = min(config.default_max_tokens, context - len(prompt)) if context else config.default_max_tokens
    elif max_tokens < 1:
        raise ApiError(400, f"{name}: must be at least 1, got {max_tokens}", name)
    elif context and len(prompt) + max_tokens > context:
        raise ApiError(400, f"{name}: {max_tokens} + the prompt's {len(prompt)} tokens exceed the model's context of "
                            f"{context} tokens", name, "context_length_exceeded")
    return ChatRequest(model, messages, prompt, temperature, top_p, max_tokens, tuple(stop), n, seed,
                       bool(stream), bool(options.get("include_usage")))


async def read_json(request, limit: int) -> dict:
    """The request body as a JSON object; 413 past `limit` bytes (read no further), 400 if it is not
    UTF-8 JSON."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {int(declared)} bytes; the limit is {limit} (--max-body-kb)",
                       code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is over the limit of {limit} bytes (--max-body-kb)",
                           code="request_too_large")
    try:
        data = json.loads(bytes(body).decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {exc.start})") from None
    except ValueError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return data


# ---------------------------------------------------------------------------------------------
# The app.


def create_app(models: ServedModels, config: ServeConfig, log: ConversationLog | None = None):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.exceptions import StarletteHTTPException as HTTPException  # also the router's own 404/405
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

    batcher = Batcher(models, config.max_batch_size, config.max_queue, config.batch_wait_ms / 1000)
    app = FastAPI(title="rlhflab", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher, app.state.log = batcher, log
    created = int(time.time())

    def error(exc: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return error(exc)

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException):
        return error(ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc):
        return error(ApiError(400, str(exc)))

    @app.exception_handler(Exception)
    async def server_error(_request, exc: Exception):
        return error(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error"))

    def authorize(request: Request) -> None:
        if not config.api_key:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key (send `Authorization: Bearer KEY`)", code="invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok", "batches": batcher.batches, "waiting": len(batcher.waiting)}

    @app.get("/v1/models")
    async def list_models(request: Request):
        authorize(request)
        return {"object": "list", "data": [_model_card(i, created) for i in models.ids]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        authorize(request)
        if model_id not in models.ids:
            raise ApiError(404, f"the model {model_id!r} does not exist", "model", "model_not_found")
        return _model_card(model_id, created)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        chat = parse_request(await read_json(request, config.max_body_kb * 1024), models, config)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job = Job(chat, emit=lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        batcher.submit(job)
        answer_id = f"chatcmpl-{job.id}"
        conversation = request.headers.get("x-conversation-id")

        async def finish(choices: list[tuple[str, str]], tokens: int) -> dict:
            usage = {"prompt_tokens": len(chat.prompt), "completion_tokens": tokens,
                     "total_tokens": len(chat.prompt) + tokens}
            if log is not None:   # committed before the answer is complete, so a crash never loses it
                await asyncio.to_thread(log.add_exchange, answer_id, conversation, chat.model, chat.settings(),
                                        chat.messages, [c[0] for c in choices], [c[1] for c in choices],
                                        usage["prompt_tokens"], tokens)
            return usage

        if not chat.stream:
            event = ("waiting",)
            try:
                while event[0] not in ("done", "error"):
                    event = await events.get()
            finally:
                job.cancelled = event[0] != "done"   # cancelled while waiting: stop decoding it
            if event[0] == "error":
                raise ApiError(500, event[1], kind="server_error")
            _, choices, tokens = event
            usage = await finish(choices, tokens)
            return {"id": answer_id, "object": "chat.completion", "created": int(time.time()), "model": chat.model,
                    "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                                 "finish_reason": reason, "logprobs": None}
                                for i, (text, reason) in enumerate(choices)],
                    "usage": usage}

        async def stream():
            stamp = int(time.time())

            def chunk(choices: list[dict], **extra) -> str:
                body = {"id": answer_id, "object": "chat.completion.chunk", "created": stamp, "model": chat.model,
                        "choices": choices, **extra}
                return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

            done = False
            try:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                             for i in range(chat.n)])
                while True:
                    event = await events.get()
                    if event[0] == "delta":
                        yield chunk([{"index": event[1], "delta": {"content": event[2]}, "finish_reason": None}])
                    elif event[0] == "error":
                        yield f"data: {json.dumps(ApiError(500, event[1], kind='server_error').body())}\n\n"
                        break
                    else:
                        _, choices, tokens = event
                        usage = await finish(choices, tokens)
                        yield chunk([{"index": i, "delta": {}, "finish_reason": reason}
                                     for i, (_, reason) in enumerate(choices)])
                        if chat.include_usage:
                            yield chunk([], usage=usage)
                        break
                done = True
                yield "data: [DONE]\n\n"
            finally:
                if not done:   # the client went away: stop decoding its rows
                    job.cancelled = True

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/feedback")
    async def feedback(request: Request):
        authorize(request)
        if log is None:
            raise ApiError(409, "votes are stored only when the server runs with --log-db FILE", code="no_log")
        body = await read_json(request, 64 * 1024)
        if "rating" in body:
            answer = _answer_ref(body, log)
            rating = body["rating"]
            if rating not in (1, -1) or isinstance(rating, bool):
                raise ApiError(400, "rating: expected 1 (thumbs up) or -1 (thumbs down)", "rating")
            await asyncio.to_thread(log.add_rating, *answer, rating)
        elif "better" in body and "worse" in body:
            better, worse = _answer_ref(body["better"], log, "better."), _answer_ref(body["worse"], log, "worse.")
            await asyncio.to_thread(log.add_comparison, better, worse)
        else:
            raise ApiError(400, "expected {id, choice, rating} or {better: {id, choice}, worse: {id, choice}}")
        return {"stored": True}

    @app.get("/")
    async def page():
        return FileResponse(WEB / "index.html", media_type="text/html; charset=utf-8")

    @app.get("/{name}")
    async def asset(name: str):
        types = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
        if name not in types:
            raise ApiError(404, f"no such page: /{name}", code="not_found")
        return FileResponse(WEB / name, media_type=types[name])

    return app


def _model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "rlhflab"}


def _answer_ref(body, log: ConversationLog, where: str = "") -> tuple[str, int]:
    if not isinstance(body, dict):
        raise ApiError(400, f"{where.rstrip('.')}: expected an object with id and choice")
    answer_id, choice = body.get("id"), body.get("choice", 0)
    if not isinstance(answer_id, str) or isinstance(choice, bool) or not isinstance(choice, int):
        raise ApiError(400, f"{where}id and {where}choice: expected the answer's id (string) and choice (integer)")
    if not log.has_exchange(answer_id, choice):
        raise ApiError(404, f"{where}id: no logged answer {answer_id!r} with choice {choice}", "id")
    return answer_id, choice


def run(config: ServeConfig) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UsageError("serving needs FastAPI and uvicorn: pip install 'rlhflab[serve]'") from None
    if not config.model:
        raise UsageError("give a model: `rlhflab serve DIR` (a model, an adapter, or a run directory)")
    # bitsandbytes' int8 layers note the fp16 cast on every call; once is enough.
    warnings.filterwarnings("once", message=".*inputs will be cast from.*")
    models = load_models(config)
    log = ConversationLog(config.log_db) if config.log_db else None
    app = create_app(models, config, log)
    where = f"http://{config.host}:{config.port}"
    print(f"models: {', '.join(models.ids)}\nchat page: {where}/   API: {where}/v1"
          + (f"\nlogging conversations to {config.log_db}" if log else ""), file=sys.stderr)
    try:
        uvicorn.run(app, host=config.host, port=config.port, log_level="warning", timeout_graceful_shutdown=2)
    finally:
        app.state.batcher.close()
        if log is not None:
            log.close()
    return 0
