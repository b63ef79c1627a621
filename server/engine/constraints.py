"""Constrained decoding, per row (issue 23): a JSON schema, any JSON object, a regex or a Lark grammar
becomes a per-row `Matcher` whose token mask is applied to that row's logits before it is sampled.

The library is llguidance (MIT; Microsoft / guidance-ai; the engine behind vLLM's, SGLang's and
llama.cpp's `guidance` backends), chosen by `bench/structured_libs.py` over xgrammar and outlines-core
(SmolLM2's tokenizer, vocab 49152, a shared 2-core CPU, medians):

- it refuses what it cannot enforce (`uniqueItems`, `not`, `if`/`then`: an error naming the keywords);
  xgrammar compiles those and lets through outputs that break the schema (seen: `[1, 1]` under
  `uniqueItems`, `"a"` under `not: string`, `{}` under `allOf` + `required`), so only with llguidance
  does every completion validate;
- it is built for untrusted grammars: fuel and size limits on every step turn explosions into errors.
  An 11 MB schema and 10,000 tools: "schema too large" in 0.5-0.8 s; a `$ref` that only refers to
  itself: an error at the first mask; DFA-exploding regexes (`(a|b)*a(a|b){25}`, nested counted
  repetitions) compile in ~1 ms (lazy derivatives). xgrammar ran past 30 s on the 11 MB schema and
  on 10,000 tools; outlines-core's regex-to-DFA ran past 30 s on both regexes and on the tools;
- compiling is lazy: 0.5-1.8 ms for our four JSON schemas, regex and Lark (xgrammar 6-37 ms, its
  regex 259 ms; outlines-core 0.16-1.7 s, and it has no grammars): a new schema costs its request little;
- per row its mask costs more than xgrammar's (18-135 µs alone, 10.8 µs/row in one 32-row batch call,
  against xgrammar's 3-4 µs), but the batch call releases the GIL (measured), so `MaskFiller` fills the
  next step's masks in a worker thread while the forward runs, off the engine thread's critical path;
- JSON schema, regex and Lark grammars, rollback (an object schema that lists `properties` is closed,
  as xgrammar and outlines close it: `closed_objects`); about 30 kB per compiled schema and under 1 kB per
  row; no dependency of its own (xgrammar brings torch, triton, transformers and apache-tvm-ffi).

Roles and threads:
  API side: `ConstraintCompiler.compile` / `compile_async` -> `Compiled` (cached by sha256 of kind and
            text; `InvalidField` naming the caller's field on every refusal, before the request is queued)
  engine:   `Compiled.matcher(stop_ids)` per sequence; each step `MaskFiller.start(matchers)` before the
            forward, `.wait()` after it, `apply_masks(logits, matchers, bitmask)` between the repetition
            penalty and the temperature, `Matcher.accept(token)` after the draw.

The compile cannot be interrupted: it runs in `constraint_compile_threads` worker threads; a caller
waits at most `constraint_compile_timeout_s` (queued time included); a compile still queued when its
last waiter gives up never starts, one already running goes on until llguidance's own limits end it
(the byte cap keeps that to seconds) and its result is cached, as every refusal is.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Literal

import llguidance as llg
import numpy as np
import torch
from tokenizers import Tokenizer

from server.errors import InvalidField

if TYPE_CHECKING:
    from server.config import ServerConfig

ConstraintKind = Literal["json_schema", "json_object", "regex", "grammar"]
KINDS: tuple[str, ...] = ("json_schema", "json_object", "regex", "grammar")

# JSON is written as json.dumps writes it: ", " and ": ", no other whitespace (free whitespace lets a
# small model loop on newlines). A schema's own "x-guidance" may change that; never "lenient" (which
# ignores keywords it cannot enforce: the output would not validate).
JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
JSON_OVERRIDES = {"lenient": False}
MAX_ERROR_CHARS = 300


@dataclass(frozen=True)
class Constraint:
    """What a request constrains its output to. `text`: the JSON schema (JSON text), the regex or the
    Lark grammar; empty for json_object (any JSON object)."""
    kind: ConstraintKind
    text: str = ""

    @property
    def key(self) -> str:
        """The cache key: sha256 of kind and text."""
        return hashlib.sha256(f"{self.kind}\0{self.text}".encode()).hexdigest()


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 64 * 1024          # UTF-8 bytes of `Constraint.text`
    compile_timeout_s: float = 5.0      # a caller's wait, queued time included
    compile_threads: int = 1
    max_cached: int = 256               # compiled and refused constraints kept (LRU)
    mask_threads: int = 1               # threads of one step's batched mask fill

    @staticmethod
    def from_config(cfg: ServerConfig) -> Limits:
        return Limits(cfg.max_constraint_bytes, cfg.constraint_compile_timeout_s, cfg.constraint_compile_threads,
                      cfg.constraint_cache_size, cfg.constraint_mask_threads)


class TokenizerInfo:
    """The served model's vocabulary as llguidance sees it; built once per model (~0.3 s on SmolLM2).
    `vocab_size` is the model's (the logits' width), `eos_ids` the tokens that end any generation."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: Iterable[int]):
        eos = sorted(set(eos_ids))
        if not eos:
            raise ValueError("constrained decoding needs at least one EOS token id")
        plain = Tokenizer.from_str(tokenizer.to_str())
        plain.no_padding()
        plain.no_truncation()
        self.vocab_size = vocab_size
        self.eos_ids = frozenset(eos)
        self.mask_words = (vocab_size + 31) // 32          # int32 words of one row's bitmask
        self.ll = llg.LLTokenizer(plain.to_str(), n_vocab=vocab_size, eos_token=eos)


