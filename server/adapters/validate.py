"""Every check on an untrusted adapter upload, before any of it is kept or used.

Status policy (one rule each, the same everywhere):
  malformed input (bad zip, bad JSON, unknown peft_type / tensor name, wrong dtype, NaN/Inf,
  config that disagrees with its own tensors, unsupported PEFT feature)    -> InvalidArgument
  well-formed but does not fit the base model (shapes, layer index, dims)   -> FailedPrecondition
  over a configured limit (archive/config/tensor bytes, tensor count, rank,
  virtual tokens)                                                           -> ResourceExhausted
  bytes whose sha256 differs from the one declared or stored                -> DataLoss

Order: archive size -> sha256 -> zip directory (members, declared sizes; lorafleet.archive.read_archive) ->
capped reads -> config JSON (size, schema) -> safetensors header (length, entry count, dtypes,
offsets) -> names, shapes, ranks vs base model -> only then `safetensors.torch.load` -> float32 ->
finite and bounded -> per-linear gains bounded. No pickle, never torch.load.

Value bounds (finite is not enough: a LoRA with values 1e19, or lora_alpha 1e300, overflows the
served dtype in the first forward). One bound G (`AdapterLimits.max_value`, from `value_bound`)
caps every tensor value |v| <= G and every adapter linear's gain: the delta a target adds is at
most gain * max|x|, with gain = |scale| * ||B||_inf * ||A||_inf (largest row sum of |entries|) for
the LoRA family after folding, ||U||_inf * ||D||_inf for bottleneck adapters, and |scale * bias|
<= G for LoRA bias. G is derived from the served dtype and the hidden size so that three chained
gains of G (v, o and the residual add of one block), squared and summed over the hidden size in the
next RMSNorm, stay finite: G^8 * hidden < the dtype's largest value (fp32/bf16: G ~ 3e4, far
above any trained adapter). What bounds cannot show (the base amplifying a bounded delta), the
engine's first-load probe does: an adapter whose outputs are not finite is quarantined.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

import torch

from server.adapters import formats, peft_variants
from server.adapters.weights import AdapterKind, AdapterWeights, TensorRole
from lorafleet.archive import CONFIG_FILE, WEIGHTS_FILE, ArchiveError, ArchiveTooLarge, read_archive
from server.adapters.safe_io import TensorHeader, load_json_object, load_tensors, read_safetensors_header
from server.errors import DataLoss, FailedPrecondition, InvalidArgument, ResourceExhausted
from server.kernels.activation import NAMES as ACTIVATIONS
from server.model.shape import LINEAR_MODULES, MODULE_PARENT, BaseModelShape, module_path

MiB = 1 << 20
SHA256_RE = re.compile(r"[0-9a-f]{64}", re.ASCII)
_PATTERN_RE = re.compile(r"[A-Za-z0-9_.|()\[\]^$?*+\\-]{1,128}", re.ASCII)
_MAX_PATTERNS = 64
_MAX_INIT_R = 4096  # AdaLoRA's starting rank: bounds its rank_pattern masks (kept ranks: max_rank)
_ADALORA_MASK_RE = re.compile(r"model\.layers\.(0|[1-9][0-9]{0,5})\.(self_attn|mlp)\.([a-z_]+)\.lora_E", re.ASCII)
_UNSUPPORTED_LORA = ("fan_in_fan_out", "alora_invocation_tokens", "use_qalora",
                     "layer_replication", "target_parameters", "trainable_token_indices", "use_bdlora",
                     "arrow_config", "kasa_config", "velora_config", "monteclora_config", "megatron_config")


VALUE_BOUND_FLOOR = 16.0      # float16's formula gives ~2: bounds that tight would refuse real adapters


def value_bound(max_finite: float, hidden_size: int) -> float:
    """G with G^8 * hidden_size < max_finite (see the module docstring), at least VALUE_BOUND_FLOOR;
    `max_finite` is torch.finfo(served dtype).max."""
    g = (max_finite / hidden_size) ** 0.125
    step = 10.0 ** (math.floor(math.log10(g)) - 1)          # rounded down to two significant digits
    return max(VALUE_BOUND_FLOOR, math.floor(g / step) * step)


@dataclass(frozen=True)
class AdapterLimits:
    max_rank: int = 64  # LoRA r (every module) and bottleneck size
    max_archive_bytes: int = 256 * MiB  # the zip as uploaded, and the safetensors member unpacked
    max_config_bytes: int = 64 * 1024  # adapter_config.json unpacked
    max_tensors: int = 2048
    max_total_bytes: int = 512 * MiB  # all tensors once converted to float32
    max_virtual_tokens: int = 128  # prefix / prompt tuning length
    max_labels: int = 1024  # rows of a classification head
    max_value: float = 23000.0  # G: largest |value| and per-linear gain (value_bound(); this default is
    #                             fp32's for a hidden size of 4096)


def validate_sha256(sha256: object) -> str:
    """64 hex digits, either case; returned lowercase."""
    if not isinstance(sha256, str) or not SHA256_RE.fullmatch(sha256.lower()):
        raise InvalidArgument("sha256 must be 64 hex digits")
    return sha256.lower()


def check_sha256(data: bytes, sha256: str | None) -> str:
    """sha256 of `data`; DataLoss if an expected digest is given and differs."""
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != validate_sha256(sha256):
        raise DataLoss(f"sha256 mismatch: declared {sha256}, received bytes hash to {digest}")
    return digest


# ---------------------------------------------------------------- adapter_config.json schema

_MISSING = object()
_TYPES = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "str_list": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "str_or_list": (lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
                    "a string or a list of strings"),
    "dict": (lambda v: isinstance(v, dict), "an object"),
}


def _field(cfg: dict, key: str, kind: str, default: object = _MISSING) -> object:
    """cfg[key] checked against a type; a missing or null field gives `default` (required if none)."""
    value = cfg.get(key)
    if value is None:
        if default is _MISSING:
            raise InvalidArgument(f"adapter_config.json needs field {key!r}")
        return default
    ok, what = _TYPES[kind]
    if not ok(value):
        raise InvalidArgument(f"adapter_config.json field {key!r} must be {what}, got {type(value).__name__}")
    return value


def _count(cfg: dict, key: str, limit: int, what: str, default: object = _MISSING) -> int:
    value = _field(cfg, key, "int", default)
    if value < 1:
        raise InvalidArgument(f"adapter_config.json field {key!r} must be at least 1, got {value}")
    if value > limit:
        raise ResourceExhausted(f"{what} {value} is above the limit of {limit}")
    return value


def _equal(cfg: dict, key: str, expected: int, what: str) -> None:
    value = _field(cfg, key, "int")
    if value != expected:
        raise FailedPrecondition(f"adapter_config.json {key} is {value} but the base model's {what} is {expected}")


def check_config(cfg: dict, base: BaseModelShape, limits: AdapterLimits,
                 expected_kind: AdapterKind | None = None) -> AdapterKind:
    """Schema-check adapter_config.json for its peft_type and the base model; returns the kind."""
    peft_type = cfg.get("peft_type")
    supported = ", ".join(k.value for k in AdapterKind if k is not AdapterKind.DORA)
    if not isinstance(peft_type, str) or peft_type == "DORA" or peft_type not in AdapterKind.__members__:
        raise InvalidArgument(f"unsupported peft_type {str(peft_type)[:40]!r}; supported: {supported} "
                              "(DoRA is peft_type LORA with use_dora: true)")
    kind = AdapterKind(peft_type)
    if kind is AdapterKind.LORA and _field(cfg, "use_dora", "bool", False):
        kind = AdapterKind.DORA
    if expected_kind is not None and kind is not expected_kind:
        raise InvalidArgument(f"upload declares kind {expected_kind.value} but adapter_config.json says {kind.value}")
    task_type = _field(cfg, "task_type", "str", "CAUSAL_LM")
    if task_type not in ("CAUSAL_LM", "SEQ_CLS"):
        raise InvalidArgument(f"unsupported task_type {task_type[:40]!r}; supported: CAUSAL_LM, SEQ_CLS")
    _field(cfg, "modules_to_save", "str_list", [])
    labels = _field(_field(cfg, formats.LABELS_KEY, "dict", {}), "labels", "str_list", [])
    if len(labels) > limits.max_labels or any(not 0 < len(x) <= 64 for x in labels):
        raise InvalidArgument(f"lorafleet.labels: at most {limits.max_labels} names of 1-64 characters")
    _CONFIG_CHECKS[kind](cfg, base, limits)
    return kind


def _check_lora_family_options(cfg: dict, what: str, unsupported: tuple[str, ...]) -> None:
    """Options LoRA, DoRA, AdaLoRA and VeRA share: target_modules, bias and the unsupported extras."""
    targets = _field(cfg, "target_modules", "str_or_list", [])
    if _field(cfg, "bias", "str", "none") != "none":
        raise InvalidArgument(f"{what} bias={cfg['bias'][:20]!r} is not supported; use bias='none'")
    for key in unsupported:
        if cfg.get(key):
            raise InvalidArgument(f"{what} option {key} is not supported; it must be unset or false")
    if isinstance(targets, str):
        _check_target_regex(targets)
    if cfg.get("use_dora") and isinstance(targets, list):
        for t in targets:
            if t not in LINEAR_MODULES and re.search(r"embed|lm_head|conv", t):
                raise InvalidArgument(f"DoRA on {t[:40]!r} is not supported: DoRA is served on the linear "
                                      f"modules ({', '.join(LINEAR_MODULES)}), not on embeddings or "
                                      "conv layers")


def _check_lora_config(cfg: dict, base: BaseModelShape, limits: AdapterLimits) -> None:
    _count(cfg, "r", limits.max_rank, "LoRA rank r")
    _field(cfg, "lora_alpha", "number", 8)
    _field(cfg, "use_rslora", "bool", False)
    if _field(cfg, "lora_bias", "bool", False) and _field(cfg, "use_dora", "bool", False):
        raise InvalidArgument("lora_bias with use_dora is not supported (PEFT refuses it too)")
    _check_lora_family_options(cfg, "LoRA", _UNSUPPORTED_LORA)
    ranks = _field(cfg, "rank_pattern", "dict", {})
    alphas = _field(cfg, "alpha_pattern", "dict", {})
    if len(ranks) + len(alphas) > _MAX_PATTERNS:
        raise InvalidArgument(f"rank_pattern and alpha_pattern hold {len(ranks) + len(alphas)} keys; "
                              f"the limit is {_MAX_PATTERNS}")
    for key in [*ranks, *alphas]:
        _check_pattern_key(key)
    for key in ranks:
        _count(ranks, key, limits.max_rank, f"LoRA rank_pattern[{key!r}]")
    for key in alphas:
        _field(alphas, key, "number")


# modules of a Llama-family model that must never be adapter targets (PEFT matches with re.fullmatch)
_NOT_TARGETS = ("model.embed_tokens", "lm_head", "model.norm", "model.layers.0.input_layernorm",
                "model.layers.0.post_attention_layernorm", "model.layers.0.self_attn", "model.layers.0.mlp",
                "model.layers.0.self_attn.rotary_emb", "model.layers.0.mlp.act_fn", "model.layers.0", "model")


def _check_target_regex(pattern: str) -> None:
    """target_modules as a regex string: a safe pattern that names only the linear modules."""
    _check_pattern_key(pattern)
    hits = [m for m in _NOT_TARGETS if re.fullmatch(pattern, m)]
    if hits:
        raise InvalidArgument(f"target_modules regex {pattern[:80]!r} also matches {hits[0]!r}; adapters are "
                              f"served on the linear modules only ({', '.join(LINEAR_MODULES)})")
    if not any(re.fullmatch(pattern, module_path(0, m)) for m in LINEAR_MODULES):
        raise InvalidArgument(f"target_modules regex {pattern[:80]!r} matches none of the linear modules "
                              f"({', '.join(LINEAR_MODULES)})")


def _check_pattern_key(key: str) -> None:
    """rank/alpha_pattern keys are regexes: allow a small subset that cannot backtrack badly."""
    if (not _PATTERN_RE.fullmatch(key) or re.search(r"\)[*+]|\\[1-9]", key)
            or len(re.findall(r"[*+]", key)) > 1):
        raise InvalidArgument(f"pattern key {key[:80]!r} is not accepted: up to 128 characters of "
                              "A-Z a-z 0-9 _ . | ( ) [ ] ^ $ ? * + \\ -, at most one * or +, none after ')'")
    try:
        re.compile(key)
    except re.error as e:
        raise InvalidArgument(f"pattern key {key[:80]!r} is not a valid regex ({e})") from None


def _check_ia3_config(cfg: dict, base: BaseModelShape, limits: AdapterLimits) -> None:
    _field(cfg, "target_modules", "str_or_list", [])
    _field(cfg, "feedforward_modules", "str_or_list", [])
    if cfg.get("fan_in_fan_out"):
        raise InvalidArgument("IA3 option fan_in_fan_out is not supported; it must be unset or false")


def _check_prompt_learning(cfg: dict, limits: AdapterLimits) -> None:
    _count(cfg, "num_virtual_tokens", limits.max_virtual_tokens, "num_virtual_tokens")
    if _field(cfg, "num_transformer_submodules", "int", 1) != 1:
        raise FailedPrecondition("num_transformer_submodules must be 1: the base model is decoder-only")


def _check_prefix_config(cfg: dict, base: BaseModelShape, limits: AdapterLimits) -> None:
    _check_prompt_learning(cfg, limits)
    _equal(cfg, "num_layers", base.num_layers, "number of layers")
    _equal(cfg, "num_attention_heads", base.num_kv_heads, "number of key/value heads")
    _equal(cfg, "token_dim", base.num_kv_heads * base.head_dim, "num_kv_heads * head_dim")


def _check_prompt_config(cfg: dict, base: BaseModelShape, limits: AdapterLimits) -> None:
    _check_prompt_learning(cfg, limits)
    _equal(cfg, "token_dim", base.hidden_size, "hidden size")


def _check_bottleneck_config(cfg: dict, base: BaseModelShape, limits: AdapterLimits) -> None:
    if _field(cfg, "format_version", "int", 1) != 1:
        raise InvalidArgument(f"bottleneck format_version {cfg['format_version']} is not supported; expected 1")
    _count(cfg, "bottleneck_size", limits.max_rank, "bottleneck_size")
    if _field(cfg, "activation", "str") not in ACTIVATIONS:
        raise InvalidArgument(f"bottleneck activation {cfg['activation'][:20]!r} is not one of "
                              f"{', '.join(ACTIVATIONS)}")
    places = _field(cfg, "placement", "str_list")
    if not places or len(set(places)) != len(places) or not set(places) <= set(formats.PLACES):
        raise InvalidArgument("bottleneck placement must be a non-empty list of distinct 'attn' / 'mlp'")
    _equal(cfg, "base_model_hidden_size", base.hidden_size, "hidden size")
    if cfg.get("base_model_num_layers") is not None:
        _equal(cfg, "base_model_num_layers", base.num_layers, "number of layers")


def _check_adalora_config(cfg: dict, base: BaseModelShape, limits: AdapterLimits) -> None:
    init_r = _count(cfg, "init_r", _MAX_INIT_R, "AdaLoRA init_r")
    _field(cfg, "lora_alpha", "number", 8)
    _check_lora_family_options(cfg, "AdaLoRA", ("use_dora", "lora_bias", *_UNSUPPORTED_LORA))
    masks = _field(cfg, "rank_pattern", "dict", {})
    if len(masks) > base.num_layers * len(LINEAR_MODULES):
        raise InvalidArgument(f"AdaLoRA rank_pattern has {len(masks)} entries; the base model has "
                              f"{base.num_layers * len(LINEAR_MODULES)} linear modules")
    for key, mask in masks.items():
        m = _ADALORA_MASK_RE.fullmatch(key)
        if not m or MODULE_PARENT.get(m.group(3)) != m.group(2):
            raise InvalidArgument(f"AdaLoRA rank_pattern key {key[:100]!r} is not a module's lora_E, e.g. "
                                  f"{peft_variants.adalora_mask_key(0, 'q_proj')!r}")
        if int(m.group(1)) >= base.num_layers:
            raise FailedPrecondition(f"AdaLoRA rank_pattern key {key[:100]!r} is for layer {m.group(1)}; "
                                     f"the base model has {base.num_layers} layers")
        if not isinstance(mask, list) or len(mask) != init_r or not all(isinstance(b, bool) for b in mask):
            raise InvalidArgument(f"AdaLoRA rank_pattern[{key[:100]!r}] must be a list of init_r={init_r} "
                                  "true/false values")


def _check_vera_config(cfg: dict, base: BaseModelShape, limits: AdapterLimits) -> None:
    _count(cfg, "r", limits.max_rank, "VeRA rank r")
    if not _field(cfg, "save_projection", "bool", True):
        raise InvalidArgument("VeRA adapters must be saved with save_projection=True: the server serves "
                              "the saved vera_A / vera_B, it does not regenerate them from projection_prng_key")
    _check_lora_family_options(cfg, "VeRA", ("fan_in_fan_out", "layer_replication"))


_CONFIG_CHECKS = {AdapterKind.LORA: _check_lora_config, AdapterKind.DORA: _check_lora_config,
                  AdapterKind.IA3: _check_ia3_config,
                  AdapterKind.PREFIX_TUNING: _check_prefix_config, AdapterKind.PROMPT_TUNING: _check_prompt_config,
                  AdapterKind.BOTTLENECK: _check_bottleneck_config, AdapterKind.ADALORA: _check_adalora_config,
                  AdapterKind.VERA: _check_vera_config}


# ---------------------------------------------------------------- tensor names and shapes

_EXAMPLE = {AdapterKind.LORA: "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            AdapterKind.DORA: "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
            AdapterKind.ADALORA: "base_model.model.model.layers.0.self_attn.q_proj.lora_E",
            AdapterKind.VERA: "base_model.model.model.layers.0.self_attn.q_proj.vera_lambda_d",
            AdapterKind.IA3: "base_model.model.model.layers.0.self_attn.k_proj.ia3_l",
            AdapterKind.BOTTLENECK: "layers.0.attn_adapter.down.weight",
            AdapterKind.PREFIX_TUNING: formats.PROMPT_KEY, AdapterKind.PROMPT_TUNING: formats.PROMPT_KEY}
Groups = dict[tuple[int, str], dict[str, tuple[str, tuple[int, ...]]]]  # (layer, module) -> part -> (name, shape)


def _want(name: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if shape != expected:
        raise FailedPrecondition(f"tensor {name} has shape {list(shape)}; the base model needs {list(expected)}")


def check_tensors(kind: AdapterKind, cfg: dict, header: dict[str, TensorHeader], base: BaseModelShape,
                  limits: AdapterLimits) -> None:
    """Every name known for `kind`, every shape fits the base model and the config; before any load."""
    f32_bytes = sum(math.prod(h.shape) * 4 for h in header.values())
    if f32_bytes > limits.max_total_bytes:
        raise ResourceExhausted(f"adapter tensors take {f32_bytes} bytes as float32; the limit is "
                                f"{limits.max_total_bytes}")
    groups: Groups = {}
    for name, h in header.items():
        role = formats.parse_tensor_name(kind, name)
        if role is None and kind is AdapterKind.DORA and re.search(r"embed|lm_head|conv", name):
            raise InvalidArgument(f"tensor {name[:100]!r}: DoRA on embeddings or conv layers is not "
                                  "supported; it is served on the linear modules only")
        if role is None:
            raise InvalidArgument(f"unexpected tensor {name[:100]!r} for a {kind.value} adapter; "
                                  f"names look like {_EXAMPLE[kind]}")
        if role.layer >= base.num_layers:
            raise FailedPrecondition(f"tensor {name} is for layer {role.layer}; the base model has "
                                     f"{base.num_layers} layers")
        groups.setdefault(_group_key(role), {})[role.part] = (name, h.shape)
    head = groups.pop((-1, "head"), None)
    if head:
        _check_head(cfg, head, base, limits)
    if not groups:
        raise InvalidArgument(f"{WEIGHTS_FILE} holds no {kind.value} tensors")
    _TENSOR_CHECKS[kind](cfg, groups, base, limits)


def _group_key(role: TensorRole) -> tuple[int, str]:
    return (-1, role.role) if role.layer < 0 else (role.layer, role.module)


def _check_head(cfg: dict, parts: dict, base: BaseModelShape, limits: AdapterLimits) -> None:
    if "weight" not in parts:
        raise InvalidArgument("classification head has score.bias but no score.weight")
    name, shape = parts["weight"]
    if len(shape) != 2 or shape[1] != base.hidden_size or shape[0] < 1:
        raise FailedPrecondition(f"tensor {name} has shape {list(shape)}; the base model needs "
                                 f"[num_labels, {base.hidden_size}]")
    if shape[0] > limits.max_labels:
        raise ResourceExhausted(f"classification head has {shape[0]} labels; the limit is {limits.max_labels}")
    if "bias" in parts:
        _want(*parts["bias"], (shape[0],))
    labels = (cfg.get(formats.LABELS_KEY) or {}).get("labels")
    if labels and len(labels) != shape[0]:
        raise InvalidArgument(f"lorafleet.labels names {len(labels)} labels but the head has {shape[0]} rows")


def _matches_module_list(targets: object, path: str, dotted: bool) -> bool:
    """PEFT's list matching (target_modules: exact or '.'-suffix; feedforward_modules: plain suffix)."""
    if not isinstance(targets, list):
        return True  # a regex string: the tensor names are the truth
    return any(path == t or path.endswith(("." if dotted else "") + t) for t in targets)


