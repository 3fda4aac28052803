"""OpenAI-compatible HTTP API over a `ServingEngine`: HF `BatchingEngine` or `VLLMServingEngine` (FastAPI;
`pip install coati[serve]`).

Routes: POST /v1/chat/completions, POST /v1/completions (JSON or server-sent events with `stream: true`),
GET /v1/models, GET /health. Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`,
so client libraries raise their usual exceptions (400 bad request, 401 key, 404 model, 429 busy).
Chat prompts are rendered with the training template; /v1/completions continues the raw prompt.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from coati.inference.engine import ServingEngine
from coati.inference.generation import Completion, SamplingParams, encode_chat, encode_text


@dataclass
class ServerConfig:
    model_name: str
    aliases: tuple[str, ...] = ()
    api_key: str | None = None
    prompt_template: str = "auto"
    max_prompt_tokens: int = 2048
    max_tokens_limit: int = 512
    max_concurrent: int = 64
    default_completion_tokens: int = 16  # OpenAI's default for /v1/completions
    created: int = field(default_factory=lambda: int(time.time()))


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


# request shapes (unknown OpenAI fields are accepted and ignored)
class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # extension, as in vLLM
    repetition_penalty: float = Field(1.0, gt=0.0)  # extension
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False  # extension: generate exactly max_tokens (benchmarks)


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart]

    def plain(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None


class _SlotStreamingResponse(StreamingResponse):
    """Frees the request's slot when the response ends, however it ends: a client that leaves before the
    first chunk means the body generator never starts, so its own ``finally`` cannot be relied on."""

    def __init__(self, content: AsyncIterator[str], release, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()  # a client gone mid-stream: stop its generation now
            finally:
                self._release()


class _API:
    """The OpenAI-compatible endpoints over one :class:`ServingEngine`: key check, request parsing, sampling
    limits, admission (``max_concurrent`` requests in flight, else 429) and the response shapes."""

    def __init__(self, engine: ServingEngine, config: ServerConfig) -> None:
        self.engine, self.config = engine, config
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.in_flight = 0
        self.names = {config.model_name, *config.aliases}

    def check_key(self, request: Request) -> None:
        if self.config.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), self.config.api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", "authentication_error", code="invalid_api_key")

    async def parse(self, request: Request, shape: type[BaseModel]):
        self.check_key(request)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"request body is not valid JSON: {err}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object", code="invalid_json")
        try:
            req = shape.model_validate(body)
        except ValidationError as err:
            first = err.errors()[0]
            param = ".".join(str(x) for x in first.get("loc", ())) or None
            msg = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
            raise APIError(400, msg, param=param, code="invalid_value") from None
        if req.model is not None and req.model not in self.names:
            raise APIError(404, f"The model `{req.model}` does not exist; this server serves "
                                f"`{self.config.model_name}`.", "not_found_error", "model", "model_not_found")
        if req.n != 1:
            raise APIError(400, "only n=1 is supported", param="n", code="unsupported_value")
        if getattr(req, "logprobs", None):
            raise APIError(400, "logprobs are not supported", param="logprobs", code="unsupported_value")
        return req

    def sampling(self, req: _Sampling, prompt_len: int, max_tokens: int | None, default: int) -> SamplingParams:
        config, max_model_len = self.config, self.max_model_len
        room = config.max_tokens_limit
        if max_model_len:
            room = min(room, max_model_len - prompt_len)
        if prompt_len > config.max_prompt_tokens or room < 1:
            raise APIError(400, f"prompt is {prompt_len} tokens; this server accepts at most "
                                f"{min(config.max_prompt_tokens, (max_model_len or 10**9) - 1)}",
                           param="messages" if isinstance(req, ChatRequest) else "prompt",
                           code="context_length_exceeded")
        if max_tokens is not None and max_tokens > config.max_tokens_limit:
            raise APIError(400, f"max_tokens is {max_tokens}; the limit is {config.max_tokens_limit}",
                           param="max_tokens", code="invalid_value")
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds the "
                                f"model's {max_model_len} positions", param="max_tokens",
                           code="context_length_exceeded")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        return SamplingParams(max_new_tokens=max_tokens or min(default, room), temperature=req.temperature,
                              top_p=req.top_p, top_k=req.top_k, repetition_penalty=req.repetition_penalty,
                              stop=tuple(s for s in stop if s), seed=req.seed, ignore_eos=req.ignore_eos)

    def admit(self) -> None:
        if self.in_flight >= self.config.max_concurrent:
            raise APIError(429, f"server busy: {self.config.max_concurrent} requests already in flight; retry "
                                "later", "rate_limit_error", code="too_many_requests")
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1

    @staticmethod
    async def unless_gone(request: Request, work: Awaitable[Any]) -> Any:
        """`work`'s result, unless the client disconnects first: then `work` is cancelled, which stops its
        engine rows at the next step (an answer nobody will read is not generated to its end)."""
        task, gone = asyncio.ensure_future(work), asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not task.done():
                task.cancel()
                task.add_done_callback(lambda t: t.cancelled() or t.exception())  # nothing left to report
        if task.done():
            return task.result()
        raise APIError(499, "client closed the request", code="client_closed_request")

    async def run_stream(self, prompt, params, make_chunk, include_usage: bool) -> AsyncIterator[str]:
        try:
            head = make_chunk(None, None, first=True)
            if head is not None:
                yield _sse(head)
            async for item in self.engine.stream(prompt, params):
                if isinstance(item, Completion):
                    yield _sse(make_chunk(None, item.finish_reason))
                    if include_usage:
                        yield _sse(make_chunk(None, None, usage=_usage([item])))
                elif item:
                    yield _sse(make_chunk(item, None))
            yield "data: [DONE]\n\n"
        except Exception as err:  # headers are sent already: report in-band, as OpenAI does
            yield _sse({"error": {"message": str(err), "type": "server_error", "param": None, "code": None}})

    def stream_response(self, prompt, params, chunk, req) -> StreamingResponse:
        include = bool((req.stream_options or {}).get("include_usage"))
        return _SlotStreamingResponse(self.run_stream(prompt, params, chunk, include), self.release,
                                      media_type="text/event-stream")

    # ----- endpoints ----------------------------------------------------------------------------------
    async def health(self):
        s = self.engine.stats
        return {"status": "ok", "model": self.config.model_name, "in_flight": self.in_flight,
                "queued": s.queued, "active": s.active, "requests": s.requests, "batches": s.batches,
                "max_batch": s.max_batch, "cancelled": s.cancelled, "completion_tokens": s.completion_tokens}

    async def models(self, request: Request):
        self.check_key(request)
        return {"object": "list", "data": [{"id": self.config.model_name, "object": "model",
                                             "created": self.config.created, "owned_by": "coati"}]}

    async def chat(self, request: Request):
        req: ChatRequest = await self.parse(request, ChatRequest)
        try:
            prompt = encode_chat([m.plain() for m in req.messages], self.tokenizer, self.config.prompt_template)
        except ValueError as err:
            raise APIError(400, f"cannot render messages: {err}", param="messages") from None
        params = self.sampling(req, len(prompt), req.max_completion_tokens or req.max_tokens,
                               self.config.max_tokens_limit)
        rid, created, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), req.model or self.config.model_name
        self.admit()
        if req.stream:
            def chunk(text, finish, first=False, usage=None):
                base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name}
                if usage is not None:
                    return {**base, "choices": [], "usage": usage}
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                             "finish_reason": finish}]}

            return self.stream_response(prompt, params, chunk, req)
        try:
            out = await self.unless_gone(request, self.engine.complete(prompt, params))
        finally:
            self.release()
        return {"id": rid, "object": "chat.completion", "created": created, "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                             "logprobs": None, "finish_reason": out.finish_reason}],
                "usage": _usage([out])}

    async def completions(self, request: Request):
        req: CompletionRequest = await self.parse(request, CompletionRequest)
        if req.echo:
            raise APIError(400, "echo is not supported", param="echo", code="unsupported_value")
        prompts = self._completion_prompts(req.prompt)
        params = [self.sampling(req, len(p), req.max_tokens, self.config.default_completion_tokens) for p in prompts]
        if req.stream and len(prompts) > 1:
            raise APIError(400, "streaming supports one prompt per request", param="prompt")
        rid, created, name = f"cmpl-{uuid.uuid4().hex}", int(time.time()), req.model or self.config.model_name
        self.admit()
        if req.stream:
            def chunk(text, finish, first=False, usage=None):
                base = {"id": rid, "object": "text_completion", "created": created, "model": name}
                if first:
                    return None
                if usage is not None:
                    return {**base, "choices": [], "usage": usage}
                return {**base, "choices": [{"index": 0, "text": text or "", "logprobs": None,
                                             "finish_reason": finish}]}

            return self.stream_response(prompts[0], params[0], chunk, req)
        try:
            outs = await self.unless_gone(request, asyncio.gather(
                *(self.engine.complete(p, sp) for p, sp in zip(prompts, params))))
        finally:
            self.release()
        return {"id": rid, "object": "text_completion", "created": created, "model": name,
                "choices": [{"index": i, "text": o.text, "logprobs": None, "finish_reason": o.finish_reason}
                            for i, o in enumerate(outs)],
                "usage": _usage(outs)}

    def _completion_prompts(self, raw: Any) -> list[list[int]]:
        """The request's prompts as token ids: a string, a list of ids, or a list of either."""
        if isinstance(raw, str) or (raw and all(isinstance(t, int) for t in raw)):
            raw = [raw]
        if not raw:
            raise APIError(400, "prompt is empty", param="prompt")
        prompts = [encode_text(self.tokenizer, p) if isinstance(p, str) else list(p) for p in raw]
        vocab = len(self.tokenizer)
        for p in prompts:
            if not p:
                raise APIError(400, "prompt is empty", param="prompt")
            if any(t < 0 or t >= vocab for t in p):
                raise APIError(400, "prompt token id out of the vocabulary", param="prompt")
        return prompts


async def _client_gone(request: Request) -> None:
    """Returns once the client has disconnected (the request body is read already, so nothing else comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _usage(outs: list[Completion]) -> dict[str, int]:
    p, c = sum(o.prompt_tokens for o in outs), sum(o.completion_tokens for o in outs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(engine: ServingEngine, config: ServerConfig) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the engine thread."""
    from contextlib import asynccontextmanager

    api = _API(engine, config)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="coati inference server", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), kind).response()

    app.get("/health")(api.health)
    app.get("/v1/models")(api.models)
    app.post("/v1/chat/completions")(api.chat)
    app.post("/v1/completions")(api.completions)
    return app
