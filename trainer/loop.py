"""The training loop: AdamW, warmup + cosine, accumulation, clipping, eval, early stopping,
checkpoints, resume, DDP. `train(cfg)` runs unchanged under `torchrun --nproc_per_node N`.

One optimizer step: the step's global batch (data.BatchPlan) is sharded over ranks and split into
--grad-accum micro-batches; each micro-batch's loss *sum* is scaled by world / (global loss terms),
so after DDP's gradient average the update is exactly the mean over the global batch — the same
update as one process taking the whole batch.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from trainer import checkpoint, dist
from trainer.config import TrainConfig, TrainError
from trainer.data import BatchPlan, Datasets, Tokens, collate, count_targets, load_datasets, shard
from trainer.dist import DistEnv
from trainer.distill import build_teacher
from trainer.export import export_adapter
from trainer.methods import AdapterModule, build_student, load_base, read_model_config, trainable
from trainer.objective import autocast, evaluate, loss_sums

log = logging.getLogger("lorafleet.trainer")


class WarmupCosine:
    """lr(step) = base · (step + 1) / warmup during warmup, then a cosine from base to 0 at `total`."""

    def __init__(self, base_lr: float, warmup: int, total: int):
        self.base_lr, self.warmup, self.total = base_lr, warmup, total

    def lr(self, step: int) -> float:
        if step < self.warmup:
            return self.base_lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return self.base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def state_dict(self) -> dict:
        return {"base_lr": self.base_lr, "warmup": self.warmup, "total": self.total}


@dataclass
class Run:
    """Everything the loop mutates, built once by `_setup`."""

    cfg: TrainConfig
    env: DistEnv
    model_config: dict
    tokens: Tokens
    data: Datasets
    student: AdapterModule
    model: torch.nn.Module  # the student, wrapped in DDP when distributed
    params: dict[str, torch.nn.Parameter]  # trainable, in optimizer order
    teacher: AdapterModule | None
    optimizer: torch.optim.Optimizer
    schedule: WarmupCosine
    plan: BatchPlan
    total_steps: int
    eval_every: int
    step: int = 0
    best_eval: float | None = None
    bad_evals: int = 0
    best: dict[str, torch.Tensor] | None = None
    first_eval: dict = field(default_factory=dict)
    last_eval: dict = field(default_factory=dict)
    last_loss: float | None = None
    stopped_early: bool = False


@dataclass(frozen=True)
class TrainResult:
    out: Path
    steps: int
    train_loss: float | None  # the last step's global mean CE
    eval: dict  # the last evaluation's metrics ({} without an eval set)
    first_eval: dict  # the metrics before the first step (the untrained adapter); {} when resumed
    best_eval_loss: float | None
    stopped_early: bool
    labels: tuple[str, ...]
    model: AdapterModule  # the trained student, holding the exported weights


def train(cfg: TrainConfig) -> TrainResult:
    cfg.check()
    threads = torch.get_num_threads()
    env = dist.init(cfg.device, cfg.threads)
    try:
        run = _setup(cfg, env)
        _loop(run)
        return _finish(run)
    finally:
        dist.shutdown(env)
        torch.set_num_threads(threads)  # callers in the same process (tests, the demo) keep theirs


def _setup(cfg: TrainConfig, env: DistEnv) -> Run:
    model_config = read_model_config(cfg.base)
    tokens = Tokens.load(cfg.base, model_config)
    data = load_datasets(cfg, tokens)
    n_train = sum(len(d) for d in data.train)
    total = cfg.max_steps or cfg.epochs * math.ceil(n_train / cfg.batch_size)
    torch.manual_seed(cfg.seed)  # the same fresh adapter (and cls head) on every rank
    base = load_base(cfg.base, cfg.task, data.labels, tokens.pad_id)
    init_ids = []
    if cfg.method == "prompt" and cfg.prompt_init_text:
        init_ids = tokens.tokenizer.encode(cfg.prompt_init_text, add_special_tokens=False).ids
    student = build_student(cfg, base, model_config, init_ids).to(env.device)
    params = trainable(student)
    teacher = build_teacher(cfg, data.labels, tokens.pad_id, env.device) if cfg.distill else None
    optimizer = torch.optim.AdamW(list(params.values()), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    model: torch.nn.Module = student
    if env.distributed:
        model = DistributedDataParallel(student, device_ids=[env.local_rank] if env.device.type == "cuda" else None,
                                        forward_sync_buffers=False)  # rotary tables: identical everywhere
    torch.manual_seed(cfg.seed * 1_009 + env.rank + 1)  # dropout differs per rank, reproducibly
    run = Run(cfg, env, model_config, tokens, data, student, model, params, teacher, optimizer,
              WarmupCosine(cfg.learning_rate, cfg.warmup_steps, total),
              BatchPlan([len(d) for d in data.train], data.weights, cfg.batch_size, cfg.seed), total,
              cfg.eval_every or max(1, total // 5))
    if cfg.resume:
        _resume(run)
    if env.is_main:
        n_params = sum(p.numel() for p in params.values())
        log.info("%s/%s: %d trainable parameters, %d training examples (%s), %d eval, %d steps of %d examples",
                 cfg.method, cfg.task, n_params, n_train, " + ".join(str(len(d)) for d in data.train),
                 len(data.eval), total, cfg.batch_size)
    return run


def _train_step(run: Run) -> dict:
    cfg, env = run.cfg, run.env
    items = run.plan.next_batch()
    micro = shard([run.data.train[d][i] for d, i in items], env.rank, env.world, cfg.grad_accum)
    local = torch.tensor([float(sum(count_targets(m, cfg.task) for m in micro))], dtype=torch.float64)
    global_count = dist.all_reduce_sum(local.to(env.device), env).item()
    if global_count == 0:
        raise TrainError(f"step {run.step + 1}: the global batch holds no target tokens")
    scale = env.world / global_count  # DDP averages over ranks; this turns it into the global mean
    alpha = cfg.distill_alpha if run.teacher is not None else 1.0
    sums = torch.zeros(3, dtype=torch.float64)  # ce, kd, tokens
    run.student.train()
    for j, examples in enumerate(micro):
        batch = collate(examples, cfg.task, run.tokens.pad_id).to(env.device)
        sync = j == len(micro) - 1 or not env.distributed
        with contextlib.nullcontext() if sync else run.model.no_sync():
            with autocast(env.device):
                logits = run.model(batch.input_ids, batch.attention_mask)
                t_logits = None
                if run.teacher is not None:
                    with torch.no_grad():
                        t_logits = run.teacher(batch.input_ids, batch.attention_mask)
            s = loss_sums(logits, batch, cfg.task, t_logits, cfg.distill_temperature)
            ((alpha * s.ce + (1.0 - alpha) * s.kd) * scale).backward()
        sums += torch.tensor([s.ce.item(), s.kd.item(), float(batch.attention_mask.sum().item())],
                             dtype=torch.float64)
    params = list(run.params.values())
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
    lr = run.schedule.lr(run.step)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    sums = dist.all_reduce_sum(sums.to(env.device), env).cpu()
    out = {"loss": sums[0].item() / global_count, "lr": lr, "grad_norm": grad_norm, "tokens": int(sums[2])}
    if run.teacher is not None:
        out["kd"] = sums[1].item() / global_count
    return out


def _evaluate(run: Run) -> dict:
    cfg = run.cfg
    return evaluate(run.student, run.teacher, run.data.eval, cfg.task, len(run.data.labels),
                    max(1, cfg.batch_size // cfg.grad_accum), run.tokens.pad_id, cfg.distill_temperature, run.env)


def _after_eval(run: Run, metrics: dict) -> None:
    """Track the best eval loss (its weights are what gets exported) and early stopping."""
    run.last_eval = metrics
    if run.best_eval is None or metrics["eval_loss"] < run.best_eval:
        run.best_eval, run.bad_evals = metrics["eval_loss"], 0
        run.best = {k: p.detach().to("cpu").clone() for k, p in run.params.items()}
    else:
        run.bad_evals += 1
        patience = run.cfg.early_stopping_patience
        run.stopped_early = patience > 0 and run.bad_evals >= patience


def _loop(run: Run) -> None:
    cfg, env = run.cfg, run.env
    metrics_path = cfg.metrics_log or cfg.out / "metrics.jsonl"
    if env.is_main:
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
    mlog = open(metrics_path, "a" if cfg.resume else "w") if env.is_main else None  # noqa: SIM115
    bar = tqdm(total=run.total_steps, initial=run.step, desc=f"train {cfg.method}", unit="step",
               disable=not env.is_main or cfg.quiet, dynamic_ncols=True)
    try:
        if run.step == 0 and run.data.eval:  # the baseline every later evaluation is compared with
            run.first_eval = _evaluate(run)
            if mlog is not None:
                mlog.write(json.dumps({"step": 0, **run.first_eval}) + "\n")
        while run.step < run.total_steps and not run.stopped_early:
            t0 = time.perf_counter()
            stats = _train_step(run)
            run.step += 1
            run.last_loss = stats["loss"]
            tps = stats["tokens"] / max(time.perf_counter() - t0, 1e-9)
            record = {"step": run.step, **stats, "tokens_per_s": round(tps, 1)}
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.4f}", tok_s=f"{tps:.0f}")
            last = run.step == run.total_steps
            evaluated = bool(run.data.eval) and (run.step % run.eval_every == 0 or last)
            if evaluated:
                metrics = _evaluate(run)
                _after_eval(run, metrics)
                record.update(metrics)
                if env.is_main and not cfg.quiet:
                    bar.write("step %d: %s" % (run.step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())))
            if mlog is not None:
                mlog.write(json.dumps(record) + "\n")
                mlog.flush()
            every = cfg.checkpoint_every or run.eval_every
            if run.step % every == 0 or last or run.stopped_early:
                _save_checkpoint(run)
    finally:
        bar.close()
        if mlog is not None:
            mlog.close()


def _rng_states(env: DistEnv) -> dict[str, torch.Tensor]:
    states = {f"cpu.{r}": t for r, t in enumerate(dist.all_gather(torch.get_rng_state(), env))}
    if env.device.type == "cuda":
        cuda = dist.all_gather(torch.cuda.get_rng_state(env.device), env)
        states.update({f"cuda.{r}": t for r, t in enumerate(cuda)})
    return states


def _save_checkpoint(run: Run) -> None:
    rng = _rng_states(run.env)  # a collective: every rank takes part
    if not run.env.is_main:
        return
    state = {"world": run.env.world, "param_names": list(run.params), "schedule": run.schedule.state_dict(),
             "best_eval": run.best_eval, "bad_evals": run.bad_evals, "stopped_early": run.stopped_early,
             "last_eval": run.last_eval, "last_loss": run.last_loss,
             "adapter_shape": run.cfg.adapter_shape(), "config": run.cfg.to_json()}
    path = checkpoint.save(run.cfg.out, run.step, {k: p for k, p in run.params.items()},
                           run.optimizer.state_dict(), rng, run.best, state, run.cfg.keep_checkpoints)
    log.debug("checkpoint %s", path)


def _resume(run: Run) -> None:
    cfg, env = run.cfg, run.env
    path = checkpoint.resolve(cfg.resume, cfg.out)
    if path is None:
        if env.is_main:
            log.info("--resume: no checkpoint under %s yet; starting from step 0", cfg.out)
        return
    ck = checkpoint.load(path)
    if ck.state.get("adapter_shape") != cfg.adapter_shape():
        raise TrainError(f"--resume {path}: the checkpoint is for {ck.state.get('adapter_shape')}, "
                         f"this run for {cfg.adapter_shape()}")
    if ck.state["param_names"] != list(run.params) or set(ck.adapter) != set(run.params):
        raise TrainError(f"--resume {path}: its parameters do not match this model's")
    with torch.no_grad():
        for name, p in run.params.items():
            p.copy_(ck.adapter[name])
    run.optimizer.load_state_dict(ck.optimizer)
    for _ in range(ck.step):
        run.plan.next_batch()
    run.step, run.best, run.best_eval = ck.step, ck.best, ck.state["best_eval"]
    run.bad_evals, run.last_eval = ck.state["bad_evals"], ck.state["last_eval"]
    run.stopped_early, run.last_loss = ck.state["stopped_early"], ck.state["last_loss"]
    if ck.state["world"] == env.world:
        torch.set_rng_state(ck.rng[f"cpu.{env.rank}"])
        if env.device.type == "cuda" and f"cuda.{env.rank}" in ck.rng:
            torch.cuda.set_rng_state(ck.rng[f"cuda.{env.rank}"], env.device)
    elif env.is_main:
        log.warning("--resume: checkpoint from %d process(es), now %d: dropout RNG streams restart",
                    ck.state["world"], env.world)
    if env.is_main:
        log.info("resumed from %s at step %d of %d", path, ck.step, run.total_steps)


def _finish(run: Run) -> TrainResult:
    """Load the best-evaluated weights (when there was an eval) and export them (rank 0)."""
    if run.best is not None:
        with torch.no_grad():
            for name, p in run.params.items():
                p.copy_(run.best[name])
    if run.env.is_main:
        export_adapter(run.student, run.cfg.out, run.data.labels, run.model_config)
    dist.barrier(run.env)
    return TrainResult(run.cfg.out, run.step, run.last_loss, run.last_eval, run.first_eval, run.best_eval,
                       run.stopped_early, run.data.labels, run.student)
