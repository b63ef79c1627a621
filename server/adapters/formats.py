"""Adapter formats: the file layouts of every kind, parsed into one in-memory description
(`AdapterWeights`, server/adapters/weights.py).

Every adapter travels as two files, `adapter_config.json` and `adapter_model.safetensors`. The JSON
is an object whose `peft_type` names the kind. Tensors may be F16, BF16, F32 or F64; they are held
as float32 on CPU.

Upload container: `lorafleet.archive` (a ZIP of exactly these two files).

PEFT formats (as `peft` 0.21 `save_pretrained` writes them, adapter name stripped)
-----------------------------------------------------------------------------------
LORA           base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_A.weight  [r, d_in]
               base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_B.weight  [d_out, r]
               module in q_proj k_proj v_proj o_proj (self_attn), gate_proj up_proj down_proj (mlp).
               scale = alpha / r, or alpha / sqrt(r) with use_rslora; r and alpha per module from
               rank_pattern / alpha_pattern (PEFT's rule: first key K with re.match(r"(.*\\.)?(K)$", path)).
  + lora_bias  ...{module}.lora_B.bias  [d_out]            (kind LORA, `lora_bias: true`)
  + use_dora   ...{module}.lora_magnitude_vector  [d_out]  (kind DORA: peft_type LORA, `use_dora: true`)
ADALORA        ...{module}.lora_A [r, d_in], lora_E [r, 1], lora_B [d_out, r]   (no ".weight")
VERA           ...{module}.vera_lambda_d [r], vera_lambda_b [d_out];
               base_model.vera_A [r, max d_in], base_model.vera_B [max d_out, r] (save_projection)
               The folding of the last three kinds into LoRA factors: `peft_variants`.
IA3            base_model.model.model.layers.{i}.{...}.{module}.ia3_l  [d_out, 1] scales the module's
               OUTPUT (k_proj, v_proj), or [1, d_in] scales its INPUT (feedforward modules, down_proj).
PREFIX_TUNING  prompt_embeddings  [n_virtual, num_layers * 2 * num_kv_heads * head_dim]
PROMPT_TUNING  prompt_embeddings  [n_virtual, hidden]
Head           base_model.model.score.weight [num_labels, hidden], .bias [num_labels] (modules_to_save).

Prefix tuning, exactly as peft 0.21 `PeftModel.get_prompt` does it for a (GQA) Llama: the config
holds num_attention_heads = num_kv_heads and token_dim = num_kv_heads * head_dim; the row for
virtual token t is viewed as [2 * num_layers, num_kv_heads, head_dim], permuted to
[2 * num_layers, num_kv_heads, n_virtual, head_dim] and split in pairs: index 2*l is layer l's
keys, 2*l + 1 its values. They enter the cache as they are, with no RoPE applied. Our `prefix_kv`
is that tensor viewed as [num_layers, 2, num_kv_heads, n_virtual, head_dim].

Bottleneck format (ours, format_version 1)
------------------------------------------
adapter_config.json:
  {"peft_type": "BOTTLENECK", "format_version": 1, "bottleneck_size": r,
   "activation": "relu" | "gelu" | "silu", "placement": ["attn", "mlp"],
   "base_model_hidden_size": hidden, "base_model_num_layers": L}      (the last key is optional)
adapter_model.safetensors:
  layers.{i}.{attn|mlp}_adapter.down.weight  [r, hidden]
  layers.{i}.{attn|mlp}_adapter.down.bias    [r]        (optional)
  layers.{i}.{attn|mlp}_adapter.up.weight    [hidden, r]
  layers.{i}.{attn|mlp}_adapter.up.bias      [hidden]   (optional)
  score.weight [num_labels, hidden], score.bias [num_labels]   (optional classification head)
Each place present must be listed in "placement"; any subset of layers may carry it. "attn" acts on
the attention block output (after o_proj), "mlp" on the MLP block output (after down_proj), both
before the residual add:  h_out = h + up.weight @ act(down.weight @ h + down.bias) + up.bias.
"gelu" is the exact (erf) GELU.

Label names (any kind with a head): adapter_config.json may hold {"lorafleet": {"labels": [...]}},
one string per head row; without it the labels are LABEL_0, LABEL_1, ...

Functions here trust their input: call them on what `validate.parse_upload` has checked.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors

from lorafleet.archive import CONFIG_FILE, WEIGHTS_FILE
from server.adapters.peft_variants import fold_to_lora
from server.adapters.weights import (LORA_FAMILY, AdapterKind, AdapterWeights, BottleneckTarget,
                                     ClassificationHead, Ia3Target, LoraTarget, TensorRole)
from server.errors import InvalidArgument
from server.model.shape import MODULE_PARENT, BaseModelShape, module_path

PLACES = ("attn", "mlp")
PROMPT_KEY = "prompt_embeddings"
LABELS_KEY = "lorafleet"  # adapter_config.json: {"lorafleet": {"labels": [...]}}

_LAYER = r"(0|[1-9][0-9]{0,5})"  # no leading zeros: one name per tensor
_PEFT_MODULE = rf"base_model\.model\.model\.layers\.{_LAYER}\.(self_attn|mlp)\.([a-z_]+)\."
_LORA_RE = re.compile(_PEFT_MODULE + r"(?:lora_(A|B)\.weight|lora_(B)\.bias|lora_(magnitude)_vector)")
_ADALORA_RE = re.compile(_PEFT_MODULE + r"lora_(A|B|E)")
_VERA_RE = re.compile(_PEFT_MODULE + r"vera_lambda_(b|d)")
_VERA_SHARED_RE = re.compile(r"base_model\.vera_(A|B)")
_IA3_RE = re.compile(_PEFT_MODULE + r"ia3_l")
_BOTTLENECK_RE = re.compile(rf"layers\.{_LAYER}\.(attn|mlp)_adapter\.(down|up)\.(weight|bias)")
_HEAD_RE = {True: re.compile(r"base_model\.(?:model\.)?score\.(weight|bias)"),  # prefix/prompt: base_model.score
            False: re.compile(r"score\.(weight|bias)")}


def parse_tensor_name(kind: AdapterKind, name: str) -> TensorRole | None:
    """The role a tensor name addresses for `kind`, or None if the name is not one of the format's."""
    head = _HEAD_RE[kind is not AdapterKind.BOTTLENECK].fullmatch(name)
    if head:
        return TensorRole("head", -1, "", head.group(1))
    if kind in (AdapterKind.LORA, AdapterKind.DORA) and (m := _LORA_RE.fullmatch(name)):
        part = m.group(4) or ("B.bias" if m.group(5) else m.group(6))
        return _module_role("lora", m.group(1), m.group(2), m.group(3), part)
    if kind is AdapterKind.ADALORA and (m := _ADALORA_RE.fullmatch(name)):
        return _module_role("lora", m.group(1), m.group(2), m.group(3), m.group(4))
    if kind is AdapterKind.VERA and (m := _VERA_RE.fullmatch(name)):
        return _module_role("lora", m.group(1), m.group(2), m.group(3), f"lambda_{m.group(4)}")
    if kind is AdapterKind.VERA and (m := _VERA_SHARED_RE.fullmatch(name)):
        return TensorRole("vera", -1, "", m.group(1))
    if kind is AdapterKind.IA3 and (m := _IA3_RE.fullmatch(name)):
        return _module_role("ia3", m.group(1), m.group(2), m.group(3), "")
    if kind is AdapterKind.BOTTLENECK and (m := _BOTTLENECK_RE.fullmatch(name)):
        return TensorRole("bottleneck", int(m.group(1)), m.group(2), f"{m.group(3)}.{m.group(4)}")
    if kind in (AdapterKind.PREFIX_TUNING, AdapterKind.PROMPT_TUNING) and name == PROMPT_KEY:
        return TensorRole("prompt", -1, "", "")
    return None


