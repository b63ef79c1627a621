"""Every validation rule, each with an input that tries to break it."""
from __future__ import annotations

import json
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafleet.archive import make_archive
from server.adapters import formats, safe_io, validate
from server.adapters.weights import AdapterKind
from server.adapters.refs import parse_ref, validate_name
from server.adapters.validate import AdapterLimits
from server.errors import DataLoss, FailedPrecondition, InvalidArgument, LoraFleetError, ResourceExhausted
from tests.unit.adapter_fixtures import (BASE, LIMITS, bottleneck_archive, hostile_corpus, peft_archive,
                                         raw_safetensors, split_archive, with_config, with_tensors)

CORPUS = hostile_corpus()
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = Q_A.replace("lora_A", "lora_B")


def parse(archive: bytes, limits: AdapterLimits = LIMITS, **kw):
    return validate.parse_upload(archive, BASE, limits, **kw)


@pytest.mark.parametrize("case", CORPUS, ids=[c[0] for c in CORPUS])
def test_hostile_corpus_rejected(case):
    case_id, build, exc, limits, match = case
    sha = "0" * 64 if case_id == "sha256-mismatch" else None
    with pytest.raises(exc) as info:
        parse(build(), limits, sha256=sha)
    assert type(info.value) is exc  # exactly the class, not a sibling
    assert match in str(info.value)  # rejected for the reason meant, with a message a user can act on


@pytest.mark.parametrize("name", ["a", "0", "my-adapter.v2_final", "a" * 64, "9lives", "a..b"])
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name", [
    "", ".", "..", "../etc", "a/../b", "/etc/passwd", "a/b", "a\\b", "Abc", "ABC", "\u0430dapter",  # Cyrillic а
    "a" * 65, "a b", "a\n", "a\x00", "-a", "_a", ".hidden", "caf\u00e9", "\uff41", "a\u200b", None, 5, b"abc"])
def test_invalid_names(name):
    with pytest.raises(InvalidArgument, match="a-z 0-9"):
        validate_name(name)


def test_parse_ref():
    assert parse_ref("summarizer") == ("summarizer", None)
    assert parse_ref("summarizer@12") == ("summarizer", 12)


@pytest.mark.parametrize("ref", ["x@0", "x@-1", "x@03", "x@", "x@1@2", "x@\uff13", "x@\u0661", "@3", "x@1e3",
                                 "x@ 1", "X@1", "../x@1", "x@1234567890", 7])
def test_invalid_refs(ref):
    with pytest.raises(InvalidArgument):
        parse_ref(ref)


def test_sha256_checked_when_given():
    archive = peft_archive("prompt")
    import hashlib

    good = hashlib.sha256(archive).hexdigest()
    assert parse(archive, sha256=good).kind is AdapterKind.PROMPT_TUNING
    with pytest.raises(DataLoss, match="sha256 mismatch"):
        parse(archive, sha256="f" * 64)
    assert parse(archive, sha256=good.upper()).kind is AdapterKind.PROMPT_TUNING   # hex is case-insensitive
    for bad in ("xyz", good[:-1], good + "0", "g" * 64):
        with pytest.raises(InvalidArgument, match="64 hex digits"):
            parse(archive, sha256=bad)


def test_expected_kind_must_match():
    with pytest.raises(InvalidArgument, match="declares kind IA3"):
        parse(peft_archive("lora"), expected_kind=AdapterKind.IA3)


def test_zip_stored_members_accepted():
    from tests.unit.adapter_fixtures import zip_bytes
    import zipfile

    cfg, weights = split_archive(peft_archive("ia3"))
    archive = zip_bytes({formats.CONFIG_FILE: cfg, formats.WEIGHTS_FILE: weights}, zipfile.ZIP_STORED)
    assert parse(archive).kind is AdapterKind.IA3


# ---------------------------------------------------------------- config schema

