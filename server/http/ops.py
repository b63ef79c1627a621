"""The HTTP door's operational routes, shaped as vLLM serves them:

    GET  /health       200 (empty body) while serving; 503 while draining or while the engine is down
                       (the same truth as gRPC health: server.api.health). No key.
    GET  /metrics      the Prometheus registry (the metrics port's, vLLM's names included), OpenMetrics
                       when the scraper asks for it. --http-metrics: admin (the default) needs an admin
                       key when --api-keys is set; open needs none (vLLM's way); off: not mounted (404).
    GET  /version      {"version": "<lorafleet's version>"}. No key.
    POST /tokenize     {"model"?, "prompt", "add_special_tokens"? (true), "return_token_strs"? (false)}
                    or {"model"?, "messages", "add_special_tokens"? (false), "add_generation_prompt"? (true),
                        "continue_final_message"? (false), "return_token_strs"?}
                       -> {"count", "max_model_len", "tokens", "token_strs"}
    POST /detokenize   {"model"?, "tokens"} -> {"prompt"}

tokenize/detokenize authenticate like /v1 (any tenant's key) and `model`, when sent, must be one the
caller may use (the base model or one of its adapters: 404 otherwise); an adapter's virtual tokens
are not counted. Messages are rendered by the model's chat template exactly as
/v1/chat/completions renders them (`ChatTemplate.encode`: content as text, the generation prompt
added), so the chat-only switches are accepted at that value only. Inputs are bounded before any
work: the body's limits, a prompt at most as long as a generation's (`--max-prompt-tokens` x 64
characters), at most --max-context-tokens ids, each in the vocabulary; a refusal is a 400 naming
the field. /health, /version and successful scrapes are not counted in lorafleet_requests_total.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from pydantic import Field, model_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from server import errors as e
from server import metrics, version
from server.api import requests
from server.api.auth import Principal
from server.api.generation import Generation
from server.api.health import Health
from server.config import ServerConfig
from server.http import schema
from server.http.body import BodyBudget, BodyLimits, read_json

Handler = Callable[[str, Callable[[Request, Principal], Awaitable[Response]]], Callable]
ErrorBody = Callable[[BaseException], tuple[int, dict, dict[str, str]]]


class TokenizePrompt(schema._Strict):
    model: schema.Text | None = None
    prompt: schema.Text
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChat(schema._Strict):
    model: schema.Text | None = None
    messages: list[schema.ChatMessage] = Field(min_length=1)
    add_special_tokens: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _as_chat_completions(self) -> "TokenizeChat":
        for name, only in (("add_special_tokens", False), ("add_generation_prompt", True),
                           ("continue_final_message", False)):
            if getattr(self, name) is not only:
                raise e.InvalidField(name, f"{name}={str(not only).lower()} is not supported: messages are "
                                           "tokenized as /v1/chat/completions renders them (the chat template "
                                           f"writes the special tokens and the generation prompt); send "
                                           f"{str(only).lower()} or leave it out")
        return self


class Detokenize(schema._Strict):
    model: schema.Text | None = None
    tokens: list[int]


class OpsRoutes:
    """`routes(handler)`: the routes above; `handler(method, fn)` is the OpenAI app's wrapper that
    authenticates the caller and maps errors (OpenAIApp._handler); `error_body` maps an exception
    to the OpenAI error shape (openai.error_body); `check_model` raises NotFound for a model the
    caller may not use."""

    def __init__(self, gen: Generation, health: Health, cfg: ServerConfig,
                 check_model: Callable[[Principal, str], None], body_limits: BodyLimits, bodies: BodyBudget,
                 error_body: ErrorBody):
        self.gen, self.health, self.cfg, self.check_model = gen, health, cfg, check_model
        self.body_limits, self.bodies, self.error_body = body_limits, bodies, error_body
        self.vocab_size = gen.engine.model.shape.vocab_size
        self.scrapes = asyncio.Semaphore(metrics.METRICS_MAX_CONNECTIONS)

    def routes(self, handler: Handler) -> list[Route]:
        routes = [
            Route("/health", self.health_check, methods=["GET"]),
            Route("/version", self.version, methods=["GET"]),
            Route("/tokenize", handler("Tokenize", self.tokenize), methods=["POST"]),
            Route("/detokenize", handler("Detokenize", self.detokenize), methods=["POST"]),
        ]
        if self.cfg.http_metrics == "admin":
            routes.append(Route("/metrics", handler("Metrics", self.metrics), methods=["GET"]))
        elif self.cfg.http_metrics == "open":
            routes.append(Route("/metrics", self.open_scrape, methods=["GET"]))
        return routes

    # ---------------------------------------------------------------- no key
    async def health_check(self, request: Request) -> Response:
        problem = self.health.problem()
        if problem is None:
            return Response(status_code=200)
        status, body, headers = self.error_body(e.Unavailable(problem))
        return JSONResponse(body, status, headers)

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": version()})

    async def open_scrape(self, request: Request) -> Response:
        """--http-metrics open: no key looked at."""
        try:
            return await self.scrape(request)
        except e.ResourceExhausted as err:
            status, body, headers = self.error_body(err)
            return JSONResponse(body, status, headers)

    # ---------------------------------------------------------------- keyed (handler)
    async def metrics(self, request: Request, principal: Principal) -> Response:
        """--http-metrics admin: the handler authenticated the caller; only an admin key may scrape
        (every key is admin in single-tenant mode, without --api-keys)."""
        if not principal.admin:
            raise e.PermissionDenied("GET /metrics on the HTTP port needs an admin key (it shows every "
                                     "tenant's traffic); scrape --metrics-port, or serve with --http-metrics open")
        return await self.scrape(request)

    async def scrape(self, request: Request) -> Response:
        if self.scrapes.locked():
            raise e.ResourceExhausted(f"{metrics.METRICS_MAX_CONNECTIONS} scrapes of /metrics are running; retry")
        gzipped = "gzip" in request.headers.get("accept-encoding", "")
        async with self.scrapes:
            body, content_type = await asyncio.to_thread(metrics.exposition, request.headers.get("accept", ""),
                                                         gzipped)
        headers = {"Content-Type": content_type, **({"Content-Encoding": "gzip"} if gzipped else {})}
        return Response(body, headers=headers)

    async def tokenize(self, request: Request, principal: Principal) -> Response:
        doc = await read_json(request, self.body_limits, self.bodies)
        chat = isinstance(doc, dict) and "messages" in doc
        req = schema.parse(TokenizeChat if chat else TokenizePrompt, doc, {"messages": self.cfg.max_chat_messages})
        self._check(principal, req.model)
        if chat:
            ids = requests.render_chat(tuple((m.role, m.text()) for m in req.messages), self.gen.chat,
                                       self.gen.chat_roles, self.gen.tokenizer, self.cfg)
        else:
            if len(req.prompt) > self.cfg.max_prompt_tokens * 64:
                raise e.InvalidField("prompt", f"prompt is {len(req.prompt)} characters; far above this server's "
                                               f"limit of {self.cfg.max_prompt_tokens} tokens")
            ids = self.gen.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens).ids
        strs = [self.gen.tokenizer.id_to_token(i) for i in ids] if req.return_token_strs else None
        metrics.REQUESTS.labels("Tokenize", "OK", "http").inc()
        return JSONResponse({"count": len(ids), "max_model_len": self.cfg.max_context_tokens, "tokens": ids,
                             "token_strs": strs})

    async def detokenize(self, request: Request, principal: Principal) -> Response:
        doc = await read_json(request, self.body_limits, self.bodies)
        req = schema.parse(Detokenize, doc, {"tokens": self.cfg.max_context_tokens})
        self._check(principal, req.model)
        for i, tok in enumerate(req.tokens):
            if not 0 <= tok < self.vocab_size:
                raise e.InvalidField(f"tokens[{i}]", f"tokens[{i}]={schema._shown(tok)} is not a token id of this "
                                                     f"model (0 to {self.vocab_size - 1})")
        text = self.gen.tokenizer.decode(req.tokens, skip_special_tokens=False)
        metrics.REQUESTS.labels("Detokenize", "OK", "http").inc()
        return JSONResponse({"prompt": text})

    def _check(self, principal: Principal, model: str | None) -> None:
        if model is not None:
            self.check_model(principal, model)
