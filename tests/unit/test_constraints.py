"""Constrained decoding per row (server/engine/constraints.py) on the tiny model's byte-level tokenizer.

The property: for hypothesis-generated JSON schemas within llguidance's supported subset, a fake model
(random logits, nudged now and then towards closing tokens) driven through `apply_masks` + `accept`
until EOS always writes JSON that `jsonschema` validates against the schema. Beside it: rows without
a matcher stay bit-identical, EOS and end-of-turn handling, rollback, the cache by hash, and limits
and hostile inputs, each an InvalidField naming the caller's field (pytest-timeout bounds "quickly").
"""
from __future__ import annotations

import asyncio
import json
import threading
import time

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from server.engine import constraints as C
from server.errors import InvalidField
from server.model.loader import eos_ids, read_config

FIELD = "response_format.json_schema.schema"
MAX_STEPS = 400


@pytest.fixture(scope="module")
def tok(tiny_model_dir) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def info(tiny_model_dir, tok) -> C.TokenizerInfo:
    cfg = read_config(tiny_model_dir)
    return C.TokenizerInfo(tok, cfg["vocab_size"], eos_ids(tiny_model_dir, cfg, tok))


@pytest.fixture(scope="module")
def compiler(info):
    c = C.ConstraintCompiler(info, C.Limits())
    yield c
    c.close()


def ids(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def allowed(bitmask: torch.Tensor, row: int) -> set[int]:
    words = bitmask[row].tolist()
    return {w * 32 + b for w, word in enumerate(words) for b in range(32) if (word >> b) & 1}


def generate(compiled: C.Compiled, info: C.TokenizerInfo, tok: Tokenizer, seed: int,
             stop_ids: frozenset[int] = frozenset()) -> list[int]:
    """A fake model: random logits (a second, unconstrained row beside it must come out untouched),
    masked, greedy; every other step a bonus for closing tokens so that walks end."""
    g = torch.Generator().manual_seed(seed)
    closers = ids(tok, '"}]') + sorted(info.eos_ids | stop_ids)
    m, bitmask, executor, out = compiled.matcher(stop_ids), C.allocate_bitmask(2, info), C.llg.LLExecutor(1), []
    for step in range(MAX_STEPS):
        logits = torch.randn(2, info.vocab_size, generator=g)
        if step % 2:
            logits[0, closers] += 4.0
        other = logits[1].clone()
        C.fill_masks([m, None], bitmask, executor)
        assert C.apply_masks(logits, [m, None], bitmask) == []
        assert torch.equal(logits[1], other)
        token = int(logits[0].argmax())
        assert m.accept(token), m.error
        if token in info.eos_ids | stop_ids:
            assert m.is_done()
            return out
        out.append(token)
    raise AssertionError(f"no EOS after {MAX_STEPS} tokens: {tok.decode(out)!r}")


# ---------------------------------------------------------------- the property
NAMES = ["a", "b", "id", "name", "x_1"]
SCALARS = st.one_of(st.integers(-50, 50), st.booleans(), st.none(), st.text("abcxyz", max_size=3))


@st.composite
def string_schema(draw):
    hi = draw(st.integers(0, 6))
    s = {"type": "string", "maxLength": hi}
    if draw(st.booleans()):
        s["minLength"] = draw(st.integers(0, hi))
    return s


@st.composite
def integer_schema(draw):
    lo = draw(st.integers(-1000, 1000))
    return {"type": "integer", "minimum": lo, "maximum": lo + draw(st.integers(0, 5000))}


LEAVES = st.one_of(
    string_schema(), integer_schema(),
    st.just({"type": "boolean"}), st.just({"type": "null"}),
    st.builds(lambda lo, span: {"type": "number", "minimum": lo, "maximum": lo + span},
              st.integers(-100, 100), st.integers(1, 100)),
    st.lists(SCALARS, min_size=1, max_size=4, unique_by=json.dumps).map(lambda v: {"enum": v}),
    SCALARS.map(lambda v: {"const": v}),
    st.sampled_from([{"type": "string", "pattern": "^[a-z]{1,4}-[0-9]{2}$"}, {"type": "string", "format": "date"}]),
)


def composites(children):
    @st.composite
    def obj(draw):
        names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=4, unique=True))
        props = {n: draw(children) for n in names}
        return {"type": "object", "properties": props, "additionalProperties": False,
                "required": [n for n in names if draw(st.booleans())]}

    @st.composite
    def arr(draw):
        lo = draw(st.integers(0, 2))
        return {"type": "array", "items": draw(children), "minItems": lo, "maxItems": lo + draw(st.integers(0, 2))}

    return st.one_of(obj(), arr(), st.lists(children, min_size=2, max_size=3).map(lambda s: {"anyOf": s}))


