"""What is optimised and what is measured: loss sums over a batch, and the evaluation metrics.

Everything is a *sum* over loss terms (lm: target tokens; cls: examples) so that ranks and
micro-batches add up exactly; the loop divides by the global count once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer import dist
from trainer.data import IGNORE, Batch, Example, collate
from trainer.dist import DistEnv
from trainer.distill import kd_sum
from trainer.methods import AdapterModule


@dataclass(frozen=True)
class Sums:
    ce: torch.Tensor  # scalar: Σ cross-entropy over loss terms
    kd: torch.Tensor  # scalar: Σ T²·KL(teacher ‖ student) over the same terms (0 without a teacher)
    count: int  # loss terms in the batch
    logits: torch.Tensor  # [N, C] the rows the sums are over (detached use only: predictions)
    targets: torch.Tensor  # [N]


def select(logits: torch.Tensor, batch: Batch, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows that are loss terms: lm [B, T, V] -> [N, V] where the next token is a target; cls as is."""
    if task == "cls":
        return logits, batch.labels
    keep = batch.labels[:, 1:] != IGNORE  # [B, T-1]
    return logits[:, :-1][keep], batch.labels[:, 1:][keep]


def loss_sums(logits: torch.Tensor, batch: Batch, task: str, teacher_logits: torch.Tensor | None,
              temperature: float) -> Sums:
    """logits: lm [B, T, V] / cls [B, C] from AdapterModule; teacher_logits the same shape or None."""
    rows, targets = select(logits, batch, task)
    ce = F.cross_entropy(rows.float(), targets, reduction="sum")
    kd = ce.new_zeros(())
    if teacher_logits is not None:
        kd = kd_sum(rows, select(teacher_logits, batch, task)[0], temperature)
    return Sums(ce, kd, int(targets.numel()), rows, targets)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op context on CPU (fp32)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def evaluate(student: AdapterModule, teacher: AdapterModule | None, examples: list[Example], task: str,
             num_labels: int, batch_size: int, pad_id: int, temperature: float, env: DistEnv) -> dict:
    """Metrics over `examples` (sharded over ranks, sums all-reduced): eval_loss and
    eval_ppl (lm) or eval_accuracy and eval_f1 (macro, cls); eval_kl when distilling."""
    was_training = student.training
    student.eval()
    c = max(num_labels, 1)
    acc = torch.zeros(3 + 3 * c, dtype=torch.float64)  # ce, kd, count, then tp[c], fp[c], fn[c]
    mine = examples[env.rank::env.world]
    for i in range(0, len(mine), batch_size):
        batch = collate(mine[i:i + batch_size], task, pad_id).to(env.device)
        with autocast(env.device):
            logits = student(batch.input_ids, batch.attention_mask)
            t_logits = teacher(batch.input_ids, batch.attention_mask) if teacher is not None else None
        s = loss_sums(logits, batch, task, t_logits, temperature)
        acc[0] += s.ce.item()
        acc[1] += s.kd.item()
        acc[2] += s.count
        if task == "cls":
            pred, y = s.logits.argmax(-1).cpu(), s.targets.cpu()
            acc[3:3 + c] += torch.bincount(y[pred == y], minlength=c).double()
            acc[3 + c:3 + 2 * c] += torch.bincount(pred[pred != y], minlength=c).double()
            acc[3 + 2 * c:] += torch.bincount(y[pred != y], minlength=c).double()
    acc = dist.all_reduce_sum(acc.to(env.device), env).cpu()
    student.train(was_training)
    n = max(acc[2].item(), 1.0)
    out = {"eval_loss": acc[0].item() / n}
    if teacher is not None:
        out["eval_kl"] = acc[1].item() / n / temperature ** 2
    if task == "lm":
        out["eval_ppl"] = math.exp(min(out["eval_loss"], 50.0))
    else:
        tp, fp, fn = acc[3:3 + c], acc[3 + c:3 + 2 * c], acc[3 + 2 * c:]
        out["eval_accuracy"] = tp.sum().item() / n
        seen = (tp + fp + fn) > 0  # classes absent from both truth and predictions do not count
        f1 = 2 * tp / (2 * tp + fp + fn).clamp(min=1)
        out["eval_f1"] = f1[seen].mean().item() if bool(seen.any()) else 0.0
    return out
