"""The aiohttp application: routes, error and auth middleware, short handlers (`serve`, which
runs it: server/lifecycle.py)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.metadata
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web

from runtime.token_bytes import token_bytes
from server import protocol, responses, token_requests
from server.chat import TemplatedTokenizer
from server.cors import allow_cors, is_preflight
from server.engine_updates import Update, request_updates
from server.fields import ProtocolError, parse_body
from server.metrics import Metrics
from server.protocol import GenerateRequest, ModelInfo
from server.reasoning import ReasoningStream
from server.responses import Meta, Piece, Pieces

logger = logging.getLogger(__name__)

HEADERS_WAIT_S = 1.0  # a stream's headers wait this long at most for the engine's first word


@dataclass(frozen=True, slots=True)
class ServerConfig:
    served_model_name: str | None = None  # None: the engine's model name
    api_key: str | None = None  # guards /v1/* when set
    max_body_bytes: int = 8 << 20
    max_n: int = 16
    tool_call_parser: str | None = None  # reads the model's calls for tool_choice "auto"
    reasoning_parser: str | None = None  # splits chat outputs' thinking off (server/reasoning.py)
    # vLLM's --enable-prompt-tokens-details: usage.prompt_tokens_details.cached_tokens
    enable_prompt_tokens_details: bool = False
    chat_template: str | None = None  # the template's text, in place of the tokenizer's
    # CORS, as vLLM's --allowed-origins etc.: "*" is any; no origins, no CORS
    allowed_origins: tuple[str, ...] = ("*",)
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False


@dataclass(slots=True)
class State:
    """Per-app state; `draining` flips once on shutdown."""

    engine: Any
    config: ServerConfig
    info: ModelInfo
    metrics: Metrics
    created: int
    draining: bool = False

    def token_text(self, token: int) -> str:
        tokenizer = self.info.tokenizer
        return f"token_id:{token}" if tokenizer is None else tokenizer.decode([token])

    def token_bytes(self, token: int, skip_special_tokens: bool) -> bytes:
        """The token's raw UTF-8 bytes; none without a tokenizer (the text is empty then)."""
        tokenizer = self.info.tokenizer
        return b"" if tokenizer is None else token_bytes(tokenizer, token, skip_special_tokens)


STATE = web.AppKey("state", State)


def create_app(engine: Any, config: ServerConfig) -> web.Application:
    name = config.served_model_name or engine.model_name
    info = ModelInfo(
        name=name,
        max_model_len=engine.max_model_len,
        vocab_size=engine.vocab_size,
        tokenizer=_tokenizer(engine.tokenizer, config.chat_template),
        default_params=dict(engine.default_params),
        max_n=config.max_n,
        tool_call_parser=config.tool_call_parser,
        priority_scheduling=engine.scheduling_policy == "priority",
        reasoning_parser=config.reasoning_parser,
    )
    app = web.Application(middlewares=[_errors, _gate], client_max_size=config.max_body_bytes)
    app[STATE] = State(engine, config, info, Metrics(engine, name), int(time.time()))
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/models/{model:.+}", _model)  # a name may hold "/": org/model
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/tokenize", _tokenize)
    app.router.add_post("/detokenize", _detokenize)
    app.router.add_get("/health", _health)
    app.router.add_route("GET", "/ping", _health)  # vLLM's (SageMaker's) name for /health
    app.router.add_route("POST", "/ping", _health)
    app.router.add_get("/version", _version)
    app.router.add_get("/metrics", _metrics)
    allow_cors(app, config.allowed_origins, config.allowed_methods, config.allowed_headers,
               config.allow_credentials)  # fmt: skip
    return app


def _tokenizer(tokenizer: Any, chat_template: str | None) -> Any:
    """The tokenizer requests use: the engine's, with `chat_template` in place of its own."""
    if chat_template is None:
        return tokenizer
    if tokenizer is None:
        raise ValueError("a chat template needs a tokenizer, and this model has none")
    logger.info("chat requests use the given chat template, not the tokenizer's")
    return TemplatedTokenizer(tokenizer, chat_template)


def _error_body(exc: ProtocolError) -> dict:
    return responses.error_body(exc.status, exc.message, exc.type, exc.param)


def _error_response(exc: ProtocolError, allow: str | None = None) -> web.Response:
    headers = {"Allow": allow} if allow else None
    return web.json_response(_error_body(exc), status=exc.status, headers=headers)