SCHEMAS = st.recursive(LEAVES, composites, max_leaves=6)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(schema=SCHEMAS, seed=st.integers(0, 2 ** 31), chat=st.booleans())
def test_every_constrained_completion_validates(schema, seed, chat, compiler, info, tok):
    """`chat`: the row also ends on an end-of-turn token (id 0 stands in for one)."""
    compiled = compiler.compile(C.Constraint("json_schema", json.dumps(schema)), FIELD)
    text = tok.decode(generate(compiled, info, tok, seed, frozenset({0}) if chat else frozenset()))
    jsonschema.validate(json.loads(text), schema)


def test_the_validation_can_fail():
    """jsonschema does refuse what breaks a schema (so the property above can fail)."""
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"a": 1, "c": 2}, {"type": "object", "properties": {"a": {"type": "string"}},
                                               "additionalProperties": False})


@pytest.mark.parametrize("kind,text,check", [
    ("json_object", "", lambda out: isinstance(json.loads(out), dict)),
    ("regex", r"[0-9]{3}-[A-Z]{2,4}", lambda out: __import__("re").fullmatch(r"[0-9]{3}-[A-Z]{2,4}", out)),
    ("grammar", 'start: expr\nexpr: NUM | "(" expr "+" expr ")"\nNUM: /[0-9]{1,3}/\n',
     lambda out: __import__("re").fullmatch(r"[0-9()+]+", out) and out.count("(") == out.count(")")),
])
@pytest.mark.parametrize("seed", range(4))
def test_other_kinds_are_enforced(kind, text, check, seed, compiler, info, tok):
    out = tok.decode(generate(compiler.compile(C.Constraint(kind, text), FIELD), info, tok, seed))
    assert check(out), out


def test_a_recursive_tree_schema_is_served_and_validates(compiler, info, tok):
    tree = {"$defs": {"node": {"type": "object", "additionalProperties": False, "required": ["v", "kids"],
                               "properties": {"v": {"type": "integer", "minimum": 0, "maximum": 9},
                                              "kids": {"type": "array", "maxItems": 1,
                                                       "items": {"$ref": "#/$defs/node"}}}}},
            "$ref": "#/$defs/node"}
    compiled = compiler.compile(C.Constraint("json_schema", json.dumps(tree)), FIELD)
    for seed in range(5):
        jsonschema.validate(json.loads(tok.decode(generate(compiled, info, tok, seed))), tree)


# ---------------------------------------------------------------- masks in a batch
def test_rows_without_a_matcher_are_bit_identical(compiler, info, tok):
    compiled = compiler.compile(C.Constraint("json_schema", '{"type": "integer"}'), FIELD)
    matchers = [None, compiled.matcher(), None, compiled.matcher(), None]
    matchers[3].accept(ids(tok, "4")[0])
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(5, info.vocab_size).to(dtype)
        logits[0, 7] = float("nan")                       # whatever a free row holds stays as it was
        before = logits.clone()
        bitmask = C.allocate_bitmask(5, info)
        C.fill_masks(matchers, bitmask, C.llg.LLExecutor(1))
        assert C.apply_masks(logits, matchers, bitmask) == []
        for r in (0, 2, 4):
            assert torch.equal(logits[r].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                               before[r].view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
        for r in (1, 3):
            ok = allowed(bitmask, r)
            assert ok and len(ok) < info.vocab_size
            for t in range(info.vocab_size):
                assert (logits[r, t] == before[r, t]) if t in ok else logits[r, t] == float("-inf")
    digits = {i for d in "0123456789" for i in ids(tok, d)}
    assert allowed(bitmask, 1) & set(range(info.vocab_size)) - {0, 1, 2} <= digits | set(ids(tok, "-"))


def test_both_unpackings_agree():
    """numpy's unpackbits (CPU logits) and the shifts (GPU logits) read the same bits, bit 31 included."""
    bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (5, 9), dtype=torch.int32)
    bits[0, 0] = -2 ** 31                                    # only bit 31
    for vocab in (288, 270):
        a, b = C.unpack(bits, vocab, torch.device("cpu")), C.unpack_shifts(bits, vocab)
        assert a.shape == b.shape == (5, vocab) and torch.equal(a, b)
        assert a[0, :32].tolist() == [False] * 31 + [True]
        assert a[1, 40] == bool((int(bits[1, 1]) >> 8) & 1)


