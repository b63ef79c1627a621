"""Knowledge distillation: the teacher, and the soft-target loss.

loss = α · CE(student, labels) + (1 - α) · T² · KL(softmax(teacher / T) ‖ softmax(student / T)),
summed over the same positions as the CE (lm: completion tokens; cls: examples) and normalised by
the same count. Teacher: the base with another adapter (--teacher-adapter, any kind), or a local
Hugging Face model directory with the same tokenizer (--teacher-model), optionally with an adapter.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from trainer.config import TrainConfig, TrainError
from trainer.methods import AdapterModule, load_adapter, load_base, read_model_config


def kd_sum(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · Σ_rows KL(teacher_T ‖ student_T); student, teacher: [N, C] logits -> scalar (float32)."""
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    return temperature ** 2 * F.kl_div(s, t, log_target=True, reduction="sum")


def _same_tokenizer(a: Path, b: Path) -> None:
    try:
        va = Tokenizer.from_file(str(a / "tokenizer.json")).get_vocab(with_added_tokens=True)
        vb = Tokenizer.from_file(str(b / "tokenizer.json")).get_vocab(with_added_tokens=True)
    except Exception as e:  # tokenizers raises its own exception type for unreadable files
        raise TrainError(f"--teacher-model {b}: cannot read its tokenizer.json ({str(e)[:200]})") from None
    if va != vb:
        raise TrainError(f"--teacher-model {b} has a different tokenizer from --base {a}; "
                         "distillation compares logits token by token, so the vocabularies must match")


def _check_teacher_labels(adapter_dir: Path, labels: tuple[str, ...]) -> None:
    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    theirs = (cfg.get("lorafleet") or {}).get("labels")
    if theirs is not None and tuple(theirs) != labels:
        raise TrainError(f"--teacher-adapter {adapter_dir} has labels {theirs}; the training data has "
                         f"{list(labels)} (same names in the same order needed)")


def build_teacher(cfg: TrainConfig, labels: tuple[str, ...], pad_id: int, device: torch.device) -> AdapterModule:
    model_dir = Path(cfg.teacher_model or cfg.base)
    model_config = read_model_config(model_dir)
    if cfg.teacher_model is not None:
        _same_tokenizer(Path(cfg.base), model_dir)
    if cfg.task == "cls" and cfg.teacher_adapter is None:
        id2label = model_config.get("id2label") or {}
        theirs = tuple(id2label[k] for k in sorted(id2label, key=int))
        if not str(model_config.get("architectures", [""])[0]).endswith("ForSequenceClassification") \
                or theirs != labels:
            raise TrainError(f"--teacher-model {model_dir} is not a sequence classifier with labels "
                             f"{list(labels)}; pass --teacher-adapter with a head")
    base = load_base(model_dir, cfg.task, labels, pad_id)
    if cfg.teacher_adapter is None:
        teacher = AdapterModule(base, "none", cfg.task).eval()
    else:
        if cfg.task == "cls":
            _check_teacher_labels(cfg.teacher_adapter, labels)
        try:
            teacher = load_adapter(base, cfg.teacher_adapter, cfg.task, model_config)
        except RuntimeError as e:  # shape mismatch between the adapter and this base / head
            raise TrainError(f"--teacher-adapter {cfg.teacher_adapter} does not fit the teacher model "
                             f"({str(e)[:300]})") from None
    teacher.requires_grad_(False)
    return teacher.to(device)