def _check_factors(cfg: dict, layer: int, module: str, parts: dict, base: BaseModelShape,
                   limits: AdapterLimits, expected_r: int) -> None:
    """lora_A [r, d_in] and lora_B [d_out, r] of one module, r as the config says and within limits."""
    (a_name, a), (b_name, b) = parts["A"], parts["B"]
    d_in, d_out = base.linear_dims(module)
    if len(a) != 2 or a[1] != d_in:
        raise FailedPrecondition(f"tensor {a_name} has shape {list(a)}; the base model needs [r, {d_in}]")
    r = a[0]
    if r > limits.max_rank:
        raise ResourceExhausted(f"tensor {a_name} has rank {r}; the limit is {limits.max_rank}")
    if len(b) != 2 or b[1] != r:
        raise InvalidArgument(f"tensor {b_name} has shape {list(b)}: its rank does not match lora_A's {r}")
    _want(b_name, b, (d_out, r))
    if r != expected_r:
        raise InvalidArgument(f"tensor {a_name} has rank {r} but adapter_config.json gives {expected_r}")
    if not _matches_module_list(cfg.get("target_modules"), module_path(layer, module), True):
        raise InvalidArgument(f"tensor {a_name} is for {module}, which target_modules does not list")


def _check_lora_tensors(cfg: dict, groups: Groups, base: BaseModelShape, limits: AdapterLimits) -> None:
    """LoRA, with lora_B.bias when lora_bias is set and lora_magnitude_vector when use_dora is."""
    extra = {"B.bias"} if cfg.get("lora_bias") else {"magnitude"} if cfg.get("use_dora") else set()
    for (layer, module), parts in groups.items():
        if set(parts) != {"A", "B"} | extra:
            need = ", ".join(["lora_A", "lora_B"] + [{"B.bias": "lora_B.bias (lora_bias is true)",
                                                      "magnitude": "lora_magnitude_vector (use_dora is true)"}[p]
                                                     for p in sorted(extra)])
            raise InvalidArgument(f"layer {layer} {module}: needs exactly {need}; found {', '.join(sorted(parts))}")
        _check_factors(cfg, layer, module, parts, base, limits, formats.lora_rank_alpha(cfg, layer, module)[0])
        d_out = base.linear_dims(module)[1]
        for part in extra:
            _want(*parts[part], (d_out,))


