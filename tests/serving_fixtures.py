"""Adapters for the engine tests: made by the real `peft` (and our bottleneck writer) on the
tiny embedded base, with non-zero weights, plus the oracles that run them without our engine."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from lorafleet.archive import archive_dir
from server.adapters import formats
from server.adapters.weights import BottleneckTarget
from server.model.shape import BaseModelShape
from server.adapters.registry import AdapterRegistry
from server.engine.engine import AdapterServing

KINDS = ("lora", "lora_rs", "ia3", "bottleneck", "prefix", "prompt")
VARIANT_KINDS = ("dora", "adalora", "vera", "lora_bias")   # served as LoRA (issue 14)
ALL_KINDS = KINDS + VARIANT_KINDS


def hf_base(base_dir: Path, seq_cls: bool = False, num_labels: int = 3):
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification
    if seq_cls:
        return LlamaForSequenceClassification.from_pretrained(
            str(base_dir), num_labels=num_labels, pad_token_id=0, dtype=torch.float32).eval()
    return LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()


def _perturb(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "ia3_l" in name:
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.4)
            elif "prompt_encoder" in name or "prompt_embeddings" in name:
                p.copy_(torch.randn(p.shape, generator=g))


def peft_config(kind: str, seed: int):
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig
    r = 2 + seed % 7
    return {
        "lora": lambda: LoraConfig(r=r, lora_alpha=2 * r, task_type="CAUSAL_LM",
                                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                   "gate_proj", "up_proj", "down_proj"]),
        "lora_rs": lambda: LoraConfig(r=16, lora_alpha=8, use_rslora=True, task_type="CAUSAL_LM",
                                      target_modules=["q_proj", "v_proj", "down_proj"],
                                      rank_pattern={"down_proj": 4}),
        "ia3": lambda: IA3Config(task_type="CAUSAL_LM"),
        "prefix": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3 + seed % 4),
        "prompt": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2 + seed % 5),
    }[kind]()


@functools.lru_cache(maxsize=None)
def make_adapter(base_dir: Path, out_root: Path, kind: str, seed: int):
    """(directory, oracle model) for one adapter. The oracle is a PeftModel, or for bottleneck
    adapters the HF base with forward hooks doing h + up(act(down h + bd)) + bu."""
    out = Path(out_root) / f"{kind}-{seed}"
    torch.manual_seed(seed)
    if kind in VARIANT_KINDS:
        return make_variant_adapter(base_dir, out, kind, seed)
    if kind == "bottleneck":
        shape = BaseModelShape.from_hf_config(json.loads((base_dir / "config.json").read_text()))
        g = torch.Generator().manual_seed(seed)
        size, d = 4 + seed % 5, shape.hidden_size
        act = ("relu", "gelu", "silu")[seed % 3]
        targets = {(l, p): BottleneckTarget(torch.randn(size, d, generator=g) * 0.3, torch.randn(size, generator=g),
                                            torch.randn(d, size, generator=g) * 0.3, torch.randn(d, generator=g) * 0.1,
                                            act)
                   for l in range(shape.num_layers) for p in ("attn", "mlp") if (l + seed) % 3 or p == "mlp"}
        formats.write_bottleneck(out, targets, shape)
        return out, bottleneck_oracle(hf_base(base_dir), targets)
    from peft import get_peft_model
    model = get_peft_model(hf_base(base_dir), peft_config(kind, seed))
    _perturb(model, seed)
    model.eval()
    model.save_pretrained(str(out))
    return out, model


def make_cls_adapter(base_dir: Path, out_root: Path, seed: int, labels=("neg", "neu", "pos")):
    """A LoRA + score-head classification adapter (PEFT SEQ_CLS) and its PeftModel."""
    from peft import LoraConfig, get_peft_model
    out = Path(out_root) / f"cls-{seed}"
    torch.manual_seed(seed)
    model = get_peft_model(hf_base(base_dir, seq_cls=True, num_labels=len(labels)),
                           LoraConfig(r=4, lora_alpha=8, task_type="SEQ_CLS", target_modules=["q_proj", "v_proj"]))
    _perturb(model, seed)
    model.eval()
    model.save_pretrained(str(out))
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg[formats.LABELS_KEY] = {"labels": list(labels)}
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out, model


def bottleneck_oracle(hf, targets: dict[tuple[int, str], BottleneckTarget]):
    acts = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}

    def hook(t: BottleneckTarget, is_attn: bool):
        def fn(_module, _inputs, output):
            h = output[0] if is_attn else output
            z = acts[t.activation](h @ t.down.T + t.down_bias)
            h = h + z @ t.up.T + t.up_bias
            return (h, *output[1:]) if is_attn else h
        return fn

    for (layer, place), t in targets.items():
        mod = hf.model.layers[layer].self_attn if place == "attn" else hf.model.layers[layer].mlp
        mod.register_forward_hook(hook(t, place == "attn"))
    return hf


@torch.no_grad()
def oracle_greedy(model, prompt_ids: list[int], n: int) -> tuple[torch.Tensor, list[int]]:
    """First-step logits [vocab] and n greedy tokens, recomputing the whole sequence each step
    (PEFT's forward pass, no cache: its generate() mishandles prefix/prompt tuning)."""
    ids, first, out = list(prompt_ids), None, []
    for _ in range(n):
        logits = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits[0, -1]
        first = logits if first is None else first
        t = int(logits.argmax())
        out.append(t)
        ids.append(t)
    return first, out


@torch.no_grad()
def oracle_logits_along(model, prompt_ids: list[int], tokens: list[int]) -> torch.Tensor:
    """Logits [len(tokens), vocab] before each of `tokens` (teacher-forced on them), recomputing the
    whole sequence each step, as oracle_greedy does."""
    ids, out = list(prompt_ids), []
    for t in tokens:
        out.append(model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)
                         ).logits[0, -1])
        ids.append(t)
    return torch.stack(out)


