"""The student: a frozen base model plus one adapter of the chosen method, behind one forward.

LoRA, DoRA (peft's LoRA with use_dora), IA3, prefix and prompt tuning are `peft` models (so `save_pretrained` writes exactly what
`PeftModel.from_pretrained` and the server read); bottleneck adapters are `trainer.bottleneck`.
`AdapterModule.forward(input_ids, attention_mask)` returns, for every method,
  lm   logits [B, T, vocab] aligned with input_ids (prompt tuning's virtual positions dropped)
  cls  logits [B, num_labels] at each row's last real token (rows are right-padded)
so the loop, the distillation loss and DDP see one shape whatever the method.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
from torch import nn

from trainer.bottleneck import BottleneckAdapters, BottleneckModel, read_bottleneck
from trainer.config import MLP_MODULES, TrainConfig, TrainError

PEFT_METHODS = {"LORA": "lora", "IA3": "ia3", "PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt"}


def quiet_transformers() -> None:
    import transformers

    # deprecations transformers 5 raises on peft 0.21's calls (past_key_values, is_gradient_checkpointing)
    warnings.filterwarnings("ignore", message=r".*(past_key_values|is_gradient_checkpointing).*deprecated",
                            category=FutureWarning)
    transformers.logging.set_verbosity_error()  # the load report lists lm_head / score on every cls load
    transformers.utils.logging.disable_progress_bar()


def read_model_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise TrainError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    return json.loads(path.read_text())


def load_base(model_dir: Path, task: str, labels: tuple[str, ...], pad_id: int) -> nn.Module:
    """A frozen float32 *ForCausalLM (lm) or *ForSequenceClassification (cls; `score` freshly seeded)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    quiet_transformers()
    read_model_config(model_dir)
    try:
        if task == "lm":
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                model_dir, dtype=torch.float32, local_files_only=True, num_labels=len(labels),
                id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
                pad_token_id=pad_id)
    except (OSError, ValueError, KeyError) as e:
        raise TrainError(f"{model_dir}: cannot load the model ({str(e)[:300]})") from None
    model.requires_grad_(False)
    return model


class AdapterModule(nn.Module):
    def __init__(self, inner: nn.Module, method: str, task: str, virtual_tokens: int = 0):
        super().__init__()
        self.inner, self.method, self.task = inner, method, task
        self.virtual_tokens = virtual_tokens  # prefix / prompt tuning: n_virtual; else 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:  # [B, T] each
        if self.task == "cls" and self.method in ("prefix", "prompt"):
            return self._prompt_learning_cls(input_ids, attention_mask)
        logits = self.inner(input_ids=input_ids, attention_mask=attention_mask).logits
        if self.method == "prompt":  # [B, n_virtual + T, vocab] -> [B, T, vocab]
            logits = logits[:, self.virtual_tokens:]
        return logits

    def _prompt_learning_cls(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """peft's prefix / prompt-tuning forward for a classifier, pooled at each row's last real token.

        Not peft's own forward: for prompt tuning it passes inputs_embeds only, so the model pools at
        position -1 (padding, for rows shorter than the longest); for prefix tuning peft 0.21 looks for
        a `past_key_values` argument that transformers 5 renamed `cache`, and refuses to run.
        """
        peft_model, base = self.inner, self.inner.base_model  # base: the *ForSequenceClassification
        b, n = input_ids.shape[0], self.virtual_tokens
        mask = torch.cat([attention_mask.new_ones(b, n), attention_mask], dim=1)  # [B, n + T]
        body = getattr(base, base.base_model_prefix)
        last = attention_mask.sum(1) - 1  # [B] right padding
        if self.method == "prompt":
            embeds = base.get_input_embeddings()(input_ids)  # [B, T, hidden]
            prompts = peft_model.get_prompt(batch_size=b).to(embeds.dtype)  # [B, n, hidden]
            hidden = body(inputs_embeds=torch.cat([prompts, embeds], 1), attention_mask=mask).last_hidden_state
            last = last + n
        else:  # the prefix enters as a pre-filled cache of n positions
            hidden = body(input_ids=input_ids, attention_mask=mask, cache=peft_model.get_prompt(batch_size=b),
                          use_cache=True).last_hidden_state  # [B, T, hidden]
        return base.score(hidden[torch.arange(b, device=hidden.device), last])  # [B, num_labels]


def trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def _peft_config(cfg: TrainConfig, model_config: dict):
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig

    task_type = "CAUSAL_LM" if cfg.task == "lm" else "SEQ_CLS"
    targets = list(cfg.target_modules)
    if cfg.method in ("lora", "dora"):
        return LoraConfig(task_type=task_type, r=cfg.rank, lora_alpha=cfg.alpha, use_rslora=cfg.rslora,
                          lora_dropout=cfg.dropout, target_modules=targets, bias="none",
                          use_dora=cfg.method == "dora")
    if cfg.method == "ia3":
        return IA3Config(task_type=task_type, target_modules=targets,
                         feedforward_modules=[t for t in targets if t in MLP_MODULES])
    if cfg.method == "prefix":
        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=cfg.virtual_tokens,
                                  prefix_projection=cfg.prefix_projection,
                                  encoder_hidden_size=cfg.prefix_hidden or int(model_config["hidden_size"]))
    return PromptTuningConfig(task_type=task_type, num_virtual_tokens=cfg.virtual_tokens,
                              prompt_tuning_init="RANDOM")


