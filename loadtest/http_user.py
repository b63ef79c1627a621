"""A locust User that speaks the OpenAI-compatible HTTP door (`--http-port`), beside `GrpcUser`.

It uses a plain `requests.Session` (locust has gevent-patched the process, so it cooperates) and
fires locust request events itself, the way `grpc_user.LocustInterceptor` does for gRPC:
request_type="http", name = the call ("Completions", "CompletionsStream", "ChatCompletions",
...), `response_length` = generated tokens (from `usage`), streams also `ttft:<name>` at the first
token. A failure is recorded as "CODE: message" with CODE the gRPC status name of the HTTP status
(429 -> RESOURCE_EXHAUSTED, ...), so run.py groups failures of both doors the same way.
"""
from __future__ import annotations

import json
import time
from typing import Iterator

import requests
from locust import User

from loadtest.traffic import HTTP_CODES as CODES


class HttpFailure(Exception):
    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(f"{code}: {message[:120]}")

    def __repr__(self) -> str:
        return str(self)


def _failure(r: requests.Response) -> HttpFailure:
    try:
        message = r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = r.text
    return HttpFailure(CODES.get(r.status_code, f"HTTP_{r.status_code}"), message)


def sse_data(r: requests.Response) -> Iterator[dict]:
    """The JSON documents of a server-sent-event stream, up to `data: [DONE]`."""
    for line in r.iter_lines(decode_unicode=True):
        if not line or not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        doc = json.loads(data)
        if "error" in doc:
            raise HttpFailure("STREAM", doc["error"].get("message", ""))
        yield doc


class OpenAIHttpUser(User):
    """One `requests.Session` per user against `http_base` ("http://host:port")."""

    abstract = True
    http_base = ""

    def __init__(self, environment):
        super().__init__(environment)
        self.session = requests.Session()

    def _fire(self, name: str, t0: float, tokens: int, error: Exception | None) -> None:
        self.environment.events.request.fire(
            request_type="http", name=name, response_time=(time.perf_counter() - t0) * 1000.0,
            response_length=tokens, response=None, context={}, exception=error)

    def get_json(self, path: str, name: str, headers: dict[str, str], timeout: float) -> dict | None:
        return self._call("GET", path, name, None, headers, timeout)

    def post(self, path: str, name: str, body: dict, headers: dict[str, str], timeout: float) -> dict | None:
        """A non-streaming call; its answer, or None after recording the failure."""
        return self._call("POST", path, name, body, headers, timeout)

    def _call(self, method: str, path: str, name: str, body: dict | None, headers: dict[str, str],
              timeout: float) -> dict | None:
        t0 = time.perf_counter()
        try:
            r = self.session.request(method, self.http_base + path, json=body, headers=headers, timeout=timeout)
            if r.status_code != 200:
                raise _failure(r)
            doc = r.json()
        except (requests.RequestException, ValueError, HttpFailure) as e:
            self._fire(name, t0, 0, e)
            return None
        self._fire(name, t0, doc.get("usage", {}).get("completion_tokens", 0) if body is not None else 0, None)
        return doc

    def post_stream(self, path: str, name: str, body: dict, headers: dict[str, str], timeout: float) -> None:
        """A streaming call with usage asked for: fires ttft:<name> at the first token, <name> at the end."""
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        t0, first, tokens = time.perf_counter(), True, 0
        try:
            with self.session.post(self.http_base + path, json=body, headers=headers, timeout=timeout,
                                   stream=True) as r:
                if r.status_code != 200:
                    raise _failure(r)
                for doc in sse_data(r):
                    if first and doc["choices"]:
                        first = False
                        self._fire(f"ttft:{name}", t0, 0, None)
                    if doc.get("usage"):
                        tokens = doc["usage"]["completion_tokens"]
        except (requests.RequestException, ValueError, HttpFailure) as e:
            self._fire(name, t0, tokens, e)
            return
        self._fire(name, t0, tokens, None)

    def on_stop(self) -> None:
        self.session.close()