def _check_adalora_tensors(cfg: dict, groups: Groups, base: BaseModelShape, limits: AdapterLimits) -> None:
    """lora_A [r, d_in], lora_E [r, 1], lora_B [d_out, r]; r = the rank_pattern mask's count, or init_r.
    Every rank_pattern key must name a module that has tensors (PEFT resizes each one it names)."""
    for (layer, module), parts in groups.items():
        if set(parts) != {"A", "B", "E"}:
            raise InvalidArgument(f"layer {layer} {module}: lora_A, lora_E and lora_B must all be present")
        r = peft_variants.adalora_rank(cfg, layer, module)
        _check_factors(cfg, layer, module, parts, base, limits, r)
        e_name, e = parts["E"]
        if e != (r, 1):
            raise InvalidArgument(f"tensor {e_name} has shape {list(e)}; AdaLoRA's lora_E is [r, 1] = [{r}, 1]")
    have = {peft_variants.adalora_mask_key(layer, module) for layer, module in groups}
    for key in cfg.get("rank_pattern") or {}:
        if key not in have:
            raise InvalidArgument(f"AdaLoRA rank_pattern names {key[:100]!r}, which has no tensors")


def _check_vera_tensors(cfg: dict, groups: Groups, base: BaseModelShape, limits: AdapterLimits) -> None:
    """Shared vera_A [r, W_in], vera_B [W_out, r] wide enough for every module; per module
    vera_lambda_d [r] and vera_lambda_b [d_out]."""
    shared = groups.pop((-1, "vera"), {})
    if set(shared) != {"A", "B"}:
        raise InvalidArgument("a VeRA adapter must include base_model.vera_A and base_model.vera_B "
                              "(save it with save_projection=True)")
    if not groups:
        raise InvalidArgument(f"{WEIGHTS_FILE} holds no VeRA module tensors")
    r = cfg["r"]
    (a_name, a), (b_name, b) = shared["A"], shared["B"]
    if len(a) != 2 or len(b) != 2 or a[0] != r or b[1] != r:
        raise InvalidArgument(f"tensors {a_name} {list(a)} and {b_name} {list(b)} must be [r, d_in] and "
                              f"[d_out, r] with r={r}")
    widest = [max(base.linear_dims(m)[i] for m in LINEAR_MODULES) for i in (0, 1)]
    if a[1] > widest[0] or b[0] > widest[1]:
        raise FailedPrecondition(f"VeRA projections {list(a)} / {list(b)} are wider than any linear of the base "
                                 f"model (d_in <= {widest[0]}, d_out <= {widest[1]})")
    for (layer, module), parts in groups.items():
        if set(parts) != {"lambda_b", "lambda_d"}:
            raise InvalidArgument(f"layer {layer} {module}: vera_lambda_b and vera_lambda_d must both be present")
        d_in, d_out = base.linear_dims(module)
        if a[1] < d_in or b[0] < d_out:
            raise FailedPrecondition(f"VeRA projections {list(a)} / {list(b)} are smaller than layer {layer} "
                                     f"{module}'s shape (d_in {d_in}, d_out {d_out})")
        if parts["lambda_d"][1] != (r,):
            raise InvalidArgument(f"tensor {parts['lambda_d'][0]} has shape {list(parts['lambda_d'][1])}; r is {r}")
        _want(*parts["lambda_b"], (d_out,))
        if not _matches_module_list(cfg.get("target_modules"), module_path(layer, module), True):
            raise InvalidArgument(f"tensor {parts['lambda_d'][0]} is for {module}, which target_modules does not list")