@pytest.mark.parametrize("changes, exc", [
    (dict(peft_type=None), InvalidArgument),
    (dict(peft_type=5), InvalidArgument),
    (dict(peft_type="lora"), InvalidArgument),
    (dict(r="4"), InvalidArgument),
    (dict(r=True), InvalidArgument),
    (dict(r=0), InvalidArgument),
    (dict(r=-4), InvalidArgument),
    (dict(r=65), ResourceExhausted),
    (dict(lora_alpha="x"), InvalidArgument),
    (dict(use_rslora="yes"), InvalidArgument),
    (dict(use_dora=True), InvalidArgument),
    (dict(bias="all"), InvalidArgument),
    (dict(fan_in_fan_out=True), InvalidArgument),
    (dict(layer_replication=[[0, 1]]), InvalidArgument),
    (dict(target_modules=5), InvalidArgument),
    (dict(target_modules=["q_proj"]), InvalidArgument),  # tensors for modules the config does not list
    (dict(task_type="SEQ_2_SEQ_LM"), InvalidArgument),
    (dict(modules_to_save="score"), InvalidArgument),
    (dict(rank_pattern=[1]), InvalidArgument),
    (dict(rank_pattern={"q_proj": 100}), ResourceExhausted),
    (dict(rank_pattern={"q_proj": 2}), InvalidArgument),  # tensors still rank 4
    (dict(alpha_pattern={"q_proj": "big"}), InvalidArgument),
    (dict(rank_pattern={"(a+)+$": 4}), InvalidArgument),  # catastrophic backtracking
    (dict(rank_pattern={"(.*)*x": 4}), InvalidArgument),
    (dict(alpha_pattern={".*.*q": 4}), InvalidArgument),
    (dict(alpha_pattern={"(.*.*)?q": 4}), InvalidArgument),
    (dict(alpha_pattern={"q_proj(": 4}), InvalidArgument),
    (dict(alpha_pattern={"a{1000}": 4}), InvalidArgument),
    (dict(alpha_pattern={f"k{i}": 1 for i in range(65)}), InvalidArgument),
    (dict(lorafleet={"labels": "abc"}), InvalidArgument),
    (dict(lorafleet=[1]), InvalidArgument),
])
def test_lora_config_schema(changes, exc):
    start = time.perf_counter()
    with pytest.raises(exc) as info:
        parse(with_config(peft_archive("lora"), **changes))
    assert type(info.value) is exc
    assert time.perf_counter() - start < 2


def test_lora_config_accepts_patterns_peft_writes():
    w = parse(with_config(peft_archive("lora"), alpha_pattern={r"layers\.[01]\.self_attn\.q_proj": 2.0}))
    assert w.lora[(1, "q_proj")].scale == 0.5 and w.lora[(0, "k_proj")].scale == 2.0


def test_json_edge_cases():
    weights = split_archive(peft_archive("lora"))[1]
    for raw in (b'{"peft_type": "LORA", "r": 4, "r": 8}', b'{"peft_type": "LORA", "r": 4, "lora_alpha": NaN}',
                b"null", b'"LORA"', b"{", b'{"peft_type": "LORA", "r": 1' + b"0" * 5000 + b"}"):
        with pytest.raises(InvalidArgument):
            parse(make_archive(raw, weights))


@pytest.mark.parametrize("variant, changes, exc", [
    ("prefix", dict(num_layers=3), FailedPrecondition),
    ("prefix", dict(token_dim=64, num_attention_heads=4), FailedPrecondition),  # pre-GQA layout
    ("prefix", dict(num_transformer_submodules=2), FailedPrecondition),
    ("prefix", dict(num_virtual_tokens=4), InvalidArgument),  # tensor has 5 rows
    ("prefix", dict(num_virtual_tokens=129), ResourceExhausted),
    ("prefix", dict(num_virtual_tokens=0), InvalidArgument),
    ("prompt", dict(token_dim=32), FailedPrecondition),
    ("prompt", dict(num_virtual_tokens=None), InvalidArgument),
    ("ia3", dict(feedforward_modules=["k_proj"]), InvalidArgument),
    ("ia3", dict(fan_in_fan_out=True), InvalidArgument),
])
def test_prompt_learning_and_ia3_config(variant, changes, exc):
    with pytest.raises(exc) as info:
        parse(with_config(peft_archive(variant), **changes))
    assert type(info.value) is exc


@pytest.mark.parametrize("changes, exc", [
    (dict(base_model_hidden_size=128), FailedPrecondition),
    (dict(base_model_num_layers=4), FailedPrecondition),
    (dict(activation="tanh"), InvalidArgument),
    (dict(placement=["attn"]), InvalidArgument),  # tensors include mlp adapters
    (dict(placement=["attn", "attn"]), InvalidArgument),
    (dict(placement=[]), InvalidArgument),
    (dict(bottleneck_size=4), InvalidArgument),  # tensors are size 8
    (dict(bottleneck_size=65), ResourceExhausted),
    (dict(format_version=2), InvalidArgument),
])
def test_bottleneck_config(changes, exc):
    with pytest.raises(exc) as info:
        parse(with_config(bottleneck_archive(), **changes))
    assert type(info.value) is exc


# ---------------------------------------------------------------- tensors

def _drop(name):
    return lambda ts: {k: v for k, v in ts.items() if k != name}