def test_no_matcher_at_all_writes_nothing(info):
    logits = torch.randn(3, info.vocab_size)
    before = logits.clone()
    assert C.apply_masks(logits, [None, None, None], C.allocate_bitmask(3, info)) == []
    assert torch.equal(logits, before)


def test_the_mask_filler_matches_a_direct_fill(compiler, info, tok):
    compiled = compiler.compile(C.Constraint("json_schema", json.dumps(
        {"type": "object", "properties": {"k": {"enum": ["yes", "no"]}}, "required": ["k"]})), FIELD)
    matchers = [compiled.matcher(), None, compiled.matcher()]
    for t in ids(tok, '{"k": "y'):
        matchers[2].accept(t)
    filler = C.MaskFiller(info, max_rows=4)
    try:
        filler.start(matchers)
        with pytest.raises(RuntimeError):
            filler.start(matchers)
        got = filler.wait().clone()
        direct = C.allocate_bitmask(4, info)
        C.fill_masks(matchers, direct, C.llg.LLExecutor(1))
        assert torch.equal(got[[0, 2]], direct[[0, 2]])
        assert allowed(got, 2) == {ids(tok, "e")[0]}
        assert (got[1] == -1).all()                     # a row without a matcher is left as it was
    finally:
        filler.close()


# ---------------------------------------------------------------- EOS, end of turn, errors, rollback
def test_once_complete_only_eos_or_the_end_of_turn_is_allowed(compiler, info, tok):
    compiled = compiler.compile(C.Constraint("json_schema", json.dumps(
        {"type": "object", "properties": {"a": {"type": "integer", "maximum": 9}}, "required": ["a"],
         "additionalProperties": False})), FIELD)
    end_of_turn = frozenset({0})
    m, bitmask = compiled.matcher(end_of_turn), C.allocate_bitmask(1, info)
    text = ids(tok, '{"a": 7')
    for t in text:
        m.fill_mask(bitmask[0])
        assert not (allowed(bitmask, 0) & (info.eos_ids | end_of_turn))    # not complete: no EOS
        assert m.accept(t)
    assert not m.accept(sorted(info.eos_ids)[0]) and m.error is not None    # EOS before the end: refused
    m = compiled.matcher(end_of_turn)
    for t in text + ids(tok, "}"):
        assert m.accept(t)
    m.fill_mask(bitmask[0])
    assert allowed(bitmask, 0) == info.eos_ids | end_of_turn
    assert m.is_done()
    assert m.accept(0) and m.is_done() and not m.accept(ids(tok, " ")[0])


def test_a_refused_token_puts_the_row_in_error_and_apply_reports_it(compiler, info, tok):
    m = compiler.compile(C.Constraint("regex", "[0-9]+"), FIELD).matcher()
    assert not m.accept(ids(tok, "x")[0])
    assert m.error
    logits, bitmask = torch.randn(2, info.vocab_size), C.allocate_bitmask(2, info)
    C.fill_masks([None, m], bitmask, C.llg.LLExecutor(1))
    assert C.apply_masks(logits, [None, m], bitmask) == [1]