def allocate_bitmask(rows: int, info: TokenizerInfo) -> torch.Tensor:
    """A bitmask for `rows` rows: [rows, ceil(vocab/32)] int32 on the CPU, bit t of row r = token t allowed
    (pinned when CUDA is there: the constrained rows are copied to the logits' device)."""
    return torch.full((rows, info.mask_words), -1, dtype=torch.int32, pin_memory=torch.cuda.is_available())


class Matcher:
    """One row's place in its constraint. Used by the engine thread, and by the MaskFiller's worker
    while a fill is in flight (never both: `wait()` comes before `accept`)."""

    def __init__(self, compiled: Compiled, stop_ids: frozenset[int]):
        self._ll = compiled._template.deep_copy()
        self._lib_eos = compiled.info.eos_ids
        self._stops = compiled.info.eos_ids | stop_ids      # tokens that end this row (EOS, end of turn)
        self._extra = sorted(stop_ids - compiled.info.eos_ids)
        self._done = False
        self._refused: str | None = None                    # a stop token refused, or a token after the end

    def fill_mask(self, bitmask_row: torch.Tensor) -> None:
        """Write this row's allowed tokens into `bitmask_row` [ceil(vocab/32)] int32 (CPU, contiguous)."""
        self._ll.unsafe_compute_mask_ptr(bitmask_row.data_ptr(), bitmask_row.numel() * 4)
        self.allow_stops(bitmask_row)

    def allow_stops(self, bitmask_row: torch.Tensor) -> None:
        """Where llguidance allows EOS, also allow this row's other stop tokens (a chat's end of turn)."""
        if not self._extra:
            return
        words = bitmask_row.numpy().view(np.uint32)
        if any((int(words[e >> 5]) >> (e & 31)) & 1 for e in self._lib_eos):
            for s in self._extra:
                words[s >> 5] |= np.uint32(1 << (s & 31))

    def accept(self, token: int) -> bool:
        """Advance by the row's sampled token; False when the constraint does not allow it (then the
        matcher is in error)."""
        if self._done:
            self._refused = f"token {token} after the end of the constrained output"
            return False
        if token in self._stops:
            if not self._ll.is_accepting():                    # may the output end here?
                self._refused = f"stop token {token} before the constrained output is complete"
                return False
            self._done = True        # kept from llguidance: its rollback over a consumed EOS loses the state
            return True
        return self._ll.consume_token(token)

    def is_done(self) -> bool:
        """A stop token was accepted, or nothing but one may follow (the row may finish now)."""
        return self._done or (self._ll.is_stopped() and not self._ll.is_error())

    @property
    def error(self) -> str | None:
        """Why the constraint cannot go on (a token it refused, a limit hit mid-way), or None."""
        if self._ll.is_error():
            return _first_line(self._ll.get_error())
        return self._refused

    def rollback(self, num_tokens: int) -> bool:
        """Undo the last `num_tokens` accepted tokens (speculative decoding, a retried step)."""
        if num_tokens <= 0:
            return True
        if self._done:
            self._done, self._refused = False, None
            num_tokens -= 1
        return self._ll.rollback(num_tokens) if num_tokens else True


@dataclass(frozen=True, eq=False)
class Compiled:
    """A constraint ready for rows: shared by every request that sends the same kind and text."""
    constraint: Constraint
    info: TokenizerInfo
    _template: llg.LLMatcher = field(repr=False)     # never advanced; each row gets a deep copy (~12 µs)

    def matcher(self, stop_ids: frozenset[int] = frozenset()) -> Matcher:
        """A fresh matcher for one row (per choice when n > 1); `stop_ids`: the row's end-of-turn tokens."""
        return Matcher(self, stop_ids)


