"""The OpenAI-compatible door: `POST /v1/chat/completions`, `POST /v1/completions`,
`GET /v1/models[/{model}]`, on the same engine, registry, keys and quotas as gRPC; and vLLM's
operational routes beside them (`/health`, `/metrics`, `/version`, `/tokenize`, `/detokenize`:
server.http.ops).

A Starlette app; uvicorn serves it on the gRPC server's event loop (`server.http.door`). Per call:
authenticate (`Authorization: Bearer <key>`, the same Authenticator), read the body within its
limits (`body`: bytes, bytes buffered by all requests, JSON depth and items, before any parsing),
parse it (`schema`) into the domain request, which the one generation path (`Generation.submit` /
`Generation.events`) that the gRPC servicer uses validates; its errors name OpenAI's fields.

`model` is the base model's name or an adapter reference in the caller's namespace (`name`,
`name@N`, `shared/name`); an adapter of another tenant is the same 404 as one nobody has.

Errors are OpenAI's JSON shape `{"error": {"message", "type", "param", "code"}}` with the HTTP
status of our gRPC code (`ERRORS`); a bug is a 500 that names only the exception type.

`n` choices (and, in /v1/completions, a list of prompts: n choices each) are one sequence each; a
whole answer lists them by `index` (prompt * n + choice, as OpenAI numbers them), a stream sends
each choice's first chunk, then chunks of whichever choice has new text, each naming its `index`.
`usage` counts each prompt once and every choice's completion. Logprobs, when asked, are the
model's own (log_softmax of the raw logits: `server.engine.sampling`), constrained requests included.

With tools offered (tool_choice not `none`), each choice's text is read for tool calls
(`server.api.tools.parse_calls`): found, the message has `tool_calls` (`call_...` ids, arguments as
JSON text), content null (or the text around `<tool_call>` blocks) and finish_reason `tool_calls`.
A stream with tools holds each choice's text back until the choice ends (the text is either a call or
content), then sends OpenAI's deltas: per call a `delta.tool_calls[{index, id, type, function: {name,
arguments: ""}}]` chunk and one with its arguments, or the content; then the finish.

A client that goes away cancels its sequences, which frees their engine slots: while a request waits
for its first event (every request) or its whole answer (non-streaming), a watcher reads the ASGI
`receive` channel for `http.disconnect`; while a stream is being sent, Starlette's own watch ends
the stream and the response closes the event iterator, whose `finally` cancels the sequence.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, TypeVar

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from server import metrics
from server import errors as e
from server.adapters.refs import SHARED_TENANT, TenantRef, parse_tenant_ref
from server.adapters.registry import AdapterRegistry
from server.api.auth import Authenticator, Principal
from server.api.common import MAX_FIELD_CHARS, OVERLOAD_DELAY_S, bounded, log_failure, public_message, status_of
from server.api.generation import Generation, Submission
from server.api.health import Health
from server.api.token_text import TokenText
from server.api.tools import ToolCall, Tools, parse_calls
from server.config import ServerConfig
from server.engine.sampling import TokenLogprobs
from server.engine.sequence import Event, FinishEvent, FinishReason
from server.http import schema
from server.http.body import BodyBudget, BodyLimits, BodyTooLarge, read_json
from server.http.ops import OpsRoutes

T = TypeVar("T")

# gRPC code name -> (HTTP status, OpenAI error type)
ERRORS: dict[str, tuple[int, str]] = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "FAILED_PRECONDITION": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (403, "permission_error"),
    "NOT_FOUND": (404, "not_found_error"),
    "ALREADY_EXISTS": (409, "invalid_request_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "CANCELLED": (499, "invalid_request_error"),
    "UNAVAILABLE": (503, "service_unavailable_error"),
    "DEADLINE_EXCEEDED": (504, "timeout_error"),
    "DATA_LOSS": (500, "server_error"),
    "INTERNAL": (500, "server_error"),
}
FINISH = {FinishReason.LENGTH: "length", FinishReason.STOP: "stop", FinishReason.EOS: "stop"}


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


def error_body(err: BaseException) -> tuple[int, dict, dict[str, str]]:
    """(HTTP status, OpenAI error JSON, extra headers) for any exception."""
    code = status_of(err).name
    status, kind = ERRORS.get(code, (500, "server_error"))
    param = bounded(err.field, MAX_FIELD_CHARS) if isinstance(err, e.InvalidField) else None
    message = public_message(err)
    detail, headers = None, {}
    if isinstance(err, BodyTooLarge):
        status, detail = 413, "request_too_large"
    elif isinstance(err, e.QuotaExceeded):
        detail, headers = err.quota, {"Retry-After": "1"}
    elif status == 429:
        detail, headers = "rate_limit_exceeded", {"Retry-After": "1"}
    elif status == 503:
        headers = {"Retry-After": "1"}
    elif status == 401:
        detail, headers = "invalid_api_key", {"WWW-Authenticate": "Bearer"}
    elif status == 404:
        detail = "model_not_found"
    return status, {"error": {"message": message, "type": kind, "param": param, "code": detail}}, headers


async def error_response(method: str, err: BaseException) -> JSONResponse:
    status, body, headers = error_body(err)
    metrics.REQUESTS.labels(method, status_of(err).name, "http").inc()
    log_failure(method, err)
    if status == 429 and not isinstance(err, BodyTooLarge):
        await asyncio.sleep(OVERLOAD_DELAY_S)      # the same server-side back-off as gRPC's
    return JSONResponse(body, status, headers)


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_gone(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or ClientGone (with `work` cancelled) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)   # its finally cancels the sequence
    if task.cancelled():
        raise ClientGone()
    return task.result()


class EventStream(StreamingResponse):
    """SSE that closes its chunk iterator and then `close()` (the engine events, whose finally
    cancels an unfinished sequence) however the response ends, client gone included."""

    def __init__(self, body: AsyncIterator[str], close: Callable[[], Awaitable[None]]):
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.close = close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except (ClientDisconnect, OSError):
            pass
        finally:
            await self.body_iterator.aclose()
            await self.close()


def sse(doc: dict | str) -> str:
    return f"data: {doc if isinstance(doc, str) else json.dumps(doc, separators=(',', ':'))}\n\n"


class OpenAIApp:
    """Holds what the routes need; `app` is the ASGI application."""

    def __init__(self, gen: Generation, auth: Authenticator, registry: AdapterRegistry, model_name: str,
                 cfg: ServerConfig, health: Health):
        self.gen, self.auth, self.registry, self.model_name = gen, auth, registry, model_name
        self.body_limits = BodyLimits(cfg.max_message_bytes, cfg.max_json_depth, cfg.max_json_items)
        self.bodies = BodyBudget(cfg.http_max_buffered_bytes)
        self.max_entries = {"messages": cfg.max_chat_messages, "stop": cfg.max_stop_strings,
                            "logit_bias": cfg.max_logit_bias, "prompt": cfg.max_choices, "tools": cfg.max_tools}
        self.token_text = TokenText(gen.tokenizer)
        self.created = int(time.time())
        ops = OpsRoutes(gen, health, cfg, self._check_model, self.body_limits, self.bodies, error_body)
        self.app = Starlette(routes=ops.routes(self._handler) + [
            Route("/v1/chat/completions", self._handler("ChatCompletions", self.chat), methods=["POST"]),
            Route("/v1/completions", self._handler("Completions", self.completions), methods=["POST"]),
            Route("/v1/models", self._handler("ListModels", self.list_models), methods=["GET"]),
            Route("/v1/models/{model:path}", self._handler("RetrieveModel", self.retrieve_model), methods=["GET"]),
        ], exception_handlers={HTTPException: self._http_error})

    @staticmethod
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        """Starlette's own refusals (unknown path, wrong method) in the OpenAI shape."""
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}},
                            exc.status_code)

    def _handler(self, method: str, fn: Callable[[Request, Principal], Awaitable[Response]]):
        async def endpoint(request: Request) -> Response:
            try:
                principal = self.auth.principal(
                    [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in request.headers.raw])
                return await fn(request, principal)
            except (ClientGone, ClientDisconnect):
                metrics.REQUESTS.labels(method, "CANCELLED", "http").inc()
                return Response(status_code=499)
            except Exception as err:  # noqa: BLE001 - mapped to a status, bugs to 500
                return await error_response(method, err)
        return endpoint

    # ---------------------------------------------------------------- models
    def _model(self, id_: str, owner: str) -> dict:
        return {"id": id_, "object": "model", "created": self.created, "owned_by": owner}

    async def list_models(self, request: Request, principal: Principal) -> Response:
        """The base model, then the caller's adapters, then shared ones (latest versions;
        `name@N` pins an older one)."""
        data = [self._model(self.model_name, "lorafleet")]
        for tenant, prefix in ((principal.tenant, ""), (SHARED_TENANT, SHARED_TENANT + "/")):
            names = dict.fromkeys(i.name for i in self.registry.list(tenant))
            data += [self._model(prefix + n, tenant) for n in names]
        metrics.REQUESTS.labels("ListModels", "OK", "http").inc()
        return JSONResponse({"object": "list", "data": data})

    async def retrieve_model(self, request: Request, principal: Principal) -> Response:
        model = request.path_params["model"]
        if model == self.model_name:
            doc = self._model(model, "lorafleet")
        else:
            info = self.registry.info(self._ref(principal, model))
            doc = self._model(model, info.tenant)
        metrics.REQUESTS.labels("RetrieveModel", "OK", "http").inc()
        return JSONResponse(doc)

    def _ref(self, principal: Principal, model: str):
        try:
            return parse_tenant_ref(principal.tenant, model)
        except e.InvalidArgument:
            raise e.NotFound(f"model {model[:80]!r} not found: use {self.model_name!r} (the base model) or "
                             "one of your adapters (GET /v1/models)") from None

    def _check_model(self, principal: Principal, model: str) -> None:
        """NotFound unless `model` is the base model or an adapter the caller may use."""
        if model != self.model_name:
            self.registry.info(self._ref(principal, model))

    def _adapter(self, principal: Principal, model: str) -> TenantRef | None:
        """`model` as the request's adapter: None for the base model."""
        return None if model == self.model_name else self._ref(principal, model)

    # ---------------------------------------------------------------- generation
    async def chat(self, request: Request, principal: Principal) -> Response:
        req = await self._parse(request, schema.ChatRequest)
        fmt = ChatFormat(req.model, self.token_text, req.top_logprobs_k() is not None, req.domain_tools())
        return await self._generate(request, principal, req, "ChatCompletions", fmt)

    async def completions(self, request: Request, principal: Principal) -> Response:
        req = await self._parse(request, schema.CompletionRequest)
        fmt = CompletionFormat(req.model, self.token_text, req.top_logprobs_k() is not None)
        return await self._generate(request, principal, req, "Completions", fmt)

    async def _parse(self, request: Request, model: type):
        return schema.parse(model, await read_json(request, self.body_limits, self.bodies), self.max_entries)

    async def _generate(self, request: Request, principal: Principal, req, method: str, fmt) -> Response:
        rid = uuid.uuid4().hex
        sub = await self.gen.submit(principal, req.to_domain(self._adapter(principal, req.model)), None)
        agen = self.gen.events(sub, "http")
        try:
            if not req.stream:
                choices = await unless_gone(request, _collect(agen, len(sub.seqs)))
                metrics.REQUESTS.labels(method, "OK", "http").inc()
                return JSONResponse(fmt.whole(rid, choices, usage(choices, sub.n)))
            first = await unless_gone(request, agen.__anext__())
        except BaseException:
            # the events generator may never have started (so its finally never runs): both are idempotent
            self.gen.close(sub)
            raise
        return EventStream(_stream(fmt, rid, first, agen, req.include_usage, method, sub), agen.aclose)