def _check_ia3_tensors(cfg: dict, groups: Groups, base: BaseModelShape, limits: AdapterLimits) -> None:
    for (layer, module), parts in groups.items():
        name, shape = parts[""]
        d_in, d_out = base.linear_dims(module)
        if shape not in ((d_out, 1), (1, d_in)):
            raise FailedPrecondition(f"tensor {name} has shape {list(shape)}; the base model needs "
                                     f"[{d_out}, 1] (output scale) or [1, {d_in}] (feedforward input scale)")
        on_input = shape == (1, d_in)
        path = module_path(layer, module)
        if isinstance(cfg.get("feedforward_modules"), list) and on_input != _matches_module_list(
                cfg["feedforward_modules"], path, False):
            raise InvalidArgument(f"tensor {name} has shape {list(shape)}, which disagrees with "
                                  "feedforward_modules in adapter_config.json")


def _check_prompt_tensor(cfg: dict, groups: Groups, width: int) -> None:
    name, shape = groups[(-1, "prompt")][""]
    n = cfg["num_virtual_tokens"]
    if len(shape) != 2 or shape[0] != n:
        raise InvalidArgument(f"tensor {name} has shape {list(shape)}; num_virtual_tokens says {n} rows")
    _want(name, shape, (n, width))


def _check_prefix_tensors(cfg: dict, groups: Groups, base: BaseModelShape, limits: AdapterLimits) -> None:
    _check_prompt_tensor(cfg, groups, base.num_layers * 2 * base.num_kv_heads * base.head_dim)