def _module_role(role: str, layer: str, parent: str, module: str, part: str) -> TensorRole | None:
    if MODULE_PARENT.get(module) != parent:
        return None
    return TensorRole(role, int(layer), module, part)


def pattern_value(patterns: dict, path: str, default: float) -> float:
    """PEFT's `get_pattern_key`: the value of the first key K with re.match(r"(.*\\.)?(K)$", path)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def lora_rank_alpha(cfg: dict, layer: int, module: str) -> tuple[int, float]:
    """(r, alpha) of one LoRA module after rank_pattern / alpha_pattern."""
    path = module_path(layer, module)
    r = pattern_value(cfg.get("rank_pattern") or {}, path, cfg["r"])
    default_alpha = 8 if cfg.get("lora_alpha") is None else cfg["lora_alpha"]  # PEFT's default
    alpha = pattern_value(cfg.get("alpha_pattern") or {}, path, default_alpha)
    return int(r), float(alpha)


def label_names(cfg: dict, num_labels: int) -> tuple[str, ...]:
    labels = (cfg.get(LABELS_KEY) or {}).get("labels")
    return tuple(labels) if labels else tuple(f"LABEL_{i}" for i in range(num_labels))


def assemble(kind: AdapterKind, cfg: dict, tensors: dict[str, torch.Tensor],
             base: BaseModelShape) -> AdapterWeights:
    """Build AdapterWeights from checked float32 tensors named as the format says."""
    lora: dict[tuple[int, str], LoraTarget] = {}
    ia3: dict[tuple[int, str], Ia3Target] = {}
    groups: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    head_parts: dict[str, torch.Tensor] = {}
    shared: dict[str, torch.Tensor] = {}  # VeRA's vera_A / vera_B
    prompt = None
    roles = {name: parse_tensor_name(kind, name) for name in tensors}  # all known: validated before
    for name, role in sorted(roles.items(), key=lambda item: (item[1].layer, item[1].module, item[1].part)):
        t = tensors[name]
        if role.role == "head":
            head_parts[role.part] = t
        elif role.role == "prompt":
            prompt = t
        elif role.role == "vera":
            shared[role.part] = t
        elif role.role == "ia3":
            ia3[(role.layer, role.module)] = Ia3Target(t.reshape(-1), on_input=t.shape[0] == 1)
        else:
            groups.setdefault((role.layer, role.module), {})[role.part] = t
    if kind in (AdapterKind.LORA, AdapterKind.DORA):
        lora = {key: _lora_target(cfg, key, parts) for key, parts in groups.items()}
    elif kind in LORA_FAMILY:                                  # AdaLoRA / VeRA
        lora = fold_to_lora(kind, cfg, groups, shared, base)
    bottleneck = {key: BottleneckTarget(parts["down.weight"], parts.get("down.bias"), parts["up.weight"],
                                        parts.get("up.bias"), cfg.get("activation", "relu"))
                  for key, parts in groups.items()} if kind is AdapterKind.BOTTLENECK else {}
    head = None
    if head_parts:
        w = head_parts["weight"]  # [num_labels, hidden]
        head = ClassificationHead(w, head_parts.get("bias"), label_names(cfg, w.shape[0]))
    rank = max([t.A.shape[0] for t in lora.values()] + [t.down.shape[0] for t in bottleneck.values()],
               default=0)
    return AdapterWeights(
        kind=kind, lora=lora, ia3=ia3, bottleneck=bottleneck,
        prefix_kv=prefix_kv_from_peft(prompt, base) if kind is AdapterKind.PREFIX_TUNING else None,
        prompt_embeds=prompt if kind is AdapterKind.PROMPT_TUNING else None,
        head=head, rank=rank, nbytes=sum(t.numel() * t.element_size() for t in tensors.values()),
        config=cfg)


def _lora_target(cfg: dict, key: tuple[int, str], parts: dict[str, torch.Tensor]) -> LoraTarget:
    r, alpha = lora_rank_alpha(cfg, *key)
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return LoraTarget(A=parts["A"], B=parts["B"], scale=scale, bias=parts.get("B.bias"),
                      magnitude=parts.get("magnitude"))


def prefix_kv_from_peft(prompt: torch.Tensor, base: BaseModelShape) -> torch.Tensor:
    """PEFT prefix `prompt_embeddings` [T, L*2*kvh*hd] -> [L, 2, kvh, T, hd] (see module docstring)."""
    n_virtual = prompt.shape[0]
    kv = prompt.view(n_virtual, 2 * base.num_layers, base.num_kv_heads, base.head_dim)
    kv = kv.permute(1, 2, 0, 3)  # [2L, kvh, T, hd]
    return kv.reshape(base.num_layers, 2, base.num_kv_heads, n_virtual, base.head_dim).contiguous()


def bottleneck_files(targets: dict[tuple[int, str], BottleneckTarget], base: BaseModelShape,
                     head: ClassificationHead | None = None) -> tuple[bytes, bytes]:
    """Serialise a bottleneck adapter: (adapter_config.json bytes, adapter_model.safetensors bytes)."""
    if not targets:
        raise InvalidArgument("a bottleneck adapter needs at least one (layer, place) target")
    sizes = {t.down.shape[0] for t in targets.values()}
    acts = {t.activation for t in targets.values()}
    if len(sizes) != 1 or len(acts) != 1:
        raise InvalidArgument(f"all bottleneck targets must share one size and activation; got {sizes}, {acts}")
    tensors: dict[str, torch.Tensor] = {}
    for (layer, place), t in sorted(targets.items()):
        prefix = f"layers.{layer}.{place}_adapter."
        for part, value in (("down.weight", t.down), ("down.bias", t.down_bias),
                            ("up.weight", t.up), ("up.bias", t.up_bias)):
            if value is not None:
                tensors[prefix + part] = value.detach().to(torch.float32).contiguous()
    cfg: dict = {"peft_type": "BOTTLENECK", "format_version": 1, "bottleneck_size": sizes.pop(),
                 "activation": acts.pop(), "placement": sorted({p for _, p in targets}),
                 "base_model_hidden_size": base.hidden_size, "base_model_num_layers": base.num_layers}
    if head is not None:
        tensors["score.weight"] = head.weight.detach().to(torch.float32).contiguous()
        if head.bias is not None:
            tensors["score.bias"] = head.bias.detach().to(torch.float32).contiguous()
        cfg[LABELS_KEY] = {"labels": list(head.labels)}
    return json.dumps(cfg, indent=2).encode(), save_safetensors(tensors)


def write_bottleneck(directory: Path, targets: dict[tuple[int, str], BottleneckTarget],
                     base: BaseModelShape, head: ClassificationHead | None = None) -> None:
    """Write adapter_config.json + adapter_model.safetensors for a bottleneck adapter into `directory`."""
    config_bytes, weights = bottleneck_files(targets, base, head)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_bytes(config_bytes)
    (directory / WEIGHTS_FILE).write_bytes(weights)
