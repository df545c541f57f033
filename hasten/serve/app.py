"""An OpenAI-compatible HTTP API over one Engine (FastAPI + uvicorn).

One worker thread (worker.py) steps up to --max-batch requests together in one scheduler, starting them in
arrival order from a bounded queue (a full queue answers 503 with Retry-After); the event loop only parses,
tokenizes and moves chunks, so it stays responsive while the model computes. Each answer is the one the request
would get alone, whatever else runs beside it. A client that disconnects, streaming or not, has its generation stopped before the next step: a
watcher on the connection notices while the request waits or runs unstreamed, Starlette's own while it streams.
Errors are one-line OpenAI-style JSON: 4xx for the request's own fault, 5xx (or an error event inside a stream
that has begun) when generation fails; the server goes on serving.
/metrics gives the counters in Prometheus text format.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.background import BackgroundTask

from .. import methods as registry
from ..engine import Chunk, GenerationError, TokenLogprob
from ..methods import UnknownMethodError
from .metrics import Metrics
from .protocol import (APIError, ChatRequest, CompletionRequest, _Common, chat_messages,  # noqa: F401
                       completion_prompt)
from .worker import END, STARTED, Job, PromptLogprobs, Worker


# A streamed event may wait this long for the steps after it. One stream on a 2-core machine then sends ~7 tokens an
# event instead of 1: the official Python client spends ~1 ms of CPU on each event, time that comes out of the
# compute threads. Measured with the load test against the engine in process (BENCHMARKS.md, 2026-12-03): 0 ms
# 0.86x, 30 ms 0.93x, 60 ms 0.96x; 20 updates a second is still faster than anyone reads.
STREAM_INTERVAL_S = 0.05


def error_response(e: APIError) -> JSONResponse:
    body = {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}
    return JSONResponse(body, status_code=e.status, headers=e.headers)


def create_app(engine, method: str = "baseline", queue_size: int = 16, max_batch: int = 8, step_tokens: int = 256,
               prefix_cache_mb: float = 256, warm_up: bool = False, stream_interval: float = STREAM_INTERVAL_S) -> FastAPI:
    """The OpenAI-compatible app over `engine`; warm_up: run one short generation before taking requests;
    stream_interval: seconds a streamed event may wait to carry the chunks of later steps with it (0: one event
    per step)."""
    app = FastAPI(title="hasten", version="0.1.0")
    metrics = Metrics()
    worker = Worker(engine, queue_size, metrics, max_batch, step_tokens, prefix_cache_mb,
                    warm_up=method if warm_up else None)
    app.state.worker, app.state.metrics = worker, metrics
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
        return {"status": "ok", "model": engine.name, "waiting": metrics.waiting, "running": metrics.running,
                "pid": os.getpid()}  # which process answered: replicas behind a router differ

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0, "owned_by": "hasten"}]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        messages = chat_messages(req)
        if not getattr(engine.tokenizer, "chat_template", None):
            raise APIError(400, f"{engine.name} is a base model with no chat template, so it cannot take messages; "
                           "send a plain prompt to /v1/completions instead", param="messages", code="no_chat_template")
        top = (req.top_logprobs or 0) if req.logprobs else None
        return await _serve(req, request, messages, chat=True, limit=req.max_completion_tokens or req.max_tokens,
                            logprobs=top)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        prompt = completion_prompt(req, engine.model.config.vocab_size)
        return await _serve(req, request, prompt, chat=False, limit=req.max_tokens or 16, logprobs=req.logprobs,
                            echo=req.echo)

    async def _serve(req: _Common, request: Request, prompt, chat: bool, limit: int | None, logprobs: int | None,
                     echo: bool = False):
        if req.model not in (None, "", engine.name, "default"):
            raise APIError(404, f"model {req.model!r} does not exist; this server serves {engine.name!r} (GET /v1/models)",
                           param="model", code="model_not_found")
        name = req.method or method
        context = engine.model.config.max_position_embeddings
        try:  # cheap checks here, so errors are 4xx before anything is queued; the method is built by the worker
            registry.parse(name)
            ids = prompt if isinstance(prompt, list) and prompt and isinstance(prompt[0], int) else \
                engine.encode(prompt, chat=chat)
        except UnknownMethodError as e:
            raise APIError(400, str(e), param="method", code="unknown_method") from None
        except (GenerationError, ValueError) as e:
            raise APIError(400, str(e), code="invalid_value") from None
        except Exception as e:  # the chat template refused the messages (jinja raises its own errors)
            raise APIError(400, f"messages: the model's chat template cannot format them ({_first_line(e)})",
                           param="messages", code="invalid_value") from None
        if req.response_format is not None and req.response_format.get("type") != "text":
            from ..decoding.grammar import GrammarError, compile_grammar
            try:  # a bad schema is this request's 400, before it is queued
                compile_grammar(req.response_format)
            except GrammarError as e:
                raise APIError(400, str(e), param="response_format", code="invalid_value") from None
        if len(ids) >= context:
            raise APIError(400, f"the prompt has {len(ids)} tokens but the model's context is {context}; "
                           "shorten the prompt", param="messages" if chat else "prompt", code="context_length_exceeded")
        stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        kwargs = dict(prompt=list(ids), max_new_tokens=limit or context - len(ids), method=name,
                      temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, seed=req.seed, stop=stop,
                      logprobs=logprobs, response_format=req.response_format)
        job = Job(kwargs, asyncio.get_running_loop(), prompt_logprobs=logprobs if echo and logprobs is not None else None)
        worker.submit(job)
        watcher = asyncio.ensure_future(_watch_disconnect(request, job))
        try:
            first = await job.out.get()  # STARTED, or why the request cannot run (4xx/5xx before any byte is sent)
        except BaseException:
            job.cancelled.set()
            watcher.cancel()
            raise
        if first is not STARTED:
            watcher.cancel()
            if isinstance(first, APIError):
                raise first
            return JSONResponse({"error": {"message": "the client closed the request", "type": "cancelled",
                                           "param": None, "code": "client_closed"}}, status_code=499)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        view = _View(engine, chat, logprobs, echo, ids)
        if req.stream:  # from here Starlette watches the connection: it ends the stream when the client leaves
            watcher.cancel()
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(job, view, rid, created, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"}, background=BackgroundTask(job.cancelled.set))
        try:
            result, chunks, prompt_lp = None, [], None
            while (item := await job.out.get()) is not END:
                if isinstance(item, APIError):
                    raise item
                if isinstance(item, Chunk):
                    chunks.append(item)
                elif isinstance(item, PromptLogprobs):
                    prompt_lp = item.items
                else:
                    result = item
        finally:
            job.cancelled.set()  # a no-op once the worker is done; stops it if this handler is cancelled
            watcher.cancel()
        if result is None:  # cancelled: the client is gone, this answer is never read
            return JSONResponse({"error": {"message": "the client closed the request", "type": "cancelled",
                                           "param": None, "code": "client_closed"}}, status_code=499)
        lps = [lp for c in chunks for lp in (c.logprobs or [])]
        choice = {"index": 0, "finish_reason": result.finish_reason,
                  "logprobs": view.logprobs(lps, prompt_lp, text_start=0)}
        if chat:
            choice["message"] = {"role": "assistant", "content": result.text}
        else:
            choice["text"] = view.prompt_text() + result.text if echo else result.text
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": engine.name, "choices": [choice], "usage": _usage(result), "hasten": _stats(result, job)}

    async def _sse(job: Job, view: "_View", rid, created, include_usage):
        chat = view.chat
        obj = "chat.completion.chunk" if chat else "text_completion"

        def event(choice: dict, **extra) -> str:
            body = {"id": rid, "object": obj, "created": created, "model": engine.name, "choices": [choice], **extra}
            return f"data: {json.dumps(body)}\n\n"

        try:
            if chat:
                yield event({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None})
            result, offset = None, 0
            async for item in _coalesced(job.out, stream_interval):
                if isinstance(item, APIError):  # mid-generation: the stream has begun, so an error event
                    err = {"error": {"message": item.message, "type": item.type, "param": None, "code": item.code}}
                    yield f"data: {json.dumps(err)}\n\n"
                    break
                if isinstance(item, PromptLogprobs) or (view.echo and offset == 0 and isinstance(item, Chunk)):
                    # completions with echo: the prompt comes first, with its own logprobs when asked for
                    text = view.prompt_text()
                    lp = view.logprobs([], item.items if isinstance(item, PromptLogprobs) else None, 0)
                    offset = max(len(text), 1)
                    yield event({"index": 0, "text": text, "finish_reason": None, "logprobs": lp})
                    if isinstance(item, PromptLogprobs):
                        continue
                if isinstance(item, Chunk):
                    if item.text or item.tokens:
                        lp = view.logprobs(item.logprobs or [], None, offset)
                        offset += len(item.text)
                        choice = ({"index": 0, "delta": {"content": item.text}, "logprobs": lp, "finish_reason": None}
                                  if chat else {"index": 0, "text": item.text, "finish_reason": None, "logprobs": lp})
                        yield event(choice, hasten={"sources": item.sources, "tokens": len(item.tokens)})
                else:
                    result = item
            if result is not None:
                last = ({"index": 0, "delta": {}, "logprobs": None, "finish_reason": result.finish_reason} if chat
                        else {"index": 0, "text": "", "finish_reason": result.finish_reason, "logprobs": None})
                yield event(last, hasten=_stats(result, job))
                if include_usage:
                    body = {"id": rid, "object": obj, "created": created, "model": engine.name, "choices": [],
                            "usage": _usage(result)}
                    yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # the client went away or the stream ended: stop the generation before its next step
            job.cancelled.set()

    @app.on_event("shutdown")
    async def _stop():
        worker.stop()

    return app


async def _coalesced(out: asyncio.Queue, interval: float):
    """The job's items until END, with the chunks that arrive within `interval` seconds of the last event sent
    merged into one. Each streamed event costs the client a wake-up and a parse (the official Python client
    spends ~1 ms of CPU on one), and on a machine whose cores all compute, that time comes out of the next
    step. The first chunk goes at once and later ones wait at most `interval`; the result or an error ends the
    wait at once, so merging never delays the end of a stream."""
    loop = asyncio.get_running_loop()
    sent, held = float("-inf"), None
    while True:
        item, held = (held, None) if held is not None else (await out.get(), None)
        if item is END:
            return
        if isinstance(item, Chunk) and interval > 0:
            parts = [item]
            while (left := sent + interval - loop.time()) > 0 or not out.empty():
                try:
                    nxt = out.get_nowait() if left <= 0 else await asyncio.wait_for(out.get(), left)
                except (asyncio.TimeoutError, asyncio.QueueEmpty):
                    break
                if not isinstance(nxt, Chunk):  # the end (or an error): send what is held now
                    held = nxt
                    break
                parts.append(nxt)
            item = _merge(parts)
            sent = loop.time()
        yield item


def _merge(parts: list[Chunk]) -> Chunk:
    if len(parts) == 1:
        return parts[0]
    lps = [lp for c in parts for lp in (c.logprobs or [])]
    return Chunk("".join(c.text for c in parts), [t for c in parts for t in c.tokens],
                 [s for c in parts for s in c.sources], lps if any(c.logprobs is not None for c in parts) else None)


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Cancel the job when the client disconnects (uvicorn also reports a completed response as a disconnect,
    by then the worker is done with the job and the flag is ignored)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancelled.set()


class _View:
    """Turns token logprobs into the OpenAI shapes: chat's `content` list, completions' parallel lists."""

    def __init__(self, engine, chat: bool, top: int | None, echo: bool, prompt_ids: list[int]):
        self.engine, self.chat, self.top, self.echo, self.prompt_ids = engine, chat, top, echo, prompt_ids

    def prompt_text(self) -> str:
        return self.engine.tokenizer.decode(self.prompt_ids, skip_special_tokens=False,
                                            clean_up_tokenization_spaces=False)

    def token(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def logprobs(self, lps: list[TokenLogprob], prompt_lps: list | None, text_start: int):
        if self.top is None:
            return None
        if self.chat:
            def entry(tid, lp):
                s = self.token(tid)
                return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
            return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(i, v) for i, v in t.top]}
                                for t in lps], "refusal": None}
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = text_start
        items = ([(tid, lp) for tid, lp in zip(self.prompt_ids, prompt_lps)] if prompt_lps is not None else []) + \
            [(t.token, t) for t in lps]
        for tid, lp in items:
            s = self.token(tid)
            out["tokens"].append(s)
            out["text_offset"].append(offset)
            offset += len(s)
            if lp is None:  # the first prompt token has nothing before it
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(lp.logprob)
            top = {self.token(i): v for i, v in lp.top}
            top.setdefault(s, lp.logprob)  # OpenAI: the chosen token is always listed
            out["top_logprobs"].append(top)
        return out


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def _usage(result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.tokens,
            "total_tokens": result.prompt_tokens + result.tokens}


def _stats(result, job: Job | None = None) -> dict:
    s = result.stats()
    out = {"method": s["method"], "mean_accepted": s["mean_accepted"], "tokens_per_s": s["tokens_per_s"],
           "target_passes": s["target_passes"], "draft_share": s["draft_share"],
           "pid": os.getpid()}  # the process that answered: replicas behind a router differ
    if job is not None:
        out["queue_s"] = round(job.queue_seconds or 0.0, 4)
        out["time_to_first_token_s"] = round(job.ttft_seconds or 0.0, 4)
    return out