def _check_prompt_tensors(cfg: dict, groups: Groups, base: BaseModelShape, limits: AdapterLimits) -> None:
    _check_prompt_tensor(cfg, groups, base.hidden_size)


def _check_bottleneck_tensors(cfg: dict, groups: Groups, base: BaseModelShape, limits: AdapterLimits) -> None:
    r, hidden = cfg["bottleneck_size"], base.hidden_size
    for (layer, place), parts in groups.items():
        if place not in cfg["placement"]:
            raise InvalidArgument(f"layer {layer} has a {place} adapter but placement is {cfg['placement']}")
        if not {"down.weight", "up.weight"} <= set(parts):
            raise InvalidArgument(f"layer {layer} {place} adapter needs down.weight and up.weight")
        down_name, down = parts["down.weight"]
        if len(down) != 2 or down[0] != r:
            raise InvalidArgument(f"tensor {down_name} has shape {list(down)}; bottleneck_size is {r}")
        expected = {"down.weight": (r, hidden), "down.bias": (r,), "up.weight": (hidden, r), "up.bias": (hidden,)}
        for part, (name, shape) in parts.items():
            _want(name, shape, expected[part])


_TENSOR_CHECKS = {AdapterKind.LORA: _check_lora_tensors, AdapterKind.DORA: _check_lora_tensors,
                  AdapterKind.ADALORA: _check_adalora_tensors, AdapterKind.VERA: _check_vera_tensors,
                  AdapterKind.IA3: _check_ia3_tensors,
                  AdapterKind.PREFIX_TUNING: _check_prefix_tensors, AdapterKind.PROMPT_TUNING: _check_prompt_tensors,
                  AdapterKind.BOTTLENECK: _check_bottleneck_tensors}