def test_rollback(compiler, info, tok):
    m = compiler.compile(C.Constraint("regex", "(cat|dog)s+"), FIELD).matcher()
    for t in ids(tok, "ca"):
        assert m.accept(t)
    assert m.rollback(2)
    for t in ids(tok, "dogs"):
        assert m.accept(t)
    eos = sorted(info.eos_ids)[0]
    assert m.accept(eos) and m.is_done()
    assert m.rollback(1) and not m.is_done()          # the EOS undone: the row may go on
    assert m.accept(ids(tok, "s")[0]) and m.accept(eos) and m.is_done()
    assert m.rollback(3) and not m.is_done()          # EOS, "s", "s": back to "dog"
    assert not m.accept(eos) and m.error             # "dog" is not complete


# ---------------------------------------------------------------- the cache
def test_cached_by_hash_of_kind_and_text(info):
    c = C.ConstraintCompiler(info, C.Limits(max_cached=2))
    try:
        a = C.Constraint("json_schema", '{"type": "string"}')
        first = c.compile(a, FIELD)
        assert c.compile(C.Constraint("json_schema", '{"type": "string"}'), "other") is first
        assert (c.hits, c.misses) == (1, 1)
        assert c.compile(C.Constraint("json_schema", '{"type":"string"}'), FIELD) is not first   # other text
        assert C.Constraint("regex", "true").key != C.Constraint("json_schema", "true").key
        c.compile(C.Constraint("regex", "true"), FIELD)                                        # other kind
        with pytest.raises(InvalidField):
            c.compile(C.Constraint("json_schema", "true"), FIELD)
        assert c.cached() == 2 and c.misses == 4                                               # the LRU bound
        assert c.compile(a, FIELD) is not first and c.misses == 5                              # `a` was dropped
    finally:
        c.close()


def test_refusals_are_cached_and_name_each_callers_field(info):
    c = C.ConstraintCompiler(info, C.Limits())
    try:
        bad = C.Constraint("json_schema", '{"type": "array", "uniqueItems": true}')
        for field in ("response_format.json_schema.schema", "params.constraint.json_schema"):
            with pytest.raises(InvalidField) as e:
                c.compile(bad, field)
            assert e.value.field == field and str(e.value).startswith(field) and "uniqueItems" in str(e.value)
        assert (c.hits, c.misses) == (1, 1)
    finally:
        c.close()


