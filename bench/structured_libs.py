"""Constrained-decoding libraries on our shapes (issue 23): which one `server/engine/constraints.py` uses.

For each candidate that imports (llguidance, xgrammar, outlines-core), on the served tokenizer
(SmolLM2-135M-Instruct, vocab 49152):

  compile   ms to turn a schema / regex / grammar into something a row can match (p50 of --repeats,
            no library cache), and ms to the first mask (llguidance builds its lexer lazily)
  mask      µs to fill one row's bitmask per token, walking a valid instance token by token: one
            row alone, and 32 rows (8 per JSON schema) in one batch call per step
  memory    per compiled grammar and per matcher (RSS growth; xgrammar also reports its own size)
  GIL       does a 32-row mask fill in a worker thread block the main thread? The main thread runs
            a pure-Python loop (the engine's glue between torch ops); `blocked` is the main thread's
            lost time / the worker's time inside the fill: ~1 = holds the GIL, ~0 = releases it
            (controls: a pure-Python worker holds it, a torch.mm worker releases it)
  hostile   a 10 MB schema, recursive $ref (a pure loop and a legit tree), DFA-exploding regexes,
            10,000 tools: each compiled (+ first mask) in a child process under a deadline and a
            memory cap: ok / error / TIMEOUT, with the time it took
  features  which JSON-schema keywords, regex and Lark grammars each compiles

The baseline (STYLE rule 7) is one decode step of the same model at 32 rows, measured in this run;
the ratio lines give mask fill and compile time as fractions of it.

    PYTHONPATH=.:proto .venv/bin/python bench/structured_libs.py [--repeats 5] [--smoke]

--smoke: the tiny model's byte-level tokenizer (vocab 259), 1 repeat, three small hostile inputs (seconds).
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.config import DEFAULT_CACHE  # noqa: E402
from server.model.default import resolve_model  # noqa: E402

LIBS = ("llguidance", "xgrammar", "outlines_core")
SEPARATORS = (", ", ": ")            # json.dumps' own: the instances below are dumped with them
CHILD_MEMORY_BYTES = 6 * 1024 ** 3   # address-space cap of a hostile-input child
SMOKE_HOSTILE = ("ref_loop", "ref_tree", "tools_1000")   # --smoke: the cases no candidate times out on
Kind = Literal["json_schema", "json_object", "regex", "grammar"]


# ---------------------------------------------------------------- the inputs
def _pydantic_schema() -> dict:
    """A LangChain-style schema: what `with_structured_output(Model)` sends (pydantic v2's own dump)."""
    from typing import Literal as L
    from typing import Optional

    from pydantic import BaseModel, Field

    class Address(BaseModel):
        street: str = Field(description="street and number")
        city: str
        country: str = Field(description="ISO 3166 alpha-2", min_length=2, max_length=2)

    class Person(BaseModel):
        """A person mentioned in the text."""
        name: str = Field(description="full name")
        age: Optional[int] = Field(default=None, description="age in years", ge=0, le=150)
        role: L["author", "reviewer", "subject"]
        address: Optional[Address] = None

    class Extraction(BaseModel):
        """People and the one-sentence summary extracted from a document."""
        people: list[Person] = Field(max_length=8)
        summary: str
        confidence: float = Field(ge=0, le=1)

    return Extraction.model_json_schema()


def _tool(name: str, params: dict) -> dict:
    return {"type": "object", "properties": {"name": {"const": name}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}


def _obj(props: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}


FLAT = _obj({"id": {"type": "integer"}, "name": {"type": "string"}, "email": {"type": "string"},
             "active": {"type": "boolean"}, "score": {"type": "number"}})
NESTED = _obj({
    "order_id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{6}$"},
    "status": {"enum": ["pending", "paid", "shipped", "cancelled"]},
    "customer": _obj({"name": {"type": "string"}, "vip": {"type": "boolean"}}),
    "items": {"type": "array", "minItems": 1, "maxItems": 20,
              "items": _obj({"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1},
                             "price": {"type": "number"}})},
    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
})
TOOLS = {"anyOf": [
    _tool("get_weather", _obj({"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}}, ["city"])),
    _tool("search_web", _obj({"query": {"type": "string"}, "max_results": {"type": "integer", "minimum": 1,
                                                                              "maximum": 10}}, ["query"])),
    _tool("send_email", _obj({"to": {"type": "array", "items": {"type": "string"}}, "subject": {"type": "string"},
                              "body": {"type": "string"}})),
    _tool("create_event", _obj({"title": {"type": "string"}, "start": {"type": "string", "format": "date-time"},
                                "minutes": {"type": "integer"}}, ["title", "start"])),
]}
LARK = """start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /[0-9]+(\\.[0-9]+)?/
"""
DATE_EMAIL_RX = r"[0-9]{4}-[0-9]{2}-[0-9]{2} [a-z][a-z0-9._]{0,20}@[a-z0-9]{1,20}\.(com|org|net)"


def realistic() -> dict[str, tuple[Kind, str, str]]:
    """name -> (kind, source text, an instance it accepts, as a model would write it)."""
    d = json.dumps
    return {
        "flat": ("json_schema", d(FLAT), d({"id": 42, "name": "Ada Lovelace", "email": "ada@example.com",
                                             "active": True, "score": 0.93})),
        "nested": ("json_schema", d(NESTED), d({
            "order_id": "ABC-123456", "status": "paid", "customer": {"name": "Grace Hopper", "vip": False},
            "items": [{"sku": "X-1", "qty": 2, "price": 9.5}, {"sku": "Y-22", "qty": 1, "price": 120.0}],
            "tags": ["gift", "express"]})),
        "pydantic": ("json_schema", d(_pydantic_schema()), d({
            "people": [{"name": "Alan Turing", "age": 41, "role": "subject",
                        "address": {"street": "Hollymeade 1", "city": "Wilmslow", "country": "GB"}},
                       {"name": "Joan Clarke", "age": None, "role": "author", "address": None}],
            "summary": "Two cryptanalysts worked together at Bletchley Park.", "confidence": 0.8})),
        "tool_call": ("json_schema", d(TOOLS), d({"name": "get_weather",
                                                  "arguments": {"city": "Paris", "unit": "celsius"}})),
        "regex": ("regex", DATE_EMAIL_RX, "2024-06-01 grace.hopper@navy.org"),
        "lark": ("grammar", LARK, "(12+3.5)*4-5/6"),
    }


def hostile(smoke: bool) -> dict[str, tuple[Kind, str]]:
    big_props = 2_000 if smoke else 20_000          # ~1 MB / ~10 MB of schema text
    desc = "d" * 480
    big = {"type": "object", "properties": {f"field_{i}": {"type": "string", "description": desc}
                                            for i in range(big_props)}}
    tools = 1_000 if smoke else 10_000
    many = {"anyOf": [_tool(f"tool_{i}", _obj({"a": {"type": "string"}, "n": {"type": "integer"}}))
                      for i in range(tools)]}
    tree = {"$defs": {"node": _obj({"value": {"type": "integer"},
                                    "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}})},
            "$ref": "#/$defs/node"}
    return {
        f"schema_{len(json.dumps(big)) / 1e6:.0f}MB": ("json_schema", json.dumps(big)),
        "ref_loop": ("json_schema", json.dumps({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"})),
        "ref_tree": ("json_schema", json.dumps(tree)),
        "regex_dfa_2^25": ("regex", "(a|b)*a(a|b){25}"),
        "regex_counted": ("regex", "((a{1,100}){1,100}){1,100}"),
        f"tools_{tools}": ("json_schema", json.dumps(many)),
    }


def features() -> dict[str, tuple[Kind, str]]:
    s = lambda x: ("json_schema", json.dumps(x))          # noqa: E731
    return {
        "$ref/$defs": s({"$defs": {"p": {"type": "string"}}, "type": "object",
                         "properties": {"a": {"$ref": "#/$defs/p"}}}),
        "recursive $ref": s({"type": "object", "properties": {"next": {"$ref": "#"}}}),
        "anyOf": s({"anyOf": [{"type": "string"}, {"type": "integer"}]}),
        "oneOf": s({"oneOf": [{"type": "string"}, {"type": "integer"}]}),
        "allOf": s({"allOf": [{"type": "object", "properties": {"a": {"type": "string"}}},
                              {"required": ["a"]}]}),
        "enum/const": s({"type": "object", "properties": {"e": {"enum": ["x", 1, None]}, "c": {"const": "k"}}}),
        "type list": s({"type": ["string", "null"]}),
        "pattern": s({"type": "string", "pattern": "^[a-z]+-[0-9]+$"}),
        "format date-time": s({"type": "string", "format": "date-time"}),
        "format email/uuid": s({"type": "object", "properties": {"e": {"type": "string", "format": "email"},
                                                                  "u": {"type": "string", "format": "uuid"}}}),
        "min/maxLength": s({"type": "string", "minLength": 2, "maxLength": 5}),
        "min/maxItems": s({"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3}),
        "minimum/maximum": s({"type": "integer", "minimum": -5, "maximum": 500}),
        "number bounds": s({"type": "number", "minimum": 0.5, "exclusiveMaximum": 2}),
        "additionalProperties schema": s({"type": "object", "additionalProperties": {"type": "integer"}}),
        "prefixItems": s({"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}]}),
        "uniqueItems": s({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}),
        "not": s({"not": {"type": "string"}}),
        "if/then": s({"if": {"type": "string"}, "then": {"minLength": 1}}),
        "json_object": ("json_object", ""),
        "regex": ("regex", r"\d{3}-[A-Z]{2,4}"),
        "lark grammar": ("grammar", LARK),
    }


# ---------------------------------------------------------------- one wrapper per library
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: vocabulary string char -> byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class Lib:
    """What the bench asks of each library: compile, a matcher per row, fill, accept."""
    name = ""

    def __init__(self, tok: Tokenizer, vocab: int, eos: list[int], threads: int):
        self.vocab, self.eos, self.threads = vocab, eos, threads

    def compile(self, kind: Kind, text: str) -> Any: ...
    def matcher(self, compiled: Any) -> Any: ...
    def fill(self, m: Any, bitmask: torch.Tensor, row: int) -> None: ...
    def accept(self, m: Any, token: int) -> bool: ...

    def fill_batch(self, ms: list, bitmask: torch.Tensor) -> None:
        for i, m in enumerate(ms):
            self.fill(m, bitmask, i)

    def size_bytes(self, compiled: Any) -> int | None:
        return None

    def error(self, m: Any) -> str:
        """The matcher's error after a fill ('' when none; only llguidance reports one this way)."""
        return ""


class Llguidance(Lib):
    name = "llguidance"

    def __init__(self, tok, vocab, eos, threads):
        import llguidance as llg
        super().__init__(tok, vocab, eos, threads)
        self.llg = llg
        self.tok = llg.LLTokenizer(tok.to_str(), n_vocab=vocab, eos_token=eos)
        self.executor = llg.LLExecutor(num_threads=threads)
        self.opts = {"whitespace_flexible": False, "item_separator": SEPARATORS[0], "key_separator": SEPARATORS[1]}

    def compile(self, kind, text):
        M = self.llg.LLMatcher
        grammar = {"json_schema": lambda: M.grammar_from_json_schema(text, defaults=self.opts),
                   "json_object": lambda: M.grammar_from_json_schema('{"type": "object"}', defaults=self.opts),
                   "regex": lambda: M.grammar_from_regex(text), "grammar": lambda: M.grammar_from_lark(text)}[kind]()
        m = M(self.tok, grammar, log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def matcher(self, compiled):
        return compiled.deep_copy()

    def fill(self, m, bitmask, row):
        m.unsafe_compute_mask_ptr(bitmask[row].data_ptr(), bitmask.shape[1] * 4)

    def fill_batch(self, ms, bitmask):
        self.executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(ms)], bitmask.data_ptr(),
                                              bitmask.shape[1] * 4, bitmask.shape[0])

    def accept(self, m, token):
        return m.consume_token(token)

    def error(self, m):
        return m.get_error() if m.is_error() else ""


class Xgrammar(Lib):
    name = "xgrammar"

    def __init__(self, tok, vocab, eos, threads):
        import xgrammar as xgr
        super().__init__(tok, vocab, eos, threads)
        self.xgr = xgr
        enc = [""] * vocab
        for s, i in tok.get_vocab(with_added_tokens=True).items():
            if i < vocab:
                enc[i] = s
        meta = xgr.TokenizerInfo._detect_metadata_from_hf(tok.to_str())
        info = xgr.TokenizerInfo(enc, meta["vocab_type"], vocab_size=vocab, stop_token_ids=eos,
                                 add_prefix_space=meta["add_prefix_space"])
        self.compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
        self.batch = xgr.BatchGrammarMatcher(threads)

    def compile(self, kind, text):
        c = self.compiler
        if kind in ("json_schema", "json_object"):
            return c.compile_json_schema(text if kind == "json_schema" else '{"type": "object"}',
                                         any_whitespace=False, separators=SEPARATORS)
        return c.compile_regex(text) if kind == "regex" else c.compile_lark(text)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, m, bitmask, row):
        m.fill_next_token_bitmask(bitmask, row)

    def fill_batch(self, ms, bitmask):
        self.batch.batch_fill_next_token_bitmask(ms, bitmask)

    def accept(self, m, token):
        return m.accept_token(token)

    def size_bytes(self, compiled):
        return compiled.memory_size_bytes


class OutlinesCore(Lib):
    name = "outlines_core"

    def __init__(self, tok, vocab, eos, threads):
        import outlines_core as oc
        super().__init__(tok, vocab, eos, threads)
        self.oc = oc
        special = {a["id"] for a in json.loads(tok.to_str())["added_tokens"]}
        dec, by_bytes = _byte_decoder(), {}
        for s, i in tok.get_vocab(with_added_tokens=True).items():
            if i not in special and i < vocab:
                by_bytes.setdefault(bytes(dec[c] for c in s), []).append(i)
        self.vocabulary = oc.Vocabulary(eos[0], by_bytes)      # one EOS id only

    def compile(self, kind, text):
        if kind == "grammar":
            raise ValueError("outlines-core has no context-free grammars (regex only)")
        rx = {"json_schema": lambda: self.oc.json_schema.build_regex_from_schema(text, r"[ ]?"),
              "json_object": lambda: self.oc.json_schema.build_regex_from_schema('{"type": "object"}', r"[ ]?"),
              "regex": lambda: text}[kind]()
        return self.oc.Index(rx, self.vocabulary)

    def matcher(self, compiled):
        return self.oc.Guide(compiled)

    def fill(self, m, bitmask, row):
        m.write_mask_into(bitmask[row].data_ptr(), bitmask.shape[1], 4)

    def accept(self, m, token):
        try:
            m.advance(token, return_tokens=False)
            return True
        except ValueError:
            return False


WRAPPERS: dict[str, type[Lib]] = {"llguidance": Llguidance, "xgrammar": Xgrammar, "outlines_core": OutlinesCore}


def importable() -> list[str]:
    out = []
    for name in LIBS:
        try:
            __import__(name)
            out.append(name)
        except ImportError:
            pass
    return out


# ---------------------------------------------------------------- measurements
def bitmask(rows: int, vocab: int) -> torch.Tensor:
    return torch.full((rows, (vocab + 31) // 32), -1, dtype=torch.int32)   # [rows, ceil(vocab/32)]


def allowed(bm: torch.Tensor, row: int, token: int) -> bool:
    return bool((int(bm[row, token // 32]) >> (token % 32)) & 1)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def compile_times(lib: Lib, kind: Kind, text: str, repeats: int, budget_s: float = 20.0) -> tuple[float, float]:
    """(compile ms p50, first mask ms p50) over fresh compiles."""
    comp, first, spent = [], [], 0.0
    bm = bitmask(1, lib.vocab)
    for _ in range(repeats):
        t0 = time.perf_counter()
        c = lib.compile(kind, text)
        t1 = time.perf_counter()
        lib.fill(lib.matcher(c), bm, 0)
        t2 = time.perf_counter()
        comp.append((t1 - t0) * 1e3)
        first.append((t2 - t1) * 1e3)
        spent += t2 - t0
        if spent > budget_s:
            break
    return statistics.median(comp), statistics.median(first)


def walk_one(lib: Lib, compiled: Any, tokens: list[int]) -> tuple[float, bool]:
    """Mean µs per fill over one walk of `tokens`; whether every token was allowed and accepted
    and the end admits EOS."""
    m, bm, ts, ok = lib.matcher(compiled), bitmask(1, lib.vocab), [], True
    for t in tokens:
        t0 = time.perf_counter()
        lib.fill(m, bm, 0)
        ts.append(time.perf_counter() - t0)
        ok = ok and allowed(bm, 0, t) and lib.accept(m, t)
        if not ok:
            break
    lib.fill(m, bm, 0)
    return statistics.fmean(ts) * 1e6, ok and any(allowed(bm, 0, e) for e in lib.eos)


def walk_batch(lib: Lib, rows: list[tuple[Any, list[int]]], steps: int) -> float:
    """µs per batched fill of len(rows) rows, each row walking its own instance (restarted at its end)."""
    bm = bitmask(len(rows), lib.vocab)
    state = [[lib.matcher(c), 0] for c, _ in rows]
    ts = []
    for _ in range(steps):
        ms = [s[0] for s in state]
        t0 = time.perf_counter()
        lib.fill_batch(ms, bm)
        ts.append(time.perf_counter() - t0)
        for (c, toks), s in zip(rows, state):
            if s[1] == len(toks):
                s[0], s[1] = lib.matcher(c), 0
            else:
                lib.accept(s[0], toks[s[1]])
                s[1] += 1
    return statistics.median(ts) * 1e6


def memory(lib: Lib, n_grammars: int, n_matchers: int) -> tuple[float, float, int | None]:
    """(RSS bytes per compiled grammar, per matcher a few tokens in, the library's own size of one
    grammar). Run first, before other measurements leave freed memory to reuse."""
    kind, text, inst = realistic()["nested"]
    toks = _encode(inst)[:8]
    bm = bitmask(1, lib.vocab)
    before = rss_bytes()
    keep = [lib.compile(kind, text.replace("order_id", f"order_{i}")) for i in range(n_grammars)]
    for c in keep:
        lib.fill(lib.matcher(c), bm, 0)
    per_grammar = (rss_bytes() - before) / n_grammars
    before = rss_bytes()
    ms = [lib.matcher(keep[0]) for _ in range(n_matchers)]
    for m in ms:
        for t in toks:
            lib.fill(m, bm, 0)
            lib.accept(m, t)
    per_matcher = (rss_bytes() - before) / n_matchers
    return per_grammar, per_matcher, lib.size_bytes(keep[0])


SWITCH_S = 0.5     # the switch interval during gil_released: well above one call of `work`


def gil_released(work: Callable[[], None], calls: int = 5) -> tuple[float, float]:
    """Does `work`, run in a worker thread, release the GIL while the main thread runs pure Python?

    Two signs, neither a plain timing (the machine is shared), with the switch interval raised to
    SWITCH_S so that neither thread is made to hand the GIL over at a call's edges:
      ran:   the fraction of calls during which the main thread made progress (it increments a
             counter the worker reads before and after each call): ~1 releases, 0 holds;
      wait:  a call's median wall time in the worker, in switch intervals: a call that released the
             GIL must wait for the busy main thread to give it back (~1), one that held it does not (~0).
    """
    box, done, moved, walls = [0], threading.Event(), [], []

    def worker():
        for _ in range(calls):
            before, t0 = box[0], time.perf_counter()
            work()
            walls.append(time.perf_counter() - t0)
            moved.append(box[0] != before)
        done.set()

    old = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_S)
    try:
        th = threading.Thread(target=worker, daemon=True)
        th.start()
        while not done.is_set():
            box[0] += 1
        th.join()
    finally:
        sys.setswitchinterval(old)
    return sum(moved) / len(moved), statistics.median(walls) / SWITCH_S


def gil_line(signs: tuple[float, float]) -> str:
    ran, wait = signs
    return f"{'yes' if wait > 0.5 else 'no'} (ran {ran:.1f}, wait {wait:.2f})"


def decode_step(model_dir: Path, rows: int) -> tuple[Callable[[], torch.Tensor], Any]:
    """One decode step of `rows` rows on the served model, forward and LM head (the ratio lines'
    baseline): (a function running it and returning logits [rows, vocab], the loaded model)."""
    from server.engine.batch import Segment, make_forward_batch
    from server.engine.kv_cache import KVCache
    from server.model.loader import load_model
    loaded = load_model(model_dir, torch.device("cpu"), torch.float32)
    m = loaded.model
    bs = 16
    kv = KVCache(m.shape, 1 + rows * 4, bs, m.device, m.dtype)        # 64 positions per row
    tables = [kv.blocks.allocate(4) for _ in range(rows)]
    kv.zero_fresh()
    batch = make_forward_batch([Segment(t, [7], 40, True) for t in tables], m.device, bs)
    run = lambda: m.logits(m.forward(batch, kv.layers, return_hidden=True))    # noqa: E731
    for _ in range(2):
        run()
    return run, loaded


def median_ms(f: Callable[[], Any], repeats: int) -> float:
    ts = []
    for _ in range(max(3, repeats)):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def ours(run: Callable[[], torch.Tensor], loaded: Any, repeats: int, smoke: bool) -> None:
    """The module on top of llguidance: apply_masks' cost, and a constrained step (masks filled by
    MaskFiller during the forward, then applied) against the plain step, interleaved."""
    from server.engine import constraints as C
    vocab = run().shape[1]
    info = C.TokenizerInfo(loaded.tokenizer, vocab, loaded.eos_ids)
    comp = C.ConstraintCompiler(info, C.Limits())
    cases = realistic()
    names = ("flat", "nested", "pydantic", "tool_call")
    compiled = [comp.compile(C.Constraint(cases[n][0], cases[n][1]), "bench") for n in names]
    toks = [_encode(cases[n][2]) for n in names]
    matchers = [compiled[i % 4].matcher() for i in range(32)]
    for i, m in enumerate(matchers):                       # rows at different places in their instance
        for t in toks[i % 4][:(i * 3) % len(toks[i % 4])]:
            m.accept(t)
    filler, bitmask = C.MaskFiller(info, 32), C.allocate_bitmask(32, info)
    C.fill_masks(matchers, bitmask, C.llg.LLExecutor(1))
    logits = run()
    half = [m if i % 2 else None for i, m in enumerate(matchers)]
    def apply_us(rows: list) -> float:
        copies = [logits.clone() for _ in range(max(5, repeats * 4))]
        return median_ms(lambda: C.apply_masks(copies.pop(), rows, bitmask), len(copies) - 1) * 1e3

    fill_us = median_ms(lambda: C.fill_masks(matchers, bitmask, C.llg.LLExecutor(1)), repeats * 4) * 1e3
    print(f"\nours (server/engine/constraints.py, llguidance), 32 rows, vocab {vocab}:")
    print(f"  fill_masks {fill_us:.0f} µs (on the MaskFiller's thread during the forward); apply_masks: all 32 rows "
          f"constrained {apply_us(matchers):.0f} µs, 16 of 32 {apply_us(half):.0f} µs")

    def constrained():
        filler.start(matchers)
        out = run()
        C.apply_masks(out, matchers, filler.wait())

    plain, masked = [], []
    for _ in range(max(3, repeats)):                 # interleaved: the machine's load drifts
        plain.append(median_ms(run, 1))
        masked.append(median_ms(constrained, 1))
    p, q = statistics.median(plain), statistics.median(masked)
    print(f"  decode step: plain {p:.2f} ms, constrained (masks filled during the forward, then applied) {q:.2f} ms")
    print(f"ratio: constrained step / plain step (32 rows, all constrained) = {q / p:.3f}   "
          f"(throughput {p / q:.3f}x; issue 23's target >= 0.9x)")
    filler.close()
    comp.close()


# ---------------------------------------------------------------- hostile inputs, in children
def child(lib_name: str, model_dir: str, smoke: bool, cases: list[str]) -> None:
    """Run in a child: compile (+ first mask) each named hostile case, one JSON line each."""
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY_BYTES, CHILD_MEMORY_BYTES))
    tok, vocab, eos = load_tokenizer(Path(model_dir))
    lib = WRAPPERS[lib_name](tok, vocab, eos, 1)
    inputs = hostile(smoke)
    print(json.dumps({"ready": True}), flush=True)
    for name in cases:
        kind, text = inputs[name]
        t0 = time.perf_counter()
        try:
            m = lib.matcher(lib.compile(kind, text))
            lib.fill(m, bitmask(1, vocab), 0)
            msg = lib.error(m).strip().split("\n")[0]
            status = "error" if msg else "ok"
        except BaseException as e:  # noqa: BLE001 - MemoryError included: it is a result
            status, msg = "error", f"{type(e).__name__}: {e}"
        print(json.dumps({"case": name, "status": status, "ms": (time.perf_counter() - t0) * 1e3,
                          "msg": msg[:90].replace("\n", " ")}), flush=True)


def run_hostile(lib_name: str, model_dir: Path, smoke: bool, deadline_s: float) -> dict[str, str]:
    """Each hostile case in a child (one child runs the cases in turn; one that hangs is killed and
    the next child starts after it)."""
    todo, out = [c for c in hostile(smoke) if not smoke or c in SMOKE_HOSTILE], {}
    while todo:
        cmd = [sys.executable, __file__] + (["--smoke"] if smoke else []) + ["--child", lib_name, str(model_dir)] + todo
        err = tempfile.TemporaryFile("w+")
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=lambda: ([lines.put(ln) for ln in p.stdout], lines.put(None)), daemon=True).start()
        try:
            if lines.get(timeout=120) is None:          # the child's imports and tokenizer
                p.wait()
                err.seek(0)
                why = (err.read().strip().splitlines() or ["?"])[-1][:80]
                out.update({c: f"child failed to start (exit {p.returncode}: {why})" for c in todo})
                return out
            while todo:
                line = lines.get(timeout=deadline_s)
                if line is None:
                    out[todo.pop(0)] = "crashed"
                    break
                r = json.loads(line)
                out[r["case"]] = f"{r['status']} {r['ms']:.0f}ms" + (f" ({r['msg']})" if r["msg"] else "")
                todo.remove(r["case"])
        except queue.Empty:
            out[todo.pop(0)] = f"TIMEOUT >{deadline_s:.0f}s"
        finally:
            p.kill()
            p.wait()
            err.close()
    return out


# ---------------------------------------------------------------- the run
_TOKENIZER: list[Tokenizer] = []


def _encode(text: str) -> list[int]:
    return _TOKENIZER[0].encode(text, add_special_tokens=False).ids


def load_tokenizer(model_dir: Path) -> tuple[Tokenizer, int, list[int]]:
    from server.model.loader import eos_ids, read_config
    cfg = read_config(model_dir)
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return tok, int(cfg["vocab_size"]), sorted(eos_ids(model_dir, cfg, tok))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="model spec as for the server's --model (default: SmolLM2)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch threads and the libraries' batch threads")
    ap.add_argument("--deadline", type=float, default=30.0, help="seconds per hostile input")
    ap.add_argument("--smoke", action="store_true", help="tiny tokenizer, 1 repeat, small hostile inputs (seconds)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.smoke, args.child[2:])
    if args.smoke:
        args.model, args.repeats, args.deadline = "tiny", 1, 4.0
    torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model, DEFAULT_CACHE / "models")
    tok, vocab, eos = load_tokenizer(model_dir)
    _TOKENIZER.append(tok)
    names = importable()
    print(f"model {model_dir.name}: vocab {vocab}, eos {eos}; candidates importable: {names or 'none'}")
    print(f"ratio: candidates importable = {len(names)} (of {len(LIBS)})")
    if not names:
        return
    run, loaded = decode_step(model_dir, 32)
    step = median_ms(run, args.repeats)
    print(f"baseline: one decode step, 32 rows: {step:.2f} ms")
    cases = realistic()
    gil_calls = 3 if args.smoke else 5
    rows: dict[str, dict[str, str]] = {}
    mask32: dict[str, float] = {}
    compile_p50: dict[str, float] = {}
    for name in names:
        lib = WRAPPERS[name](tok, vocab, eos, args.threads)
        r = rows.setdefault(name, {})
        g, mt, own = memory(lib, 5 if args.smoke else 50, 64 if args.smoke else 1000)
        r["memory"] = (f"grammar ~{g / 1e6:.2f} MB RSS" + (f" (own {own / 1e6:.2f} MB)" if own else "")
                       + f", matcher ~{mt / 1e3:.1f} kB RSS")
        compiled, walks, c_json = {}, [], []
        for case, (kind, text, inst) in cases.items():
            try:
                c_ms, f_ms = compile_times(lib, kind, text, args.repeats)
                compiled[case] = lib.compile(kind, text)
            except Exception as e:  # noqa: BLE001 - a gap is a result
                r[f"compile {case}"] = f"error ({str(e)[:40]})"
                continue
            r[f"compile {case}"] = f"{c_ms:.2f} + first mask {f_ms:.2f} ms"
            if kind == "json_schema":
                c_json.append(c_ms)
            toks = tok.encode(inst, add_special_tokens=False).ids
            us = [walk_one(lib, compiled[case], toks) for _ in range(max(1, args.repeats // 2))]
            walks.append(statistics.median(u for u, _ in us))
            r[f"mask/token 1 row {case}"] = f"{walks[-1]:.1f} µs" + ("" if all(ok for _, ok in us) else " (REJECTED)")
        json_cases = [c for c in ("flat", "nested", "pydantic", "tool_call") if c in compiled]
        if c_json:
            compile_p50[name] = statistics.median(c_json)
        if json_cases:
            batch = [(compiled[c], tok.encode(cases[c][2], add_special_tokens=False).ids)
                     for c in (json_cases * 32)[:32]]
            mask32[name] = walk_batch(lib, batch, 8 if args.smoke else 64)
            r["mask 32 rows (batch call)"] = f"{mask32[name]:.0f} µs per step = {mask32[name] / 32:.1f} µs/row"
            n, ms = 32, []
            while True:     # rows enough for a fill of >= 5 ms: a shorter call can end before the main thread wakes
                ms = [lib.matcher(compiled[c]) for c in (json_cases * n)[:n]]
                bmn = bitmask(n, vocab)
                t0 = time.perf_counter()
                lib.fill_batch(ms, bmn)
                if time.perf_counter() - t0 > 5e-3 or n >= 8192:
                    break
                n *= 2
            r["GIL released by a batch fill"] = \
                f"{gil_line(gil_released(lambda: lib.fill_batch(ms, bmn), gil_calls))} at {n} rows"
        r.update({f"hostile {k}": v for k, v in run_hostile(name, model_dir, args.smoke, args.deadline).items()})
        feats = features()
        gaps = []
        for feat, (kind, text) in feats.items():
            try:
                lib.compile(kind, text)
            except Exception:  # noqa: BLE001
                gaps.append(feat)
        r["features not compiled"] = ", ".join(gaps) or "none"
    big = list(range(300_000, 0, -1))
    print(f"GIL controls: sorted() (holds it) {gil_line(gil_released(lambda: sorted(big), gil_calls))}, "
          f"time.sleep (releases it) {gil_line(gil_released(lambda: time.sleep(0.002), gil_calls))}")
    keys = list(dict.fromkeys(k for r in rows.values() for k in r))
    width = max(len(k) for k in keys)
    print(f"\n{'':{width}}  " + "  |  ".join(names))
    for k in keys:
        print(f"{k:{width}}  " + "  |  ".join(rows[n].get(k, "-") for n in names))
    print("\nratio: mask fill 32 rows / decode step 32 rows: "
          + "  ".join(f"{n} = {mask32[n] / 1e3 / step:.4f}" for n in names if n in mask32))
    print("ratio: compile p50 (JSON schemas) / decode step: "
          + "  ".join(f"{n} = {compile_p50[n] / step:.3f}" for n in names if n in compile_p50))
    if "llguidance" in names:
        ours(run, loaded, args.repeats, args.smoke)


if __name__ == "__main__":
    main()