def _unexpected(exc: Exception, request: web.Request) -> ProtocolError:
    if isinstance(exc, ProtocolError):
        return exc
    logger.error("unexpected error on %s %s", request.method, request.path, exc_info=exc)
    return ProtocolError(500, "internal server error")


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every error leaves as an OpenAI error body; the traceback stays in the server log."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # their own words: a body too large, a CORS preflight refused (and why)
        said = exc.status in (403, 413)
        message = exc.text if said else f"{exc.reason}: {request.method} {request.path}"
        return _error_response(ProtocolError(exc.status, message), exc.headers.get("Allow"))
    except ConnectionResetError:
        raise  # the client is gone: nobody to answer
    except Exception as exc:
        return _error_response(_unexpected(exc, request))


@web.middleware
async def _gate(request: web.Request, handler: Any) -> web.StreamResponse:
    """503 while draining, 401 without the API key on /v1/*; a CORS preflight passes: it
    carries no key, and a refused one would hide the real request's status from the page."""
    if is_preflight(request):
        return await handler(request)
    state = request.app[STATE]
    if state.draining and request.path != "/metrics":
        raise ProtocolError(503, "the server is shutting down")
    key = state.config.api_key
    guarded = request.path == "/v1" or request.path.startswith("/v1/")
    if key is not None and guarded and not _authorized(request.headers.get("Authorization"), key):
        raise ProtocolError(401, "invalid or missing API key")
    return await handler(request)


def _authorized(header: str | None, key: str) -> bool:
    scheme, _, token = (header or "").partition(" ")
    # compare_digest: the time taken does not reveal how much of the key matched
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


async def _read_json(request: web.Request) -> dict[str, Any]:
    return parse_body(request.content_type, await request.read())


async def _models(request: web.Request) -> web.Response:
    s = request.app[STATE]
    return web.json_response(responses.model_list(s.info.name, s.info.max_model_len, s.created))


async def _model(request: web.Request) -> web.Response:
    s = request.app[STATE]
    protocol.check_model({"model": request.match_info["model"]}, s.info)  # else the 404
    return web.json_response(responses.model_card(s.info.name, s.info.max_model_len, s.created))


async def _completions(request: web.Request) -> web.StreamResponse:
    info = request.app[STATE].info
    return await _generate(request, protocol.parse_completion(await _read_json(request), info))


async def _chat(request: web.Request) -> web.StreamResponse:
    info = request.app[STATE].info
    return await _generate(request, protocol.parse_chat(await _read_json(request), info))


async def _tokenize(request: web.Request) -> web.Response:
    info = request.app[STATE].info
    req = token_requests.parse_tokenize(await _read_json(request), info)
    ids = req.token_ids
    body = {"count": len(ids), "max_model_len": info.max_model_len, "tokens": ids}
    if req.token_strs:  # the tokenizer's own strings ("Ġquick"), as vLLM's
        body["token_strs"] = info.tokenizer.convert_ids_to_tokens(ids)
    return web.json_response(body)


async def _detokenize(request: web.Request) -> web.Response:
    info = request.app[STATE].info
    ids = token_requests.parse_detokenize(await _read_json(request), info)
    return web.json_response({"prompt": info.tokenizer.decode(ids)})


async def _health(request: web.Request) -> web.Response:
    if not request.app[STATE].engine.is_alive:
        raise ProtocolError(503, "the engine is not running")
    return web.Response()


async def _version(request: web.Request) -> web.Response:
    return web.json_response({"version": _kiln_version()})


def _kiln_version() -> str:
    """The installed kiln-llm's version ("unknown" in a tree run without installing it)."""
    try:
        return importlib.metadata.version("kiln-llm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


async def _metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[STATE].metrics.render(request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _generate(request: web.Request, req: GenerateRequest) -> web.StreamResponse:
    state = request.app[STATE]
    if not state.engine.is_alive:
        raise ProtocolError(503, "the engine is not running")
    prefix = "chatcmpl" if req.chat else "cmpl"
    meta = Meta(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), state.info.name, req.chat)
    cached = state.config.enable_prompt_tokens_details
    pieces = Pieces(req, state.token_text, state.token_bytes, cached)
    updates = request_updates(state.engine, state.metrics, meta.id, req)
    async with contextlib.aclosing(updates):
        if not req.stream:
            return await _collect(meta, pieces, updates)
        # the headers wait for the engine's first word up to HEADERS_WAIT_S, so a refused
        # request gets its own status; one that waits longer (queued, its grammar compiling)
        # gets them then, as vLLM sends them at once, and what comes after as chunks
        first = asyncio.ensure_future(anext(updates, None))
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(first), HEADERS_WAIT_S)
            if first.done():
                first.result()  # a refusal raises here, before any header is sent
            return await _stream(request, meta, pieces, first, updates)
        finally:  # the client left before the first update: stop waiting for it
            if not first.done():
                first.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await first


