"""An HTTP request body, read so that no body costs more than its size allows.

`read_json` refuses, before building any object:
- a body over --max-message-bytes (413: from Content-Length before reading, or while reading);
- a body that would take the bytes all requests buffer together past --http-max-buffered-bytes
  (429; a stalled body holds its bytes until the connection's body timeout closes it);
- JSON nested deeper than --max-json-depth, or with more than --max-json-items array items plus
  object members (400 naming the limit). Both are counted on the bytes with a few C-speed passes
  (`shape`), so a 4 MiB body of tiny items or deep brackets costs milliseconds, not the seconds that
  building and validating a million objects takes; json.loads then never recurses deep. The
  refusal of too many items names the top-level member they are in (`logit_bias` with 100,000
  entries is a 400 naming logit_bias), found by a scan that stops where the count passes the limit.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from starlette.requests import Request

from server import errors as e

NON_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
NON_STRUCTURE = bytes(b for b in range(256) if b not in b"[]{},")
MEMBER_NAME = re.compile(rb"[A-Za-z_][A-Za-z0-9_]{0,63}")


class BodyTooLarge(e.ResourceExhausted):
    """A request body above --max-message-bytes: 413, counted as RESOURCE_EXHAUSTED."""


@dataclass(frozen=True)
class BodyLimits:
    max_bytes: int          # one body (--max-message-bytes)
    max_depth: int          # --max-json-depth
    max_items: int          # --max-json-items


class BodyBudget:
    """The request-body bytes all HTTP requests hold together while their bodies arrive. Only the
    event loop touches it (no lock)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0

    def take(self, n: int) -> None:
        if self.held + n > self.limit:
            raise e.ResourceExhausted(f"the server is receiving too many request bodies at once (over "
                                      f"{self.limit} bytes, --http-max-buffered-bytes); retry shortly")
        self.held += n

    def give(self, n: int) -> None:
        self.held -= n


async def read_json(request: Request, limits: BodyLimits, budget: BodyBudget) -> object:
    """The body as JSON, within `limits`; never parses a partial body."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_bytes:
        raise BodyTooLarge(f"the request body is {declared} bytes; this server accepts at most {limits.max_bytes}")
    held = 0
    try:
        if declared is not None and declared.isdigit():
            budget.take(int(declared))
            held = int(declared)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_bytes:
                raise BodyTooLarge(f"the request body is over {limits.max_bytes} bytes, the most this server accepts")
            if size > held:
                budget.take(size - held)
                held = size
            chunks.append(chunk)
        body = b"".join(chunks)
        del chunks
        shape(body, limits)
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError) as err:
            raise e.InvalidField("body", f"the request body is not valid JSON ({str(err)[:200]})") from None
    finally:
        budget.give(held)


def shape(body: bytes, limits: BodyLimits) -> None:
    """Refuse JSON deeper than `max_depth` or with more than `max_items` items, from the bytes.

    Counted on the whole body first, strings included, which bounds both from above; only a body
    over a limit that way has its strings cut out: drop escaped backslashes and quotes, and every
    `"` left opens or closes a string. Items are counted as commas plus arrays and objects (an empty container counts
    as one); for invalid JSON the counts may be off, and json.loads refuses it next."""
    opening = body.count(b"[") + body.count(b"{")
    if opening <= limits.max_depth and opening + body.count(b",") <= limits.max_items:
        return                                         # within both limits even counting inside strings
    plain = body
    for escape in (b"\\\\", b'\\"'):
        if escape in plain:
            plain = plain.replace(escape, b"")
    if plain.count(b'"') > 4 * limits.max_items:       # a string is an item, or a member's key
        _too_many(limits, plain)
    outside = b"".join(plain.split(b'"')[::2])
    if outside.count(b",") + outside.count(b"[") + outside.count(b"{") > limits.max_items:
        _too_many(limits, plain)
    brackets = outside.translate(None, NON_BRACKETS)
    if len(brackets) > 2 * limits.max_items:          # more closing brackets than opening ones
        raise e.InvalidField("body", "the request body is not valid JSON (unbalanced brackets)")
    depth = 0
    for b in brackets:
        if b in b"[{":
            depth += 1
            if depth > limits.max_depth:
                raise e.InvalidField("body", f"the request body nests arrays and objects more than "
                                             f"{limits.max_depth} deep, the most this server accepts "
                                             "(--max-json-depth)")
        else:
            depth -= 1


def _too_many(limits: BodyLimits, plain: bytes) -> None:
    field = crowded_member(plain, limits.max_items)
    where = f", most of them in {field}" if field != "body" else ""
    raise e.InvalidField(field, f"the request body holds more than {limits.max_items} JSON array items and "
                                f"object members{where}, the most this server accepts (--max-json-items)")


def crowded_member(plain: bytes, max_items: int) -> str:
    """The top-level member whose value holds the item that passes `max_items` ('body' when the
    count passes it outside any member, or the name is not a plain field name). `plain`: the body
    without escaped quotes and backslashes. Scans in order and stops there: at most
    8 * max_items + 2 strings and the structure between them, whatever the body's size."""
    budget = 8 * max_items + 2
    parts = plain.split(b'"', budget)
    if len(parts) > budget:
        parts.pop()                       # the unsplit rest: its strings are not told apart
    depth = items = 0
    key = "body"
    for i, part in enumerate(parts):
        if i % 2:                         # a string's contents
            if depth == 1 and i + 1 < len(parts) and parts[i + 1].lstrip()[:1] == b":":
                key = part.decode() if MEMBER_NAME.fullmatch(part) else "body"
            continue
        for b in part.translate(None, NON_STRUCTURE):
            if b in b"[{":
                depth += 1
                items += 1
            elif b in b"]}":
                depth -= 1
            else:
                items += 1
            if items > max_items:
                return key if depth >= 2 else "body"
    return key if depth >= 2 else "body"