@dataclass
class Choice:
    """One choice of a whole (non-streamed) answer, collected from its events."""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    final: FinishEvent | None = None


async def _collect(agen: AsyncIterator[tuple[int, Event]], count: int) -> list[Choice]:
    choices = [Choice() for _ in range(count)]
    async for index, ev in agen:
        c = choices[index]
        c.text += ev.text
        c.token_ids.extend(ev.token_ids)
        c.logprobs.extend(ev.logprobs)
        if isinstance(ev, FinishEvent):
            c.final = ev
    return choices


async def _stream(fmt, rid: str, first: tuple[int, Event], agen: AsyncIterator[tuple[int, Event]],
                  include_usage: bool, method: str, sub: Submission) -> AsyncIterator[str]:
    """SSE chunks: a first one per choice, then one per event of any choice (`index` says which), then
    (with include_usage) the usage, then `data: [DONE]`; an error after the headers went out is one
    `data: {"error": ...}` event. The finally closes `agen`, which cancels unfinished sequences."""
    code = "CANCELLED"
    try:
        for index in range(len(sub.seqs)):
            yield sse(fmt.head(rid, index, include_usage))
        finals: list[Choice] = [Choice() for _ in sub.seqs]
        left = len(sub.seqs)
        index, ev = first
        while True:
            for doc in fmt.chunks(rid, index, ev, include_usage):
                yield sse(doc)
            if isinstance(ev, FinishEvent):
                finals[index].final = ev
                left -= 1
                if not left:
                    break
            index, ev = await agen.__anext__()
        if include_usage:
            yield sse(fmt.usage_chunk(rid, usage(finals, sub.n)))
        yield sse("[DONE]")
        code = "OK"
    except Exception as err:  # noqa: BLE001 - the status line is sent; report in the stream
        code = status_of(err).name
        log_failure(f"{method} (mid-stream)", err)
        yield sse(error_body(err)[1])
    finally:
        metrics.REQUESTS.labels(method, code, "http").inc()
        await agen.aclose()