def compile_constraint(spec: Constraint, info: TokenizerInfo, limits: Limits, field: str) -> Compiled:
    """Compile `spec` (no cache, no deadline: `ConstraintCompiler` adds both). InvalidField(field, ...)
    for anything the library refuses, a constraint larger than `limits.max_bytes`, or one whose
    first mask already fails (a `$ref` that only refers to itself)."""
    try:
        return _compile(spec, info, limits)
    except _Refusal as e:
        raise InvalidField(field, field + e.suffix) from None


class _Refusal(Exception):
    """Why a constraint is refused, phrased to follow the caller's field name (cached without it)."""

    def __init__(self, suffix: str):
        super().__init__(suffix)
        self.suffix = suffix


def _compile(spec: Constraint, info: TokenizerInfo, limits: Limits) -> Compiled:
    _check(spec, limits)
    try:
        grammar = _grammar(spec)
    except RecursionError:
        raise _Refusal(": nests too deeply") from None
    except (ValueError, TypeError) as e:
        raise _Refusal(f": {_first_line(str(e))}") from None
    m = llg.LLMatcher(info.ll, grammar, log_level=0, limits=llg.LLParserLimits(verbose_errors=False))
    if not m.is_error():
        scratch = allocate_bitmask(1, info)
        m.unsafe_compute_mask_ptr(scratch.data_ptr(), scratch.numel() * 4)
    if m.is_error():
        why = _first_line(m.get_error())
        if " " not in why:          # a bare stop reason at the first mask: nothing can be generated
            why = f"no output can satisfy it ({why}; a $ref that only refers to itself does this)"
        raise _Refusal(f": this server cannot constrain output to it: {why}")
    return Compiled(spec, info, m)


def _check(spec: Constraint, limits: Limits) -> None:
    """The checks before any parsing: kind, size, emptiness."""
    if spec.kind not in KINDS:
        raise _Refusal(f": unknown constraint kind {str(spec.kind)[:40]!r}; one of {', '.join(KINDS)}")
    if len(spec.text) > limits.max_bytes or len(spec.text.encode()) > limits.max_bytes:
        raise _Refusal(f" is {len(spec.text.encode())} bytes; this server accepts at most {limits.max_bytes}")
    if spec.kind != "json_object" and not spec.text:
        raise _Refusal(" is empty")


def _grammar(spec: Constraint) -> str:
    M = llg.LLMatcher
    if spec.kind == "json_schema":
        schema = json.loads(spec.text)            # our message for bad JSON; then llguidance's own checks
        if not isinstance(schema, dict):
            raise ValueError("a JSON schema must be a JSON object")
        return M.grammar_from_json_schema(json.dumps(closed_objects(schema)), defaults=JSON_DEFAULTS,
                                          overrides=JSON_OVERRIDES)
    if spec.kind == "json_object":
        return M.grammar_from_json_schema('{"type": "object"}', defaults=JSON_DEFAULTS, overrides=JSON_OVERRIDES)
    if spec.kind == "regex":
        return M.grammar_from_regex(spec.text)
    return M.grammar_from_lark(spec.text)