@pytest.mark.parametrize("edit, exc", [
    (_drop(Q_B), InvalidArgument),
    (lambda ts: {**ts, Q_B: torch.randn(64, 3)}, InvalidArgument),  # rank differs from lora_A
    (lambda ts: {**ts, Q_A: torch.randn(4, 64, 1)}, FailedPrecondition),
    (lambda ts: {k.replace("layers.0.", "layers.00."): v for k, v in ts.items()}, InvalidArgument),
    (lambda ts: {k.replace("self_attn.q_proj", "mlp.q_proj"): v for k, v in ts.items()}, InvalidArgument),
    (lambda ts: {k + ".default" if k == Q_A else k: v for k, v in ts.items()}, InvalidArgument),
    (lambda ts: {**ts, Q_A: torch.full((4, 64), 1e300, dtype=torch.float64)}, InvalidArgument),  # inf as f32
    (lambda ts: {**ts, Q_A: torch.ones(4, 64, dtype=torch.int64)}, InvalidArgument),
    (lambda ts: {**ts, Q_A: torch.ones(4, 64, dtype=torch.bool)}, InvalidArgument),
    (lambda ts: {**ts, "base_model.model.score.weight": torch.randn(3, 32)}, FailedPrecondition),
    (lambda ts: {**ts, "base_model.model.score.bias": torch.randn(3)}, InvalidArgument),
    (lambda ts: {"base_model.model.score.weight": torch.randn(3, 64)}, InvalidArgument),  # head only
    (lambda ts: {}, InvalidArgument),
])
def test_lora_tensor_rules(edit, exc):
    with pytest.raises(exc) as info:
        parse(with_tensors(peft_archive("lora"), edit))
    assert type(info.value) is exc


def test_head_label_count_and_limit():
    with pytest.raises(InvalidArgument, match="names 2 labels"):
        parse(with_config(peft_archive("lora_cls"), lorafleet={"labels": ["a", "b"]}))
    with pytest.raises(ResourceExhausted, match="3 labels"):
        parse(peft_archive("lora_cls"), AdapterLimits(max_labels=2))


def test_ia3_shape_must_fit_base():
    key = "base_model.model.model.layers.0.self_attn.k_proj.ia3_l"
    with pytest.raises(FailedPrecondition, match=r"\[32, 1\]"):
        parse(with_tensors(peft_archive("ia3"), lambda ts: {**ts, key: torch.ones(64, 1)}))


def test_prefix_width_must_fit_base():
    with pytest.raises(FailedPrecondition):
        parse(with_tensors(peft_archive("prefix"), lambda ts: {"prompt_embeddings": torch.randn(5, 100)}))


def test_bottleneck_tensor_rules():
    with pytest.raises(InvalidArgument, match="needs down.weight and up.weight"):
        parse(with_tensors(bottleneck_archive(), _drop("layers.0.attn_adapter.up.weight")))
    with pytest.raises(FailedPrecondition):
        parse(with_tensors(bottleneck_archive(), lambda ts: {**ts, "layers.0.mlp_adapter.up.bias": torch.ones(63)}))
    with pytest.raises(InvalidArgument, match="unexpected tensor"):
        parse(with_tensors(bottleneck_archive(), lambda ts: {**ts, "layers.0.ffn_adapter.up.bias": torch.ones(64)}))


def test_total_bytes_limit():
    with pytest.raises(ResourceExhausted, match="as float32"):
        parse(peft_archive("lora"), AdapterLimits(max_total_bytes=1000))


def test_header_rules():
    ok = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    bad_headers = [
        {"a": {**ok, "extra": 1}}, {"a": {**ok, "shape": [True, 2]}}, {"a": {**ok, "shape": "2"}},
        {"a": {**ok, "data_offsets": [-8, 0]}}, {"a": {**ok, "data_offsets": [8, 0]}},
        {"a": {**ok, "data_offsets": [4, 12]}}, {"a": [1]}, {"__metadata__": {"k": 1}, "a": ok},
        {"a": {**ok, "dtype": "I32"}}, {"a": {**ok, "shape": [1, 1, 1, 1, 2]}},
    ]
    for header in bad_headers:
        with pytest.raises(InvalidArgument):
            safe_io.read_safetensors_header(raw_safetensors(header, bytes(8)), LIMITS.max_tensors)
    assert safe_io.read_safetensors_header(raw_safetensors({"__metadata__": {"k": "v"}, "a": ok}, bytes(8)),
                                            LIMITS.max_tensors)["a"].shape == (2,)
    padded = raw_safetensors({"a": ok}, bytes(8)).replace(b"}}", b"}}" + b" " * 6000, 1)
    padded = (len(padded) - 16).to_bytes(8, "little") + padded[8:]
    with pytest.raises(ResourceExhausted, match="header is"):
        safe_io.read_safetensors_header(padded, AdapterLimits(max_tensors=2).max_tensors)
    with pytest.raises(InvalidArgument, match="too short"):
        safe_io.read_safetensors_header(b"\x01\x00", LIMITS.max_tensors)