def serving(loaded, root: Path, num_slots: int = 8, max_rank: int = 16,
            max_host_entries: int = 64) -> tuple[AdapterRegistry, AdapterServing]:
    """The server's own adapter wiring (store -> registry -> slots <- cache) over `root`."""
    from server.config import ServerConfig
    from server.main import build_adapters
    cfg = ServerConfig(data_dir=Path(root), adapter_slots=num_slots, max_adapter_rank=max_rank,
                       host_adapters=max_host_entries)
    _store, adapters = build_adapters(cfg, loaded)
    return adapters.registry, adapters


def upload(registry: AdapterRegistry, tenant: str, name: str, directory: Path):
    return registry.put(tenant, name, archive_dir(directory))


# ---------------------------------------------------------------- DoRA, AdaLoRA, VeRA, LoRA bias (issue 14)

def variant_peft_config(kind: str, seed: int):
    """Configs of the kinds served as LoRA; ranks and targets vary with the seed (DoRA on a part of the
    fused q/k/v and gate/up outputs only, for odd seeds)."""
    from peft import AdaLoraConfig, LoraConfig, VeraConfig
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    some = ["k_proj", "up_proj", "down_proj"]
    return {
        "dora": lambda: LoraConfig(r=2 + seed % 5, lora_alpha=3 + seed % 4, use_dora=True, task_type="CAUSAL_LM",
                                   target_modules=some if seed % 2 else every),
        "adalora": lambda: AdaLoraConfig(init_r=6, lora_alpha=4 + seed % 9, total_step=10, task_type="CAUSAL_LM",
                                         target_modules=["q_proj", "v_proj", "down_proj"]),
        "vera": lambda: VeraConfig(r=4 + seed % 5, task_type="CAUSAL_LM",
                                   target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
        "lora_bias": lambda: LoraConfig(r=2 + seed % 6, lora_alpha=8, lora_bias=True, task_type="CAUSAL_LM",
                                        target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]),
    }[kind]()


def make_variant_adapter(base_dir: Path, out: Path, kind: str, seed: int):
    """(directory, oracle) for a DoRA / AdaLoRA / VeRA / LoRA-bias adapter written by peft with every
    adapter parameter non-zero; the oracle is PeftModel.from_pretrained of that directory."""
    from peft import get_peft_model
    from tests.unit.adapter_fixtures import perturb_all, save_variant
    model = get_peft_model(hf_base(base_dir), variant_peft_config(kind, seed))
    perturb_all(model, seed)
    model.eval()
    return out, save_variant(model, out, kind, hf_base(base_dir))