def closed_objects(schema: object) -> object:
    """A copy of `schema` where every object schema that lists `properties` and says nothing of
    `additionalProperties` (or `patternProperties`) gets `additionalProperties: false`. What xgrammar
    and outlines do, and vLLM's guidance backend with `disable_additional_properties`: JSON Schema
    allows any other key there, and a small model, once allowed, invents keys until max_tokens (seen
    with SmolLM2 and Pydantic's schemas, which leave it out). Every output still validates against
    the schema as sent: it only narrows what may be written."""
    if isinstance(schema, list):
        return [closed_objects(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (v if k in ("enum", "const", "default", "examples") else closed_objects(v)) for k, v in schema.items()}
    if isinstance(out.get("properties"), dict) and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


def _first_line(message: str) -> str:
    line = message.strip().splitlines()[0] if message.strip() else "unknown error"
    return line[:MAX_ERROR_CHARS]


class ConstraintCompiler:
    """Compiles constraints off the caller's thread, with a deadline, one compile per distinct
    constraint at a time (callers sending the same one wait on the same compile), and an LRU cache of
    results and refusals keyed by `Constraint.key`. Thread-safe; one per served model."""

    def __init__(self, info: TokenizerInfo, limits: Limits):
        self.info, self.limits = info, limits
        self._pool = concurrent.futures.ThreadPoolExecutor(limits.compile_threads,
                                                           thread_name_prefix="lorafleet-constraint")
        self._lock = threading.RLock()     # re-entered by a future's callback that runs at once (cancel)
        self._cache: OrderedDict[str, Compiled | _Refusal] = OrderedDict()
        self._inflight: dict[str, list] = {}            # key -> [future, waiters]
        self.hits = self.misses = 0

    def compile(self, spec: Constraint, field: str) -> Compiled:
        """Blocking: the Compiled, or InvalidField(field, ...) (a refusal, or no result in time)."""
        self._precheck(spec, field)
        done = self._cached(spec.key, field)
        if done is not None:
            return done
        fut = self._join(spec)
        try:
            return self._result(fut.result(timeout=self.limits.compile_timeout_s), field)
        except concurrent.futures.TimeoutError:
            raise self._late(spec.key, fut, field) from None

    async def compile_async(self, spec: Constraint, field: str) -> Compiled:
        """As `compile`, for the asyncio doors: the event loop never waits on a compile."""
        self._precheck(spec, field)
        done = self._cached(spec.key, field)
        if done is not None:
            return done
        fut = self._join(spec)
        try:
            got = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), self.limits.compile_timeout_s)
        except asyncio.TimeoutError:
            raise self._late(spec.key, fut, field) from None
        return self._result(got, field)

    def cached(self) -> int:
        with self._lock:
            return len(self._cache)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- inside
    def _precheck(self, spec: Constraint, field: str) -> None:
        try:
            _check(spec, self.limits)
        except _Refusal as e:
            raise InvalidField(field, field + e.suffix) from None

    def _cached(self, key: str, field: str) -> Compiled | None:
        with self._lock:
            hit = self._cache.get(key)
            if hit is None:
                return None
            self._cache.move_to_end(key)
            self.hits += 1
        return self._result(hit, field)

    def _join(self, spec: Constraint) -> concurrent.futures.Future:
        key = spec.key
        with self._lock:
            entry = self._inflight.get(key)
            new = entry is None
            if new:
                self.misses += 1
                entry = self._inflight[key] = [self._pool.submit(self._build, spec), 0]
            entry[1] += 1
            fut = entry[0]
        if new:         # outside the lock: a future already done runs its callback here and now
            fut.add_done_callback(lambda f, k=key: self._store(k, f))
        return fut

    def _build(self, spec: Constraint) -> Compiled | _Refusal:
        try:
            return _compile(spec, self.info, self.limits)
        except _Refusal as e:
            return e

    def _store(self, key: str, fut: concurrent.futures.Future) -> None:
        with self._lock:
            if self._inflight.get(key, [None])[0] is fut:
                del self._inflight[key]
            if fut.cancelled():
                return
            result = fut.result() if fut.exception() is None else _Refusal(
                f": could not be compiled ({type(fut.exception()).__name__})")
            self._cache[key] = result
            self._cache.move_to_end(key)
            while len(self._cache) > self.limits.max_cached:
                self._cache.popitem(last=False)

    def _late(self, key: str, fut: concurrent.futures.Future, field: str) -> InvalidField:
        """A caller's deadline passed: it stops waiting; the last one to stop cancels a compile that
        has not started."""
        with self._lock:
            entry = self._inflight.get(key)
            if entry is not None and entry[0] is fut:
                entry[1] -= 1
                if entry[1] <= 0:
                    fut.cancel()              # when it has not started; its callback drops the entry
        return InvalidField(field, f"{field}: did not compile within {self.limits.compile_timeout_s:g} s; "
                                   "simplify it (fewer optional properties, alternatives or repetitions)")

    def _result(self, got: Compiled | _Refusal, field: str) -> Compiled:
        if isinstance(got, _Refusal):
            raise InvalidField(field, field + got.suffix)
        return got


# ---------------------------------------------------------------- one step's masks
def fill_masks(matchers: list[Matcher | None], bitmask: torch.Tensor, executor: llg.LLExecutor) -> None:
    """Fill the rows of `bitmask` [>= len(matchers), ceil(vocab/32)] int32 (CPU, contiguous) whose
    matcher is set, in one call that releases the GIL; other rows are left as they are."""
    pairs = [(m._ll, i) for i, m in enumerate(matchers) if m is not None]
    if not pairs:
        return
    executor.unsafe_compute_mask_ptr(pairs, bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0])
    for i, m in enumerate(matchers):
        if m is not None and m._extra:
            m.allow_stops(bitmask[i])