async def _collect(meta: Meta, pieces: Pieces, updates: AsyncIterator[Update]) -> web.Response:
    got: defaultdict[int, list[Piece]] = defaultdict(list)
    async for update in updates:
        for piece in pieces.of(*update):
            got[piece.index].append(piece)
    total = len(pieces.req.prompts) * pieces.req.n
    req = pieces.req
    choices = [
        responses.choice(meta, responses.join(k, got[k]), req.tool_choice, req.reasoning)
        for k in range(total)
    ]
    body = responses.body(meta, choices, pieces.usage(), _chat_prompt_ids(req))
    if req.prompt_logprobs is not None:
        scored = [pieces.prompt_logprobs(i) for i in range(len(req.prompts))]
        if req.chat:  # its one prompt's, at the top, as in vLLM
            body["prompt_logprobs"] = scored[0]
        else:
            for c in choices:
                c["prompt_logprobs"] = scored[c["index"] // req.n]
    return web.json_response(body)


def _chat_prompt_ids(req: GenerateRequest) -> tuple[int, ...] | None:
    """A chat response's prompt token ids, at its top level, when the request asks for them."""
    return req.prompts[0].token_ids if req.chat and req.return_token_ids else None


def _split(stream: ReasoningStream, text: str, finished: bool) -> tuple[str, str]:
    """A delta's (thinking, answer), with what the stream holds once the choice finishes."""
    thought, answer = stream.feed(text)
    if finished:
        rest = stream.finish()
        thought, answer = thought + rest[0], answer + rest[1]
    return thought, answer


async def _stream(
    request: web.Request,
    meta: Meta,
    pieces: Pieces,
    first: asyncio.Future[Update | None],
    updates: AsyncIterator[Update],
) -> web.StreamResponse:
    req = pieces.req
    headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)

    calls = req.tool_choice.stream() if req.tool_choice is not None else None
    thinking = defaultdict(req.reasoning.stream) if req.reasoning is not None else None

    async def send(update: Update) -> None:
        for p in pieces.of(*update):
            delta, text, finished = None, p.text, p.finish_reason is not None
            if thinking is not None:  # the thinking is its own field; the rest goes on
                thought, text = _split(thinking[p.index], text, finished)
                delta = {"reasoning_content": thought} if thought else {}
                delta |= {"content": text} if text and calls is None else {}
            if calls is not None:
                tool_delta, called = calls.delta(p.index, text, finished)
                delta = (delta or {}) | tool_delta
                p = replace(p, finish_reason=req.tool_choice.finish_reason(p.finish_reason, called))
            shown = (p.text if delta is None else delta) or p.logprobs or p.finish_reason
            if shown or p.token_ids:  # tokens the text holds back still show their ids
                usage = pieces.usage() if req.continuous_usage else None
                chunk = responses.chunk(meta, p, req.include_usage, delta=delta, usage=usage)
                await response.write(responses.sse(chunk))

    try:
        if meta.chat:  # each choice's first chunk: its role (and the prompt's ids, as vLLM)
            prompt_ids = _chat_prompt_ids(req)
            for k in range(len(req.prompts) * req.n):
                piece = Piece(k, "", None, None)
                usage = pieces.usage() if req.continuous_usage else None
                role = responses.chunk(
                    meta, piece, req.include_usage, role=True, prompt_ids=prompt_ids, usage=usage
                )
                await response.write(responses.sse(role))
        if (update := await first) is not None:
            await send(update)
        async for update in updates:
            await send(update)
        if req.include_usage:
            await response.write(responses.sse(responses.usage_chunk(meta, pieces.usage())))
    except ConnectionResetError:
        raise
    except Exception as exc:
        await response.write(responses.sse(_error_body(_unexpected(exc, request))))
    await response.write(responses.DONE)
    return response
