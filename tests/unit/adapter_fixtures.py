"""Shared helpers for the adapter tests: a tiny random-init Llama and adapters made by the real `peft`.

Every adapter has non-zero, non-identity weights (lora_B and ia3_l are re-drawn after
get_peft_model), so a parse that drops or misplaces a tensor changes the numbers. Built once per
test process (lru_cache) under one temp directory; nothing is downloaded.
"""
from __future__ import annotations

import functools
import io
import json
import struct
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch

from lorafleet.archive import archive_dir, make_archive
from server.adapters import formats
from server.adapters.weights import BottleneckTarget, ClassificationHead
from server.model.shape import MODULE_PARENT, BaseModelShape
from server.adapters.validate import AdapterLimits

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300)
BASE = BaseModelShape(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=16, vocab_size=300)
LIMITS = AdapterLimits()
_ROOT = Path(tempfile.mkdtemp(prefix="lorafleet-adapters-"))


def _base_model(seq_cls: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(0)
    if seq_cls:
        return LlamaForSequenceClassification(LlamaConfig(**TINY, num_labels=3, pad_token_id=0)).eval()
    return LlamaForCausalLM(LlamaConfig(**TINY)).eval()


def _perturb(model, seed: int) -> None:
    """Make adapter weights non-trivial: PEFT inits lora_B to 0 and ia3_l to 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "ia3_l" in name:
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.3)
            elif "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _save(model, name: str) -> Path:
    out = _ROOT / name
    model.save_pretrained(str(out))
    return out


@functools.lru_cache(maxsize=None)
def peft_adapter(variant: str):
    """(directory, PeftModel) for one variant: lora, lora_rslora, lora_pattern, lora_cls, lora_r80, ia3,
    prefix, prefix_proj, prompt. The model is the one that was saved (eval mode)."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model

    configs = {
        "lora": LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM",
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                           "gate_proj", "up_proj", "down_proj"]),
        "lora_rslora": LoraConfig(r=8, lora_alpha=16, use_rslora=True, task_type="CAUSAL_LM",
                                  target_modules=["q_proj", "v_proj"]),
        "lora_pattern": LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", target_modules=["q_proj", "down_proj"],
                                   rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"down_proj": 3}),
        "lora_cls": LoraConfig(r=4, lora_alpha=16, task_type="SEQ_CLS", target_modules=["q_proj", "v_proj"]),
        "lora_r80": LoraConfig(r=80, lora_alpha=80, task_type="CAUSAL_LM", target_modules=["q_proj"]),
        "ia3": IA3Config(task_type="CAUSAL_LM"),
        "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
        "prefix_proj": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True,
                                          encoder_hidden_size=32),
        "prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6),
    }
    torch.manual_seed(1)
    model = get_peft_model(_base_model(seq_cls=variant == "lora_cls"), configs[variant])
    _perturb(model, seed=len(variant))
    model.eval()
    return _save(model, variant), model


def peft_archive(variant: str) -> bytes:
    return archive_dir(peft_adapter(variant)[0])


def bottleneck_targets(seed: int = 0, size: int = 8, activation: str = "gelu",
                       places: tuple[str, ...] = ("attn", "mlp")) -> dict[tuple[int, str], BottleneckTarget]:
    g = torch.Generator().manual_seed(seed)
    h = BASE.hidden_size
    return {(layer, place): BottleneckTarget(torch.randn(size, h, generator=g), torch.randn(size, generator=g),
                                             torch.randn(h, size, generator=g),
                                             torch.randn(h, generator=g) if layer == 0 else None, activation)
            for layer in range(BASE.num_layers) for place in places}


def bottleneck_head(seed: int = 0) -> ClassificationHead:
    g = torch.Generator().manual_seed(seed + 100)
    return ClassificationHead(torch.randn(2, BASE.hidden_size, generator=g), torch.randn(2, generator=g),
                              ("neg", "pos"))