def test_one_compile_for_concurrent_callers_and_async(info):
    c = C.ConstraintCompiler(info, C.Limits(compile_threads=2))
    try:
        spec = C.Constraint("json_schema", json.dumps({"type": "object", "properties": {
            f"p{i}": {"type": "integer"} for i in range(300)}}))
        got: list = []
        threads = [threading.Thread(target=lambda: got.append(c.compile(spec, FIELD))) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(got) == 6 and len({id(g) for g in got}) == 1 and c.misses == 1
        assert asyncio.run(c.compile_async(spec, FIELD)) is got[0]
        with pytest.raises(InvalidField):
            asyncio.run(c.compile_async(C.Constraint("regex", "(("), FIELD))
    finally:
        c.close()


# ---------------------------------------------------------------- limits and hostile inputs
def _tools(n: int) -> str:
    return json.dumps({"anyOf": [{"type": "object", "required": ["name", "arguments"], "properties": {
        "name": {"const": f"tool_{i}"}, "arguments": {"type": "object", "properties": {
            "a": {"type": "string"}, "n": {"type": "integer"}}}}} for i in range(n)]})


def _big_schema() -> str:           # ~10 MB
    return json.dumps({"type": "object", "properties": {f"field_{i}": {"type": "string", "description": "d" * 480}
                                                        for i in range(20_000)}})


HOSTILE = {
    "10 MB schema": ("json_schema", _big_schema),
    "10,000 tools": ("json_schema", lambda: _tools(10_000)),
    "recursive $ref loop": ("json_schema", lambda: '{"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}'),
    "mutual $ref loop": ("json_schema", lambda: json.dumps({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {
        "$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"})),
    "dangling $ref": ("json_schema", lambda: '{"$ref": "#/$defs/nowhere"}'),
    "nesting 5000 deep": ("json_schema", lambda: '{"type": "array", "items": ' * 5000 + "{}" + "}" * 5000),
    "unsupported keyword": ("json_schema", lambda: '{"not": {"type": "string"}}'),
    "unsatisfiable": ("json_schema", lambda: '{"type": "integer", "minimum": 5, "maximum": 1}'),
    "not JSON": ("json_schema", lambda: '{"type": '),
    "not an object": ("json_schema", lambda: "[1, 2]"),
    "regex look-around": ("regex", lambda: "(?=a)b"),
    "regex backreference": ("regex", lambda: r"(a)\1"),
    "regex unclosed": ("regex", lambda: "(("),
    "grammar unknown rule": ("grammar", lambda: "start: foo"),
    "empty regex": ("regex", lambda: ""),
    "unknown kind": ("yaml", lambda: "a: b"),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("max_bytes", [64 * 1024, 64 * 1024 * 1024], ids=["server limit", "library limits"])
@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_inputs_are_invalid_field_naming_the_field(case, max_bytes, info):
    kind, make = HOSTILE[case]
    c = C.ConstraintCompiler(info, C.Limits(max_bytes=max_bytes, compile_timeout_s=20))
    try:
        with pytest.raises(InvalidField) as e:
            c.compile(C.Constraint(kind, make()), FIELD)
        assert e.value.field == FIELD and str(e.value).startswith(FIELD), str(e.value)
        assert len(str(e.value)) < 500
        if "loop" in case:
            assert "no output can satisfy it" in str(e.value)
        c.compile(C.Constraint("json_schema", '{"type": "boolean"}'), FIELD)       # and it still works
    finally:
        c.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("regex", ["(a|b)*a(a|b){25}", "((a{1,100}){1,100}){1,100}", "(x+x+)+y", "[a-z]{20000}"])
def test_regexes_that_explode_a_dfa_are_served_lazily(regex, compiler, info, tok):
    """llguidance builds its lexer lazily (derivatives), with fuel per step: what blows up a DFA
    (2^25 states, 10^6 counted repetitions) compiles in milliseconds and each mask stays bounded."""
    m = compiler.compile(C.Constraint("regex", regex), FIELD).matcher()
    bitmask = C.allocate_bitmask(1, info)
    for _ in range(60):
        m.fill_mask(bitmask[0])
        ok = sorted(allowed(bitmask, 0) - info.eos_ids)
        if not ok:
            break
        assert m.accept(ok[-1])


@pytest.mark.timeout(60)
def test_a_slow_compile_times_out_and_a_queued_one_never_starts(info):
    slow = C.Constraint("json_schema", json.dumps({"type": "object", "properties": {
        f"f{i}": {"type": "string"} for i in range(2000)}}))          # optional properties: ~0.4 s on tiny
    queued = C.Constraint("json_schema", json.dumps({"type": "object", "properties": {
        f"g{i}": {"type": "string"} for i in range(2000)}}))
    c = C.ConstraintCompiler(info, C.Limits(compile_timeout_s=0.01, compile_threads=1))
    try:
        for spec in (slow, queued):
            t0 = time.monotonic()
            with pytest.raises(InvalidField, match="did not compile within") as e:
                c.compile(spec, FIELD)
            assert e.value.field == FIELD and time.monotonic() - t0 < 5
        deadline = time.monotonic() + 30
        while c._inflight and time.monotonic() < deadline:    # the running one goes on to its end
            time.sleep(0.05)
        assert not c._inflight
        assert slow.key in c._cache and queued.key not in c._cache
        assert c.compile(slow, FIELD).constraint == slow             # its late result was kept
    finally:
        c.close()


def test_the_size_limit_counts_utf8_bytes(info):
    c = C.ConstraintCompiler(info, C.Limits(max_bytes=100))
    try:
        text = json.dumps({"const": "é" * 40}, ensure_ascii=False)    # 50 chars, 90 bytes: fits
        c.compile(C.Constraint("json_schema", text), FIELD)
        with pytest.raises(InvalidField, match="at most 100"):
            c.compile(C.Constraint("json_schema", json.dumps({"const": "é" * 60}, ensure_ascii=False)), FIELD)
    finally:
        c.close()


def test_limits_come_from_the_config():
    from server.config import ServerConfig
    cfg = ServerConfig(max_constraint_bytes=1234, constraint_compile_timeout_s=2.5, constraint_compile_threads=3,
                       constraint_cache_size=7, constraint_mask_threads=2)
    assert C.Limits.from_config(cfg) == C.Limits(1234, 2.5, 3, 7, 2)