def build_student(cfg: TrainConfig, base: nn.Module, model_config: dict, init_text_ids: list[int]) -> AdapterModule:
    """Wrap the frozen `base` with a fresh adapter (seed the RNG before calling: inits are random)."""
    if cfg.method == "bottleneck":
        adapters = BottleneckAdapters(int(model_config["num_hidden_layers"]), int(model_config["hidden_size"]),
                                      cfg.bottleneck_size, cfg.activation, cfg.placement)
        if cfg.task == "cls":
            base.score.requires_grad_(True)
        return AdapterModule(BottleneckModel(base, adapters), "bottleneck", cfg.task)
    from peft import get_peft_model

    try:
        model = get_peft_model(base, _peft_config(cfg, model_config))
    except ValueError as e:
        raise TrainError(f"peft rejected the {cfg.method} configuration: {str(e)[:300]}") from None
    if cfg.method == "prompt" and init_text_ids:
        _init_prompt(model, init_text_ids, cfg.virtual_tokens)
    return AdapterModule(model, cfg.method, cfg.task, cfg.virtual_tokens if cfg.method in ("prefix", "prompt") else 0)


def _init_prompt(model: nn.Module, ids: list[int], n: int) -> None:
    """peft's TEXT init without storing a tokenizer path: the text's token embeddings, repeated to n."""
    ids = (ids * math.ceil(n / len(ids)))[:n]
    with torch.no_grad():
        emb = model.word_embeddings(torch.tensor(ids))  # [n, hidden]
        model.prompt_encoder["default"].embedding.weight.copy_(emb)


def load_adapter(base: nn.Module, adapter_dir: Path, task: str, model_config: dict) -> AdapterModule:
    """A frozen AdapterModule from an exported adapter directory (any kind) on `base` (the teacher)."""
    from server.model.shape import BaseModelShape

    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise TrainError(f"{adapter_dir}: not an adapter directory (no adapter_config.json)")
    peft_type = json.loads(path.read_text()).get("peft_type")
    if peft_type == "BOTTLENECK":
        shape = BaseModelShape.from_hf_config(model_config)
        weights = read_bottleneck(Path(adapter_dir), shape)
        if task == "cls":
            if weights.head is None:
                raise TrainError(f"{adapter_dir}: a cls teacher needs a classification head")
            with torch.no_grad():
                base.score.weight.copy_(weights.head.weight)
        module = AdapterModule(BottleneckModel(base, BottleneckAdapters.from_weights(weights, shape)),
                               "bottleneck", task)
    elif peft_type in PEFT_METHODS:
        from peft import PeftModel

        with warnings.catch_warnings():  # peft warns about our {"lorafleet": {"labels": ...}} key
            warnings.filterwarnings("ignore", message="Unexpected keyword arguments")
            model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
        n = int(getattr(model.peft_config["default"], "num_virtual_tokens", 0) or 0)
        module = AdapterModule(model, PEFT_METHODS[peft_type], task, n)
    else:
        raise TrainError(f"{adapter_dir}: unsupported peft_type {peft_type!r}")
    module.requires_grad_(False)
    return module.eval()