def apply_masks(logits: torch.Tensor, matchers: list[Matcher | None], bitmask: torch.Tensor) -> list[int]:
    """In place on logits [R, vocab] (any float dtype and device): for each row r with a matcher, every
    token whose bit is 0 in bitmask[r] ([>= R, ceil(vocab/32)] int32, filled for these matchers)
    becomes -inf. Rows without a matcher are not written (bit-identical). Returns the rows that must
    fail: their matcher is in error, or their mask allows no token.

        for r in range(R):
            if matchers[r] is not None:
                for t in range(vocab):
                    if not (bitmask[r, t // 32] >> (t % 32)) & 1:
                        logits[r, t] = -inf

    Call it after the repetition penalty (whose clamp would turn -inf into a finite number) and
    before temperature, top-k/top-p and the draw; the sampler's non-finite check must look at the
    logits before it."""
    rows = [r for r, m in enumerate(matchers) if m is not None]
    if not rows:
        return []
    vocab = logits.shape[1]
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        # numpy, one thread: torch's parallel ops wait on a preempted core on a busy CPU
        allowed = _unpack_numpy(bitmask.numpy()[rows], vocab)                     # [k, vocab]
        blocked, out = ~allowed, logits.detach().numpy()
        for j, r in enumerate(rows):
            np.putmask(out[r], blocked[j], np.float32(-np.inf))
        empty = (~allowed.any(axis=1)).tolist()
    else:
        allowed = unpack_shifts(bitmask[rows].to(logits.device, non_blocking=True), vocab)
        if len(rows) == logits.shape[0]:
            logits.masked_fill_(~allowed, float("-inf"))
        else:
            idx = torch.tensor(rows, dtype=torch.long, device=logits.device)
            logits.index_copy_(0, idx, logits.index_select(0, idx).masked_fill_(~allowed, float("-inf")))
        empty = (~allowed.any(-1)).tolist()
    return [r for r, e in zip(rows, empty) if e or matchers[r].error is not None]


def unpack(bits: torch.Tensor, vocab: int, device: torch.device) -> torch.Tensor:
    """bits [k, ceil(vocab/32)] int32 (CPU) -> allowed [k, vocab] bool on `device` (bit t of a row:
    token t). numpy's unpackbits for the CPU; shifts on the device elsewhere (a few kB per row copied)."""
    if device.type == "cpu":
        return torch.from_numpy(_unpack_numpy(bits.numpy(), vocab))
    return unpack_shifts(bits.to(device, non_blocking=True), vocab)


def _unpack_numpy(bits: np.ndarray, vocab: int) -> np.ndarray:
    flat = np.unpackbits(np.ascontiguousarray(bits).view(np.uint8), axis=1, bitorder="little")
    return flat[:, :vocab].view(np.bool_)


def unpack_shifts(bits: torch.Tensor, vocab: int) -> torch.Tensor:
    """As `unpack`, by shifts on the tensor's own device: bits [k, words] int32 -> [k, vocab] bool."""
    shifts = torch.arange(32, dtype=torch.int32, device=bits.device)
    return ((bits.unsqueeze(-1) >> shifts) & 1).bool().view(bits.shape[0], -1)[:, :vocab]


class MaskFiller:
    """Fills a step's masks in a worker thread while the forward runs (llguidance releases the GIL).

        filler.start(matchers)           # engine thread, once the step's sampling rows are known
        hidden = model.forward(...)      # meanwhile the worker fills the masks
        bitmask = filler.wait()          # [max_rows, words]; rows r with matchers[r] set are filled
        failed = apply_masks(logits, matchers, bitmask)

    Between start and wait the matchers belong to the worker: accept nothing in between. Two buffers
    alternate, so a bitmask from wait() stays valid until the start() after next."""

    def __init__(self, info: TokenizerInfo, max_rows: int, threads: int = 1):
        self._executor = llg.LLExecutor(num_threads=threads)
        self._buffers = [allocate_bitmask(max_rows, info), allocate_bitmask(max_rows, info)]
        self._turn = 0
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lorafleet-masks")
        self._pending: concurrent.futures.Future | None = None

    def start(self, matchers: list[Matcher | None]) -> None:
        if self._pending is not None:
            raise RuntimeError("MaskFiller.start called twice without wait()")
        self._turn ^= 1
        buf = self._buffers[self._turn]
        if len(matchers) > buf.shape[0]:
            raise ValueError(f"{len(matchers)} rows; this filler holds {buf.shape[0]}")
        self._pending = self._pool.submit(fill_masks, list(matchers), buf, self._executor)

    def wait(self) -> torch.Tensor:
        fut, self._pending = self._pending, None
        if fut is None:
            raise RuntimeError("MaskFiller.wait called without start()")
        fut.result()
        return self._buffers[self._turn]

    def close(self) -> None:
        self._pool.shutdown(wait=True)