def usage(choices: list[Choice], n: int) -> dict:
    """Each prompt's tokens once (choices come n per prompt), every choice's completion tokens."""
    prompt = sum(c.final.prompt_tokens for c in choices[::n])
    completion = sum(c.final.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(ev: Event) -> str | None:
    return FINISH.get(ev.reason, "stop") if isinstance(ev, FinishEvent) else None


class ChatFormat:
    """chat.completion / chat.completion.chunk objects; `logprobs` in OpenAI's chat shape
    ({"content": [{"token", "logprob", "bytes", "top_logprobs"}]}) when the request asked; tool
    calls read out of the text when tools are offered (the module docstring)."""

    def __init__(self, model: str, text: TokenText, logprobs: bool = False, tools: Tools | None = None):
        self.model, self.created, self.text, self.logprobs = model, int(time.time()), text, logprobs
        self.tools = tools if tools is not None and tools.active else None
        self.held: dict[int, Choice] = {}          # choice -> its text held back (a stream with tools)

    def _obj(self, rid: str, kind: str, choices: list, **kw) -> dict:
        return {"id": f"chatcmpl-{rid}", "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices, **kw}

    def _entry(self, token: int, logprob: float) -> dict:
        text, raw = self.text(token)
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    def _logprobs(self, lps) -> dict | None:
        if not self.logprobs:
            return None
        return {"content": [{**self._entry(lp.token, lp.logprob),
                             "top_logprobs": [self._entry(t, v) for t, v in lp.top]} for lp in lps],
                "refusal": None}

    def _calls(self, text: str, final: FinishEvent | None) -> tuple[str, list[ToolCall]]:
        if self.tools is None or final is None or final.reason is FinishReason.LENGTH:
            return text, []
        return parse_calls(text, self.tools)

    def whole(self, rid: str, choices: list[Choice], use: dict) -> dict:
        out = []
        for i, c in enumerate(choices):
            content, calls = self._calls(c.text, c.final)
            message = {"role": "assistant", "content": content if not calls else (content or None)}
            if calls:
                message["tool_calls"] = [{"id": t.id, "type": "function",
                                          "function": {"name": t.name, "arguments": t.arguments}} for t in calls]
            out.append({"index": i, "message": message, "logprobs": self._logprobs(c.logprobs),
                        "finish_reason": "tool_calls" if calls else finish_reason(c.final)})
        return self._obj(rid, "chat.completion", out, usage=use)

    def _chunk(self, rid: str, index: int, delta: dict, logprobs: dict | None, reason: str | None,
               include_usage: bool) -> dict:
        extra = {"usage": None} if include_usage else {}
        return self._obj(rid, "chat.completion.chunk",
                         [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}], **extra)

    def head(self, rid: str, index: int, include_usage: bool) -> dict:
        return self._chunk(rid, index, {"role": "assistant", "content": ""}, None, None, include_usage)

    def chunks(self, rid: str, index: int, ev: Event, include_usage: bool) -> list[dict]:
        """The chunks to send for one event (none while a stream with tools holds the text back)."""
        if self.tools is not None:
            return self._held_chunks(rid, index, ev, include_usage)
        if not ev.text and not isinstance(ev, FinishEvent):
            return []
        return [self._chunk(rid, index, {"content": ev.text} if ev.text else {}, self._logprobs(ev.logprobs),
                            finish_reason(ev), include_usage)]

    def _held_chunks(self, rid: str, index: int, ev: Event, include_usage: bool) -> list[dict]:
        held = self.held.setdefault(index, Choice())
        held.text += ev.text
        held.logprobs.extend(ev.logprobs)
        if not isinstance(ev, FinishEvent):
            return []
        content, calls = self._calls(held.text, ev)
        out = []
        if content:
            out.append(self._chunk(rid, index, {"content": content}, None, None, include_usage))
        for k, t in enumerate(calls):
            out.append(self._chunk(rid, index, {"tool_calls": [{"index": k, "id": t.id, "type": "function",
                                                                "function": {"name": t.name, "arguments": ""}}]},
                                   None, None, include_usage))
            out.append(self._chunk(rid, index, {"tool_calls": [{"index": k, "function": {"arguments": t.arguments}}]},
                                   None, None, include_usage))
        out.append(self._chunk(rid, index, {}, self._logprobs(held.logprobs),
                               "tool_calls" if calls else finish_reason(ev), include_usage))
        return out

    def usage_chunk(self, rid: str, use: dict) -> dict:
        return self._obj(rid, "chat.completion.chunk", [], usage=use)


class CompletionFormat:
    """text_completion objects (streamed as text_completion chunks too, as OpenAI does); `logprobs`
    in the legacy shape ({"tokens", "token_logprobs", "top_logprobs", "text_offset"}; each
    top_logprobs entry maps the k most likely tokens' text, and the sampled token's, to their
    logprobs, as vLLM does) when the request asked."""

    def __init__(self, model: str, text: TokenText, logprobs: bool = False):
        self.model, self.created, self.text, self.logprobs = model, int(time.time()), text, logprobs
        self.offsets: dict[int, int] = {}       # choice -> characters of token text sent so far

    def _obj(self, rid: str, choices: list, **kw) -> dict:
        return {"id": f"cmpl-{rid}", "object": "text_completion", "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices, **kw}

    def _logprobs(self, index: int, lps) -> dict | None:
        if not self.logprobs:
            return None
        tokens, offsets, top = [], [], []
        offset = self.offsets.get(index, 0)
        for lp in lps:
            text = self.text(lp.token)[0]
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
            alternatives = {self.text(t)[0]: v for t, v in lp.top}
            alternatives.setdefault(text, lp.logprob)
            top.append(alternatives)
        self.offsets[index] = offset
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps], "top_logprobs": top,
                "text_offset": offsets}

    def _choice(self, index: int, text: str, lps, reason: str | None) -> dict:
        return {"index": index, "text": text, "logprobs": self._logprobs(index, lps), "finish_reason": reason}

    def whole(self, rid: str, choices: list[Choice], use: dict) -> dict:
        return self._obj(rid, [self._choice(i, c.text, c.logprobs, finish_reason(c.final))
                               for i, c in enumerate(choices)], usage=use)

    def head(self, rid: str, index: int, include_usage: bool) -> dict:
        return self._obj(rid, [self._choice(index, "", (), None)], **({"usage": None} if include_usage else {}))

    def chunks(self, rid: str, index: int, ev: Event, include_usage: bool) -> list[dict]:
        if not ev.text and not isinstance(ev, FinishEvent):
            return []
        return [self._obj(rid, [self._choice(index, ev.text, ev.logprobs, finish_reason(ev))],
                          **({"usage": None} if include_usage else {}))]

    def usage_chunk(self, rid: str, use: dict) -> dict:
        return self._obj(rid, [], usage=use)
