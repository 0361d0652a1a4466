"""The HTTP application (FastAPI on Starlette; the `serve` extra): OpenAI's routes over a `Service`.

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models   GET /v1/models/{id}   GET /health
    GET /tokenizer_info   POST /tokenize   POST /detokenize      (vLLM's, which lm-eval's remote tokenizer uses)

Bodies are read and checked by `protocol` (never by FastAPI's validation: no bare 422); every error is OpenAI's
`{"error": {...}}` with its status: 400 a malformed or too long request, 404 an unknown model or route, 429 a
full queue (with Retry-After), 503 while the model loads or the server shuts down, 500 a failure inside.
`stream: true` answers with server-sent events (`data: {...}` chunks, then `data: [DONE]`). A client that
disconnects cancels its request: a stream when the connection closes, a plain request at the next check
(every `DISCONNECT_POLL` seconds); the engine frees the slot before its next decode chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import protocol
from .protocol import ApiError
from .service import Service

DISCONNECT_POLL = 0.25  # seconds between checks that a waiting client is still there


class Holder:
    """The service, once loaded (the app answers 503 until then); `error`: why loading failed."""

    def __init__(self):
        self.service: Service | None = None
        self.error: BaseException | None = None
        self.status = "loading"


def create_app(service: Service | None = None, *, loader: Callable[[], Service] | None = None,
               on_ready: Callable[[Service], None] | None = None) -> FastAPI:
    """The app over a ready `service` (the caller's to close), or over one `loader()` builds in a thread at
    startup (503 meanwhile; shutting the app down drains its engine: running and queued requests finish first)."""
    holder = Holder()
    if service is not None:
        holder.service, holder.status = service, "ready"

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if loader is not None and holder.service is None:
            def load() -> None:
                try:
                    holder.service = loader()
                    holder.status = "ready"
                    if on_ready is not None:
                        on_ready(holder.service)
                except BaseException as e:  # noqa: BLE001 (reported by /health and every request)
                    holder.error, holder.status = e, "failed"
            threading.Thread(target=load, name="gemma4-eqx-loader", daemon=True).start()
        yield
        if loader is not None and holder.service is not None:  # a service it loaded: drained and stopped
            await asyncio.to_thread(holder.service.close, True)

    app = FastAPI(title="gemma4-eqx", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.holder = holder

    def ready() -> Service:
        if holder.service is not None:
            return holder.service
        if holder.error is not None:
            raise ApiError(503, f"The model failed to load: {type(holder.error).__name__}: {holder.error}",
                           type="service_unavailable", code="load_failed")
        raise ApiError(503, "The model is loading; retry in a few seconds", type="service_unavailable",
                       code="loading", headers={"Retry-After": "2"})

    async def body_of(request: Request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"The body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The body must be a JSON object")
        return body

    def check_model(svc: Service, model: str | None) -> None:
        if model is not None and model != svc.name:
            raise ApiError(404, f"The model {model!r} does not exist; this server serves {svc.name!r}",
                           type="invalid_request_error", param="model", code="model_not_found")

    # ---- errors in OpenAI's shape ----------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(protocol.error_body(f"{param or 'body'}: {first.get('msg', 'invalid request')}",
                                                "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(protocol.error_body(message, kind), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse(protocol.error_body(f"Internal error: {type(e).__name__}: {e}", "internal_server_error"),
                            status_code=500)

    # ---- routes ------------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> JSONResponse:
        svc = holder.service
        body = {"status": holder.status}
        if svc is not None:
            body.update(model=svc.name, slots=svc.engine.slots, running=svc.engine.running,
                        waiting=svc.engine.waiting, max_context=svc.max_context)
        if holder.error is not None:
            body["error"] = f"{type(holder.error).__name__}: {holder.error}"
        return JSONResponse(body, status_code=200 if svc is not None else 503)

    def model_card(svc: Service) -> dict:
        return {"id": svc.name, "object": "model", "created": svc.created, "owned_by": "gemma4-eqx",
                "max_model_len": svc.max_context}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card(ready())]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict:
        svc = ready()
        check_model(svc, model)
        return model_card(svc)

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        svc = ready()
        tok = svc.tokenizer
        return {"tokenizer_class": "GemmaTokenizer", "bos_token": tok.bos_token, "eos_token": tok.eos_token,
                "pad_token": tok.pad_token, "chat_template": svc.processor.chat_template,
                "model_max_length": svc.max_context}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        svc = ready()
        body = await body_of(request)
        add = protocol.get_bool(body, "add_special_tokens", True)
        if "messages" in body:
            req = protocol.read_chat({"messages": body["messages"]}, allow_files=svc.allow_files)
            ids, _ = await asyncio.to_thread(svc.render_chat, req)
            tokens = [int(t) for t in ids]
        else:
            prompt = protocol.get_str(body, "prompt")
            if prompt is None:
                raise protocol.bad("prompt", "expected a string (or give messages)")
            tokens = svc.tokenizer.encode(prompt, add_special_tokens=add)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": svc.max_context}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        svc = ready()
        body = await body_of(request)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) and
                                                   0 <= t < svc.vocab for t in tokens):
            raise protocol.bad("tokens", f"expected a list of token ids in [0, {svc.vocab})")
        return {"prompt": svc.tokenizer.decode(tokens, skip_special_tokens=False)}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        svc = ready()
        body = await body_of(request)
        req = await asyncio.to_thread(protocol.read_chat, body, allow_files=svc.allow_files)
        check_model(svc, req.model)
        if req.stream:
            n_prompt, events, _ = await svc.chat_events(req)
            return sse(svc.chat_stream(req, n_prompt, events))
        return await until_disconnected(request, svc.chat(req))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        svc = ready()
        body = await body_of(request)
        req = protocol.read_completion(body, svc.vocab)
        check_model(svc, req.model)
        if req.stream:
            return sse(await svc.complete_stream(req))
        return await until_disconnected(request, svc.complete(req))

    return app


async def until_disconnected(request: Request, work) -> Response:
    """Await `work` (a coroutine returning the JSON body); if the client goes away first, cancel it (its engine
    requests are cancelled: their slots are freed)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL)
            if done:
                return JSONResponse(task.result())
            if await request.is_disconnected():
                task.cancel()
                return Response(status_code=499)
    finally:
        if not task.done():
            task.cancel()


def sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    """Server-sent events: each chunk as `data: <json>`, then `data: [DONE]`; an error after the first chunk is
    sent as a `data: {"error": ...}` event (the openai client raises it)."""

    async def events() -> AsyncIterator[str]:
        try:
            async with contextlib.aclosing(chunks) as source:
                async for chunk in source:
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except ApiError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