def bottleneck_archive_scaled(value: float) -> bytes:
    """A bottleneck adapter whose down and up weights are all `value` (gain r * d * value^2)."""
    targets = {k: BottleneckTarget(torch.full_like(t.down, value), t.down_bias, torch.full_like(t.up, value),
                                   t.up_bias, t.activation) for k, t in bottleneck_targets().items()}
    return make_archive(*formats.bottleneck_files(targets, BASE))


def bottleneck_archive(seed: int = 0, **kwargs) -> bytes:
    return make_archive(*formats.bottleneck_files(bottleneck_targets(seed, **kwargs), BASE))


def zip_bytes(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def raw_safetensors(header: dict, data: bytes) -> bytes:
    """A safetensors file with exactly this header, however wrong."""
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def split_archive(archive: bytes) -> tuple[bytes, bytes]:
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        return zf.read(formats.CONFIG_FILE), zf.read(formats.WEIGHTS_FILE)


def with_config(archive: bytes, **changes) -> bytes:
    """The same adapter with fields of adapter_config.json replaced (None deletes)."""
    cfg_bytes, weights = split_archive(archive)
    cfg = json.loads(cfg_bytes)
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    return make_archive(json.dumps(cfg).encode(), weights)


def with_tensors(archive: bytes, edit) -> bytes:
    """The same adapter with its tensors dict passed through edit(tensors) -> tensors."""
    from safetensors.torch import load, save

    cfg_bytes, weights = split_archive(archive)
    return make_archive(cfg_bytes, save(edit(dict(load(weights)))))


def tree(root: Path) -> list[str]:
    """Every file under root (relative), to prove a rejected upload changed nothing."""
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*") if p.is_file())


# ---------------------------------------------------------------- hostile uploads

def patch_zip(archive: bytes, member: str, *, size: int | None = None, flag: int | None = None) -> bytes:
    """Rewrite a member's declared uncompressed size and/or flag bits in both zip headers."""
    z = bytearray(archive)
    at = z.find(b"PK\x01\x02")
    while at >= 0:
        name_len = struct.unpack_from("<H", z, at + 28)[0]
        if z[at + 46:at + 46 + name_len] == member.encode():
            local = struct.unpack_from("<I", z, at + 42)[0]
            if size is not None:
                struct.pack_into("<I", z, at + 24, size)
                struct.pack_into("<I", z, local + 22, size)
            if flag is not None:
                struct.pack_into("<H", z, at + 8, flag)
                struct.pack_into("<H", z, local + 6, flag)
        at = z.find(b"PK\x01\x02", at + 4)
    return bytes(z)


def _lora_weights() -> bytes:
    return split_archive(peft_archive("lora"))[1]


def _lora_config() -> bytes:
    return split_archive(peft_archive("lora"))[0]


def _q_a() -> str:
    return "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def _set(name: str, value: torch.Tensor):
    return lambda ts: {**ts, name: value}


def _rename(old: str, new: str):
    return lambda ts: {(new if k == old else k): v for k, v in ts.items()}


def _pickle_bytes(legacy: bool) -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def _many_tensors(n: int) -> bytes:
    header = {f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(n)}
    return raw_safetensors(header, bytes(4 * n))


def _duplicate_member_zip() -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w") as zf:
        warnings.simplefilter("ignore")  # "Duplicate name": exactly what we want here
        zf.writestr(formats.CONFIG_FILE, _lora_config())
        zf.writestr(formats.CONFIG_FILE, b'{"peft_type": "IA3"}')
    return buf.getvalue()


def _weights(data: bytes) -> bytes:
    return make_archive(_lora_config(), data)


def hostile_corpus():
    """(id, build() -> archive bytes, exception class, limits, text the message must contain)."""
    from server.errors import DataLoss, FailedPrecondition, InvalidArgument, ResourceExhausted

    lora, q_a = peft_archive, _q_a()
    q_b = q_a.replace("lora_A", "lora_B")
    small = AdapterLimits(max_archive_bytes=64 * 1024)
    f32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    config, weights = formats.CONFIG_FILE, formats.WEIGHTS_FILE
    cases = []

    def case(case_id, build, exc, match, limits=LIMITS):
        cases.append((case_id, build, exc, limits, match))

    bad, limit, unfit = InvalidArgument, ResourceExhausted, FailedPrecondition
    case("truncated-archive", lambda: lora("lora")[: len(lora("lora")) // 2], bad, "not a readable ZIP")
    case("not-a-zip", lambda: b"\x00" * 100, bad, "not a readable ZIP")
    case("archive-over-limit", lambda: lora("lora"), limit, "the limit is 1000", AdapterLimits(max_archive_bytes=1000))
    case("extra-member", lambda: zip_bytes({config: _lora_config(), weights: _lora_weights(), "run.sh": b"x"}),
         bad, "holds 3 members")
    case("missing-member", lambda: zip_bytes({config: _lora_config()}), bad, "holds 1 members")
    for member in ("../adapter_config.json", "/adapter_config.json", "x/adapter_config.json"):
        case(f"member-{member}", lambda m=member: zip_bytes({m: _lora_config(), weights: _lora_weights()}),
             bad, repr(member))
    case("directory-member", lambda: zip_bytes({"adapter_config.json/": b"", weights: _lora_weights()}),
         bad, "'adapter_config.json/'")
    case("duplicate-member", lambda: _duplicate_member_zip(), bad, "holds 2 members")
    case("encrypted-member", lambda: patch_zip(lora("lora"), config, flag=0x1), bad, "is encrypted")
    case("bzip2-member", lambda: zip_bytes({config: _lora_config(), weights: _lora_weights()}, zipfile.ZIP_BZIP2),
         bad, "compression method 12")
    case("zip-bomb-declared", lambda: zip_bytes({config: _lora_config(), weights: bytes(2 << 20)}),
         limit, "unpacks to 2097152 bytes", small)
    case("zip-bomb-lying-size", lambda: patch_zip(
        zip_bytes({config: b" " * (1 << 20) + b"{}", weights: _lora_weights()}), config, size=100), bad, "Bad CRC")
    case("oversized-json", lambda: make_archive(b'{"pad": "' + b"x" * 70_000 + b'"}', _lora_weights()),
         limit, "the limit is 65536")
    case("json-not-object", lambda: make_archive(b"[1, 2]", _lora_weights()), bad, "must be a JSON object")
    case("json-deep-nesting", lambda: make_archive(b"[" * 60_000, _lora_weights()), bad, "recursion")
    case("json-not-utf8", lambda: make_archive(b'{"peft_type": "\xff"}', _lora_weights()), bad, "utf-8")
    case("unknown-peft-type", lambda: with_config(lora("lora"), peft_type="LOHA"), bad, "unsupported peft_type 'LOHA'")
    case("pickle-renamed", lambda: _weights(_pickle_bytes(legacy=False)), bad, "not a safetensors file")
    case("legacy-pickle-renamed", lambda: _weights(_pickle_bytes(legacy=True)), bad, "not a safetensors file")
    case("truncated-safetensors", lambda: _weights(_lora_weights()[:-10]), bad, "tensors cover")
    case("header-lies-about-size", lambda: _weights(raw_safetensors({"a": {**f32, "shape": [4]}}, bytes(8))),
         bad, "needs 16")
    case("header-offsets-out-of-bounds", lambda: _weights(raw_safetensors({"a": f32}, bytes(4))),
         bad, "tensors cover 8")
    case("header-overlapping-offsets", lambda: _weights(raw_safetensors(
        {"a": f32, "b": {**f32, "data_offsets": [4, 12]}}, bytes(12))), bad, "overlap")
    case("header-length-beyond-file", lambda: _weights(struct.pack("<Q", 10**9) + b"{}"), bad, "claims 1000000000")
    case("wrong-shape", lambda: with_tensors(lora("lora"), _set(q_a, torch.randn(4, 32))), unfit, "needs [r, 64]")
    case("layer-out-of-range", lambda: with_tensors(lora("lora"), _rename(q_a, q_a.replace("layers.0", "layers.7"))),
         unfit, "layer 7; the base model has 2 layers")
    case("unknown-tensor", lambda: with_tensors(lora("lora"), _set("base_model.model.lm_head.weight",
                                                                   torch.randn(300, 64))), bad, "unexpected tensor")
    case("wrong-dtype-int32", lambda: with_tensors(lora("lora"), _set(q_a, torch.ones(4, 64, dtype=torch.int32))),
         bad, "dtype I32")
    case("nan", lambda: with_tensors(lora("lora"), _set(q_b, torch.full((64, 4), float("nan")))), bad, "NaN or Inf")
    case("inf", lambda: with_tensors(lora("lora"), _set(q_a, torch.full((4, 64), float("inf")))), bad, "NaN or Inf")
    # issue 20: finite but huge values overflow the served dtype; each is refused at upload
    case("lora-A-1e19", lambda: with_tensors(lora("lora"), _set(q_a, torch.full((4, 64), 1e19))), bad,
         "accepts adapter values up to")
    case("lora-B-1e19", lambda: with_tensors(lora("lora"), _set(q_b, torch.full((64, 4), 1e19))), bad,
         "accepts adapter values up to")
    case("lora-gain-over-bound", lambda: with_tensors(lora("lora"), lambda ts: {
        **ts, q_a: torch.full((4, 64), 1e3), q_b: torch.full((64, 4), 1e3)}), bad, "has gain")
    case("lora-alpha-1e300", lambda: with_config(lora("lora"), lora_alpha=1e300), bad, "has gain")
    case("lora-alpha-pattern-1e300", lambda: with_config(lora("lora"), alpha_pattern={"q_proj": 1e300}), bad,
         "has gain")
    case("prefix-1e30", lambda: with_tensors(peft_archive("prefix"), lambda ts: {
        k: torch.full_like(v, 1e30) for k, v in ts.items()}), bad, "accepts adapter values up to")
    case("prompt-1e30", lambda: with_tensors(peft_archive("prompt"), lambda ts: {
        k: torch.full_like(v, 1e30) for k, v in ts.items()}), bad, "accepts adapter values up to")
    case("ia3-1e30", lambda: with_tensors(peft_archive("ia3"), lambda ts: {
        k: torch.full_like(v, 1e30) for k, v in ts.items()}), bad, "accepts adapter values up to")
    case("head-1e30", lambda: with_tensors(lora("lora_cls"), lambda ts: {
        k: (torch.full_like(v, 1e30) if "score" in k else v) for k, v in ts.items()}), bad,
         "accepts adapter values up to")
    case("bottleneck-gain-over-bound", lambda: bottleneck_archive_scaled(3e2), bad, "has gain")
    case("rank-above-max", lambda: lora("lora_r80"), limit, "rank r 80 is above the limit of 64")
    case("rank-above-lowered-max", lambda: lora("lora"), limit, "limit of 2", AdapterLimits(max_rank=2))
    case("10000-tiny-tensors", lambda: _weights(_many_tensors(10_000)), limit, "10000 tensors")
    case("prefix-too-long", lambda: peft_archive("prefix"), limit, "num_virtual_tokens 5",
         AdapterLimits(max_virtual_tokens=4))
    case("sha256-mismatch", lambda: lora("lora"), DataLoss, "sha256 mismatch")
    return cases


# ---------------------------------------------------------------- DoRA, AdaLoRA, VeRA, LoRA bias (issue 14)

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# AdaLoRA's finished-run masks (init_r 6): per module a different kept rank; layer 1 v_proj pruned to 0
ADALORA_MASKS = {(0, "q_proj"): [1, 0, 1, 1, 0, 0], (0, "v_proj"): [1, 1, 1, 1, 1, 1],
                 (0, "down_proj"): [0, 0, 0, 0, 0, 1], (1, "q_proj"): [0, 1, 0, 1, 0, 0],
                 (1, "v_proj"): [0, 0, 0, 0, 0, 0], (1, "down_proj"): [1, 1, 0, 1, 0, 1]}


def variant_config(variant: str, task_type: str = "CAUSAL_LM"):
    """PEFT configs of the four kinds served as LoRA: dora, adalora, vera, lora_bias."""
    from peft import AdaLoraConfig, LoraConfig, VeraConfig
    return {
        "dora": lambda: LoraConfig(r=4, lora_alpha=8, use_dora=True, task_type=task_type, target_modules=ALL_LINEAR),
        "dora_partial": lambda: LoraConfig(r=3, lora_alpha=5, use_dora=True, task_type=task_type,
                                           target_modules=["k_proj", "up_proj", "o_proj"]),
        "adalora": lambda: AdaLoraConfig(init_r=6, lora_alpha=12, total_step=10, task_type=task_type,
                                         target_modules=["q_proj", "v_proj", "down_proj"]),
        "vera": lambda: VeraConfig(r=8, task_type=task_type, target_modules=["q_proj", "v_proj", "up_proj",
                                                                             "down_proj"]),
        "lora_bias": lambda: LoraConfig(r=4, lora_alpha=8, lora_bias=True, task_type=task_type,
                                        target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]),
    }[variant]()


def perturb_all(model, seed: int) -> None:
    """Every adapter parameter re-drawn, non-zero: lora_A/B/E, DoRA magnitudes (around their init
    ||W||), VeRA lambdas, heads. PEFT inits lora_B, lora_B.bias, AdaLoRA's lora_E and VeRA's
    lambda_b to zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=g)
            if "magnitude" in name:
                p.mul_(1 + 0.3 * noise)
            elif "lambda_d" in name:
                p.copy_(noise * 0.5)
            elif "lora_E" in name or "lambda_b" in name:
                p.copy_(noise)
            else:
                p.copy_(noise * 0.2)


def set_adalora_masks(model, masks: dict[tuple[int, str], list[int]]) -> None:
    """As a finished AdaLoRA run leaves its config: rank_pattern {module's lora_E: [bool] * init_r}."""
    model.peft_config["default"].rank_pattern = {
        f"model.layers.{layer}.{MODULE_PARENT[m]}.{m}.lora_E": [bool(b) for b in mask]
        for (layer, m), mask in masks.items()}


def save_variant(model, out: Path, variant: str, fresh_base):
    """save_pretrained, then the oracle: PeftModel.from_pretrained(fresh_base, out) (AdaLoRA's saved
    tensors are pruned by its masks, so the in-memory model is not what was saved)."""
    from peft import PeftModel
    if variant == "adalora":
        set_adalora_masks(model, ADALORA_MASKS)
    model.save_pretrained(str(out))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # AdaLoRA masks "ignored" (LoRA's rank_pattern check; it resizes)
        return PeftModel.from_pretrained(fresh_base, str(out)).eval()


@functools.lru_cache(maxsize=None)
def variant_adapter(variant: str):
    """(directory, oracle PeftModel loaded from that directory) on the TINY base, random non-zero weights."""
    from peft import get_peft_model

    torch.manual_seed(2)
    model = get_peft_model(_base_model(), variant_config(variant))
    perturb_all(model, seed=len(variant) + 10)
    model.eval()
    return _ROOT / variant, save_variant(model, _ROOT / variant, variant, _base_model())


def variant_archive(variant: str) -> bytes:
    return archive_dir(variant_adapter(variant)[0])


def _layer0(module: str, part: str) -> str:
    return f"base_model.model.model.layers.0.{MODULE_PARENT[module]}.{module}.{part}"


def _drop(*names: str):
    return lambda ts: {k: v for k, v in ts.items() if k not in names}


def _masks(**changes) -> dict:
    """ADALORA_MASKS as rank_pattern JSON, with {'layer_module': mask} entries replaced (None drops)."""
    keys = {f"{layer}_{m}": (layer, m) for layer, m in ADALORA_MASKS}
    masks = {keys[k]: v for k, v in {**{f"{l}_{m}": v for (l, m), v in ADALORA_MASKS.items()}, **changes}.items()
             if v is not None}
    return {f"model.layers.{l}.{MODULE_PARENT[m]}.{m}.lora_E": [bool(b) for b in v]
            for (l, m), v in masks.items()}


def variant_hostile_corpus():
    """Hostile DoRA / AdaLoRA / VeRA / LoRA-bias uploads, as hostile_corpus(): (id, build, class, limits,
    text). Each starts from a real file written by peft and breaks one rule."""
    from server.errors import FailedPrecondition, InvalidArgument, ResourceExhausted

    bad, limit, unfit = InvalidArgument, ResourceExhausted, FailedPrecondition
    dora, ada, vera, lbias = (lambda v=v: variant_archive(v) for v in ("dora", "adalora", "vera", "lora_bias"))
    q_mag, k_mag = _layer0("q_proj", "lora_magnitude_vector"), _layer0("k_proj", "lora_magnitude_vector")
    cases = []

    def case(case_id, build, exc, match, limits=LIMITS):
        cases.append((case_id, build, exc, limits, match))

    # DoRA
    case("dora-magnitude-wrong-length", lambda: with_tensors(dora(), _set(q_mag, torch.ones(32))), unfit,
         "needs [64]")
    case("dora-magnitude-2d", lambda: with_tensors(dora(), _set(k_mag, torch.ones(32, 1))), unfit, "needs [32]")
    case("dora-magnitude-missing", lambda: with_tensors(dora(), _drop(q_mag)), bad, "lora_magnitude_vector")
    case("dora-magnitude-inf", lambda: with_tensors(dora(), _set(q_mag, torch.full((64,), float("inf")))), bad,
         "NaN or Inf")
    case("dora-magnitude-1e38", lambda: with_tensors(dora(), _set(q_mag, torch.full((64,), 1e38))), bad,
         "accepts adapter values up to")
    case("dora-magnitude-without-use-dora", lambda: with_config(dora(), use_dora=False), bad, "needs exactly")
    case("dora-with-lora-bias", lambda: with_config(dora(), lora_bias=True), bad, "lora_bias with use_dora")
    case("dora-on-embeddings-config", lambda: with_config(dora(), target_modules=["q_proj", "embed_tokens"]), bad,
         "not on embeddings or conv")
    case("dora-on-embeddings-tensor", lambda: with_tensors(dora(), _set(
        "base_model.model.model.embed_tokens.lora_embedding_A", torch.ones(4, 300))), bad, "DoRA on embeddings")
    case("dora-rank-above-max", lambda: dora(), limit, "limit of 2", AdapterLimits(max_rank=2))
    # LoRA bias
    q_bias = _layer0("q_proj", "lora_B.bias")
    case("lora-bias-wrong-length", lambda: with_tensors(lbias(), _set(q_bias, torch.ones(63))), unfit, "needs [64]")
    case("lora-bias-missing", lambda: with_tensors(lbias(), _drop(q_bias)), bad, "lora_B.bias")
    case("lora-bias-3e38", lambda: with_tensors(lbias(), _set(q_bias, torch.full((64,), 3e38))), bad,
         "accepts adapter values up to")
    case("lora-bias-shift-over-bound", lambda: with_config(with_tensors(lbias(), _set(q_bias, torch.full((64,), 1e4))),
                                                           lora_alpha=400), bad, "lora_B.bias reaches")
    case("lora-bias-not-declared", lambda: with_config(lbias(), lora_bias=False), bad, "needs exactly")
    # AdaLoRA
    case("adalora-mask-count-disagrees", lambda: with_config(ada(), rank_pattern=_masks(**{"0_q_proj": [1] * 6})),
         bad, "has rank 3 but adapter_config.json gives 6")
    case("adalora-mask-wrong-length", lambda: with_config(ada(), rank_pattern=_masks(**{"0_q_proj": [1, 0, 1, 1]})),
         bad, "init_r=6")
    case("adalora-mask-not-bools", lambda: with_config(ada(), rank_pattern=_masks(**{"0_q_proj": [1, 0, 1, 1, 0, 0]})
                                                       | {"model.layers.0.self_attn.q_proj.lora_E": [1] * 6}),
         bad, "true/false")
    case("adalora-mask-for-missing-module", lambda: with_config(ada(), rank_pattern=_masks() | {
        "model.layers.0.self_attn.k_proj.lora_E": [True] * 6}), bad, "has no tensors")
    case("adalora-mask-bad-key", lambda: with_config(ada(), rank_pattern=_masks() | {"q_proj": [True] * 6}),
         bad, "is not a module's lora_E")
    case("adalora-mask-layer-out-of-range", lambda: with_config(ada(), rank_pattern=_masks() | {
        "model.layers.9.self_attn.q_proj.lora_E": [True] * 6}), unfit, "layer 9")
    case("adalora-masks-dropped", lambda: with_config(ada(), rank_pattern=None), bad, "adapter_config.json gives 6")
    case("adalora-e-wrong-shape", lambda: with_tensors(ada(), _set(_layer0("q_proj", "lora_E"), torch.ones(3, 2))),
         bad, "lora_E is [r, 1]")
    case("adalora-e-missing", lambda: with_tensors(ada(), _drop(_layer0("q_proj", "lora_E"))), bad, "lora_E")
    case("adalora-kept-rank-above-max", lambda: ada(), limit, "the limit is 3", AdapterLimits(max_rank=3))
    case("adalora-init-r-absurd", lambda: with_config(ada(), init_r=10**6), limit, "init_r")
    # VeRA
    vA, vB = "base_model.vera_A", "base_model.vera_B"
    case("vera-without-projections", lambda: with_tensors(vera(), _drop(vA, vB)), bad, "save_projection")
    case("vera-save-projection-false", lambda: with_config(vera(), save_projection=False), bad, "save_projection=True")
    case("vera-projection-A-too-narrow", lambda: with_tensors(vera(), _set(vA, torch.ones(8, 64))), unfit,
         "smaller than layer")
    case("vera-projection-B-too-short", lambda: with_tensors(vera(), _set(vB, torch.ones(64, 8))), unfit,
         "smaller than layer")
    case("vera-projection-wider-than-base", lambda: with_tensors(vera(), _set(vA, torch.ones(8, 4096))), unfit,
         "wider than any linear")
    case("vera-projection-rank-disagrees", lambda: with_tensors(vera(), _set(vA, torch.ones(4, 128))), bad, "r=8")
    case("vera-lambda-d-wrong-rank", lambda: with_tensors(vera(), _set(_layer0("q_proj", "vera_lambda_d"),
                                                                     torch.ones(4))), bad, "r is 8")
    case("vera-lambda-b-wrong-length", lambda: with_tensors(vera(), _set(_layer0("q_proj", "vera_lambda_b"),
                                                                       torch.ones(32))), unfit, "needs [64]")
    case("vera-rank-above-max", lambda: vera(), limit, "VeRA rank r 8 is above the limit of 4",
         AdapterLimits(max_rank=4))
    case("vera-lambda-1e38", lambda: with_tensors(vera(), _set(_layer0("q_proj", "vera_lambda_d"),
                                                               torch.full((8,), 1e38))), bad,
         "accepts adapter values up to")
    case("vera-lambda-gain-over-bound", lambda: with_tensors(vera(), _set(_layer0("q_proj", "vera_lambda_b"),
                                                                          torch.full((64,), 2e4))), bad, "has gain")
    case("vera-only-projections", lambda: with_tensors(vera(), lambda ts: {k: v for k, v in ts.items()
                                                                          if "vera_lambda" not in k}),
         bad, "no VeRA module tensors")
    return cases
