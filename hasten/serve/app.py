"""An OpenAI-compatible HTTP API over one Engine (FastAPI + uvicorn).

One worker thread runs requests in arrival order from a bounded queue (a full queue answers 503 with
Retry-After); the event loop only moves chunks, so it stays responsive while the model computes. Every request
owns its chunk queue, so no request can receive another's tokens; a client that disconnects cancels its
generation at the next step and frees the worker at once.
"""
from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..engine import Chunk, GenerationError
from ..methods import UnknownMethodError
from ..models.kv_cache import ContextOverflowError

MAX_TOKENS_LIMIT = 8192


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we don't use (user, logprobs: null, …)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    method: str | None = None  # hasten: decoding method for this request (default: the server's --method)


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)


class CompletionRequest(_Common):
    prompt: str | list[str]


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type_, param, code, headers


def error_response(e: APIError) -> JSONResponse:
    body = {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}
    return JSONResponse(body, status_code=e.status, headers=e.headers)


@dataclass
class Job:
    kwargs: dict
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)


_END = object()


class Worker:
    """The one thread that runs the engine; jobs wait in a bounded queue."""

    def __init__(self, engine, queue_size: int):
        self.engine = engine
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.slots = threading.BoundedSemaphore(queue_size)  # requests running or waiting
        self.thread = threading.Thread(target=self._run, name="hasten-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        if not self.slots.acquire(blocking=False):
            raise APIError(503, "the server is busy: its request queue is full; retry shortly", "server_busy",
                           code="queue_full", headers={"Retry-After": "1"})
        self.jobs.put(job)

    def _run(self):
        while (job := self.jobs.get()) is not None:
            try:
                if not job.cancelled.is_set():
                    self._generate(job)
            finally:
                self.slots.release()

    def _generate(self, job: Job) -> None:
        put = lambda item: job.loop.call_soon_threadsafe(job.out.put_nowait, item)  # noqa: E731
        try:
            gen = self.engine.run(**job.kwargs)
            for chunk in gen:
                if job.cancelled.is_set():  # the client left: stop now, free the engine for the next request
                    gen.close()
                    break
                put(chunk)
            else:
                put(gen.result)
        except Exception as e:  # surfaced to the request as an error, never as a lost request
            put(e)
        put(_END)

    def stop(self):
        self.jobs.put(None)


def create_app(engine, method: str = "baseline", queue_size: int = 16) -> FastAPI:
    app = FastAPI(title="hasten", version="0.1.0")
    worker = Worker(engine, queue_size)
    app.state.worker = worker
    page = (Path(__file__).parent / "chat.html").read_text()

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in err.get("loc", []) if x != "body"]
        if err.get("type") == "json_invalid":
            return error_response(APIError(400, "the request body is not valid JSON", code="invalid_json"))
        msg = f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid value')}"
        return error_response(APIError(400, msg, param=".".join(loc) or None, code="invalid_value"))

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):
        return error_response(APIError(500, f"internal error ({type(e).__name__})", "server_error"))

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return page

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.name, "waiting": worker.jobs.qsize()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0, "owned_by": "hasten"}]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        messages = [m.model_dump() for m in req.messages]
        return await _serve(req, request, messages, chat=True, limit=req.max_completion_tokens or req.max_tokens)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        if isinstance(req.prompt, list):
            if len(req.prompt) != 1:
                raise APIError(400, "prompt: hasten serves one prompt per request (n = 1)", param="prompt")
            req.prompt = req.prompt[0]
        return await _serve(req, request, req.prompt, chat=False, limit=req.max_tokens or 16)

    async def _serve(req: _Common, request: Request, prompt: Any, chat: bool, limit: int | None):
        if req.model not in (None, "", engine.name, "default"):
            raise APIError(404, f"model {req.model!r} does not exist; this server serves {engine.name!r} (GET /v1/models)",
                           param="model", code="model_not_found")
        name = req.method or method
        context = engine.model.config.max_position_embeddings
        try:  # validate now (unknown method, prompt too long, …) so errors are 4xx before anything streams
            engine.drafter(name)
            ids = _encode(prompt, chat)
            if len(ids) >= context:
                raise ContextOverflowError(f"the prompt has {len(ids)} tokens but the model's context is {context}; "
                                           "shorten the prompt")
        except UnknownMethodError as e:
            raise APIError(400, str(e), param="method", code="unknown_method") from None
        except (GenerationError, ContextOverflowError, ValueError) as e:
            raise APIError(400, str(e), code="context_length_exceeded" if "context" in str(e) else "invalid_value") from None
        stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        kwargs = dict(prompt=ids, max_new_tokens=limit or context - len(ids), method=name, temperature=req.temperature,
                      top_p=req.top_p, seed=req.seed, stop=stop)
        job = Job(kwargs, asyncio.get_running_loop(), asyncio.Queue())
        worker.submit(job)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(job, request, rid, created, chat, include_usage, len(ids)),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text, result = "", None
        try:
            while (item := await job.out.get()) is not _END:
                if isinstance(item, Exception):
                    raise APIError(500, f"generation failed ({type(item).__name__})", "server_error")
                if isinstance(item, Chunk):
                    text += item.text
                else:
                    result = item
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        choice = {"index": 0, "finish_reason": result.finish_reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": result.text}
        else:
            choice["text"] = result.text
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": engine.name, "choices": [choice], "usage": _usage(result), "hasten": _stats(result)}

    async def _sse(job: Job, request: Request, rid, created, chat, include_usage, prompt_tokens):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def event(choice: dict, **extra) -> str:
            body = {"id": rid, "object": obj, "created": created, "model": engine.name, "choices": [choice], **extra}
            return f"data: {json.dumps(body)}\n\n"

        try:
            if chat:
                yield event({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
            result = None
            while (item := await job.out.get()) is not _END:
                if isinstance(item, Exception):
                    err = {"error": {"message": f"generation failed ({type(item).__name__})", "type": "server_error"}}
                    yield f"data: {json.dumps(err)}\n\n"
                    break
                if isinstance(item, Chunk):
                    if item.text or item.tokens:
                        choice = ({"index": 0, "delta": {"content": item.text}, "finish_reason": None} if chat
                                  else {"index": 0, "text": item.text, "finish_reason": None, "logprobs": None})
                        yield event(choice, hasten={"sources": item.sources, "tokens": len(item.tokens)})
                else:
                    result = item
            if result is not None:
                last = ({"index": 0, "delta": {}, "finish_reason": result.finish_reason} if chat
                        else {"index": 0, "text": "", "finish_reason": result.finish_reason, "logprobs": None})
                yield event(last, hasten=_stats(result))
                if include_usage:
                    body = {"id": rid, "object": obj, "created": created, "model": engine.name, "choices": [],
                            "usage": _usage(result)}
                    yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # the client went away or the stream ended: stop the generation at its next step
            job.cancelled.set()

    def _encode(prompt, chat):
        return engine.encode(prompt, chat=chat)

    @app.on_event("shutdown")
    async def _stop():
        worker.stop()

    return app


def _usage(result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.tokens,
            "total_tokens": result.prompt_tokens + result.tokens}


def _stats(result) -> dict:
    s = result.stats()
    return {"method": s["method"], "mean_accepted": s["mean_accepted"], "tokens_per_s": s["tokens_per_s"],
            "target_passes": s["target_passes"], "draft_share": s["draft_share"]}