# ---------------------------------------------------------------- entry points

def parse_files(config_bytes: bytes, weights: bytes, base: BaseModelShape, limits: AdapterLimits,
                expected_kind: AdapterKind | None = None) -> AdapterWeights:
    """Validate and parse adapter_config.json + adapter_model.safetensors bytes."""
    if len(config_bytes) > limits.max_config_bytes:
        raise ResourceExhausted(f"{CONFIG_FILE} is {len(config_bytes)} bytes; "
                                f"the limit is {limits.max_config_bytes}")
    cfg = load_json_object(config_bytes, CONFIG_FILE)
    kind = check_config(cfg, base, limits, expected_kind)
    header = read_safetensors_header(weights, limits.max_tensors)
    check_tensors(kind, cfg, header, base, limits)
    adapter = formats.assemble(kind, cfg, load_tensors(weights, limits.max_value), base)
    check_gains(adapter, limits.max_value)
    return adapter


def _row_norm(m: torch.Tensor) -> float:
    """||m||_inf: the largest sum of |entries| over rows, in float64 (no overflow while checking)."""
    return float(m.double().abs().sum(-1).max()) if m.numel() else 0.0


def check_gains(w: AdapterWeights, bound: float) -> None:
    """Every adapter linear's gain (see the module docstring) at most `bound`; InvalidArgument naming
    the first target over it."""
    def over(what: str, gain: float) -> None:
        if not gain <= bound:
            raise InvalidArgument(f"{what} has gain {gain:.3g} (scale x ||B|| x ||A||); this server accepts at "
                                  f"most {bound:.3g}, or outputs overflow (see the README, 'Adapter value bounds')")

    for (layer, module), t in w.lora.items():
        what = f"layer {layer} {module}"
        over(what, abs(t.scale) * _row_norm(t.B) * _row_norm(t.A))
        if t.bias is not None:
            shift = abs(t.scale) * float(t.bias.double().abs().max())
            if not shift <= bound:
                raise InvalidArgument(f"{what}: scale x lora_B.bias reaches {shift:.3g}; this server accepts at "
                                      f"most {bound:.3g}")
    for (layer, place), t in w.bottleneck.items():
        over(f"layer {layer} {place} bottleneck", _row_norm(t.up) * _row_norm(t.down))


def parse_upload(archive: bytes, base: BaseModelShape, limits: AdapterLimits,
                 expected_kind: AdapterKind | None = None, sha256: str | None = None) -> AdapterWeights:
    """Validate and parse an uploaded ZIP archive (see lorafleet.archive.make_archive)."""
    if len(archive) > limits.max_archive_bytes:
        raise ResourceExhausted(f"archive is {len(archive)} bytes; the limit is {limits.max_archive_bytes}")
    check_sha256(archive, sha256)
    try:
        config_bytes, weights = read_archive(archive, limits.max_config_bytes, limits.max_archive_bytes)
    except ArchiveTooLarge as e:
        raise ResourceExhausted(str(e)) from None
    except ArchiveError as e:
        raise InvalidArgument(str(e)) from None
    return parse_files(config_bytes, weights, base, limits, expected_kind)