# ---------------------------------------------------------------- fuzz

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_archives_fail_only_with_domain_errors(data):
    """Flip bytes anywhere in a valid upload: parse succeeds or raises a LoraFleetError, nothing else."""
    archive = bytearray(peft_archive("lora_pattern"))
    for _ in range(data.draw(st.integers(1, 4))):
        archive[data.draw(st.integers(0, len(archive) - 1))] = data.draw(st.integers(0, 255))
    try:
        parse(bytes(archive))
    except LoraFleetError:
        pass


_json = st.recursive(st.none() | st.booleans() | st.integers(-2, 2**64) | st.floats() | st.text(max_size=8),
                     lambda inner: (st.lists(inner, max_size=3)
                                    | st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                     max_leaves=10)


@settings(max_examples=80, deadline=None)
@given(st.dictionaries(st.sampled_from(["a", "b", "__metadata__"]),
                       st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "F16", "I8", "x"]),
                                              "shape": st.lists(st.integers(-1, 4), max_size=3),
                                              "data_offsets": st.lists(st.integers(-1, 40), max_size=3)}) | _json,
                       max_size=3),
       st.binary(max_size=40))
def test_random_safetensors_headers_fail_only_with_domain_errors(header, payload):
    try:
        safe_io.read_safetensors_header(raw_safetensors(header, payload), LIMITS.max_tensors)
    except LoraFleetError:
        pass
    cfg = json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}).encode()
    try:
        validate.parse_files(cfg, raw_safetensors(header, payload), BASE, LIMITS)
    except LoraFleetError:
        pass


# ---------------------------------------------------------------- DoRA, AdaLoRA, VeRA, LoRA bias (issue 14)

from tests.unit.adapter_fixtures import variant_archive, variant_hostile_corpus  # noqa: E402

VARIANT_CORPUS = variant_hostile_corpus()


@pytest.mark.parametrize("case", VARIANT_CORPUS, ids=[c[0] for c in VARIANT_CORPUS])
def test_variant_hostile_upload_rejected_store_unchanged(tmp_path, case):
    """Each hostile DoRA / AdaLoRA / VeRA / LoRA-bias upload: exactly its error class, for the reason
    meant, and the store (holding a good version of the same name) is byte-for-byte unchanged."""
    from server.adapters.store import AdapterStore
    from tests.unit.adapter_fixtures import tree
    case_id, build, exc, limits, match = case
    AdapterStore(tmp_path, BASE, LIMITS).put("acme", "good", variant_archive("dora"))
    store = AdapterStore(tmp_path, BASE, limits)
    before = tree(tmp_path)
    with pytest.raises(exc) as info:
        store.put("acme", "good", build())
    assert type(info.value) is exc
    assert match in str(info.value), str(info.value)
    assert tree(tmp_path) == before and store.versions("acme", "good") == [1]


@pytest.mark.parametrize("variant, kind", [("dora", AdapterKind.DORA), ("adalora", AdapterKind.ADALORA),
                                           ("vera", AdapterKind.VERA), ("lora_bias", AdapterKind.LORA)])
def test_variants_accepted_with_their_kind(variant, kind):
    assert parse(variant_archive(variant)).kind is kind
    assert parse(variant_archive(variant), expected_kind=kind).kind is kind
    with pytest.raises(InvalidArgument, match="declares kind"):
        parse(variant_archive(variant), expected_kind=AdapterKind.IA3)


def test_dora_is_not_a_peft_type():
    with pytest.raises(InvalidArgument, match="use_dora: true"):
        parse(with_config(variant_archive("dora"), peft_type="DORA"))


def test_adalora_module_pruned_to_rank_zero_is_no_delta():
    w = parse(variant_archive("adalora"))
    assert (1, "v_proj") not in w.lora and (0, "v_proj") in w.lora


@pytest.mark.parametrize("regex, ok", [(".*", False), (r"model\.embed_tokens|.*q_proj", False), ("lm_head", False),
                                       (r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)", True),
                                       ("(a+)+$", False), ("nothing_here", False)])
def test_target_modules_regex_names_only_linear_modules(regex, ok):
    """Issue 16: target_modules '.*' (every module, embeddings included) was accepted."""
    archive = with_config(peft_archive("lora"), target_modules=regex)
    if ok:
        assert parse(archive).kind is AdapterKind.LORA
    else:
        with pytest.raises(InvalidArgument, match="target_modules regex|pattern key"):
            parse(archive)
