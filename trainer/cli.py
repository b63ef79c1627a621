"""`python -m trainer` / `lorafleet train`: flags -> TrainConfig -> train -> export (-> upload).

Exit status: 0 done, 2 a problem with the input or flags (one line on stderr, no traceback),
1 the upload failed.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

from server.kernels.activation import NAMES as ACTIVATION_NAMES
from trainer.config import DEFAULT_LR, LINEAR_MODULES, METHODS, DataSource, TrainConfig, TrainError

DEFAULT_MODELS = Path.home() / ".cache" / "lorafleet" / "models"
TRAIN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
EPILOG = """\
data formats (JSONL, one object per line):
  --task lm   {"prompt": "...", "completion": "..."}  (loss on the completion + EOS only)  or  {"text": "..."}
  --task cls  {"text": "...", "label": "..."}          (label names are stored in the exported config)
  --chat      {"prompt": "...", "completion": "..."}  the prompt is sent as one user message through the base
              model's chat template (as `lorafleet chat` does); the completion is the reply, ended by end-of-turn
distributed: torchrun --nproc_per_node N -m trainer ...  (same flags; --batch-size stays the global batch)
"""


def _data_source(text: str) -> DataSource:
    path, sep, weight = text.rpartition(":")
    if sep and path:
        try:
            return DataSource(Path(path), float(weight))
        except ValueError:
            pass
    return DataSource(Path(text), 1.0)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to train")
    g.add_argument("--method", required=True, choices=METHODS, help="adapter kind")
    g.add_argument("--task", default="lm", choices=("lm", "cls"),
                   help="lm: causal-LM fine-tuning; cls: sequence classification with a head")
    g.add_argument("--data", action="append", type=_data_source, required=True, metavar="FILE[:WEIGHT]",
                   help="training JSONL; repeat for a multi-task mixture sampled by WEIGHT (default 1)")
    g.add_argument("--eval", dest="eval_path", type=Path, metavar="FILE",
                   help="evaluation JSONL (default: hold out --eval-fraction of each --data file)")
    g.add_argument("--eval-fraction", type=float, metavar="X",
                   help="held-out share without --eval (0 = none)")
    g.add_argument("--chat", action="store_true",
                   help="lm: render each prompt as one user message with the base model's chat template, as the "
                        "server's chat call does; the completion is the assistant's reply (ends at end-of-turn)")
    g.add_argument("--labels", type=_csv, metavar="A,B,...",
                   help="cls: label names in head order (default: the sorted labels of the training data)")
    g.add_argument("--base", type=Path, metavar="DIR",
                   help="base model directory (default: the server's default, SmolLM2-135M-Instruct, converted once)")
    g.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="adapter output directory (also holds checkpoints/ and metrics.jsonl)")
    g = p.add_argument_group("LoRA / DoRA / IA3", "DoRA takes the LoRA options and learns a magnitude per output row")
    g.add_argument("--rank", type=int, metavar="N", help="LoRA rank r")
    g.add_argument("--alpha", type=float, metavar="X",
                   help="LoRA alpha; scale = alpha / r")
    g.add_argument("--rslora", action="store_true", help="rank-stabilised LoRA: scale = alpha / sqrt(r)")
    g.add_argument("--dropout", type=float, metavar="X", help="LoRA dropout")
    g.add_argument("--targets", type=_csv, metavar="M,M,...",
                   help=f"modules to adapt, of {', '.join(LINEAR_MODULES)} "
                        "(default: all seven for LoRA and DoRA; k_proj,v_proj,down_proj for IA3)")
    g = p.add_argument_group("bottleneck adapters")
    g.add_argument("--bottleneck-size", type=int, metavar="N", help="bottleneck width r")
    g.add_argument("--activation", choices=ACTIVATION_NAMES,
                   help="nonlinearity between down and up")
    g.add_argument("--placement", type=_csv, metavar="attn,mlp",
                   help="after the attention block and/or the MLP block")
    g = p.add_argument_group("prefix / prompt tuning")
    g.add_argument("--virtual-tokens", type=int, metavar="N", help="number of virtual tokens")
    g.add_argument("--prefix-projection", action="store_true",
                   help="prefix: train through an MLP reparameterisation (folded away at export)")
    g.add_argument("--prefix-hidden", type=int, metavar="N",
                   help="prefix: MLP width (default: hidden size)")
    g.add_argument("--prompt-init-text", metavar="TEXT",
                   help="prompt: initialise from this text's token embeddings (default: random)")
    g = p.add_argument_group("loop")
    g.add_argument("--epochs", type=int, metavar="N", help="passes over the training data")
    g.add_argument("--max-steps", type=int, metavar="N",
                   help="optimizer steps; overrides --epochs when > 0")
    g.add_argument("--batch-size", type=int, metavar="N",
                   help="GLOBAL examples per optimizer step, over all processes and accumulation")
    g.add_argument("--grad-accum", type=int, metavar="N",
                   help="micro-batches per step on each process")
    g.add_argument("--lr", type=float, metavar="X", help="peak learning rate (default per method: "
                   + ", ".join(f"{m} {v:g}" for m, v in DEFAULT_LR.items()) + ")")
    g.add_argument("--weight-decay", type=float, metavar="X", help="AdamW weight decay")
    g.add_argument("--warmup-steps", type=int, metavar="N",
                   help="linear warmup, then cosine to 0")
    g.add_argument("--max-grad-norm", type=float, metavar="X",
                   help="clip the global grad norm; 0 = off")
    g.add_argument("--eval-every", type=int, metavar="N",
                   help="steps between evaluations (default: total / 5)")
    g.add_argument("--early-stopping-patience", type=int, metavar="N",
                   help="stop after this many evaluations without a lower eval loss; 0 = off. "
                        "The export holds the weights of the best evaluation.")
    g.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="steps between checkpoints (default: each eval)")
    g.add_argument("--keep-checkpoints", type=int, metavar="N", help="newest checkpoints kept")
    g.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                   help="continue from a checkpoint directory, or (no value) the newest under --out")
    g.add_argument("--seed", type=int, metavar="N",
                   help="seeds the adapter init, data order and split")
    g.add_argument("--max-length", type=int, metavar="N",
                   help="truncate examples to this many tokens")
    g.add_argument("--metrics-log", type=Path, metavar="FILE", help="JSONL metrics (default OUT/metrics.jsonl)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"),
                   help="auto takes the GPU when present (bf16 autocast there; fp32 on CPU)")
    g.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads per process (default: cores / processes)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("knowledge distillation")
    g.add_argument("--teacher-adapter", type=Path, metavar="DIR",
                   help="teacher = the base (or --teacher-model) with this adapter directory")
    g.add_argument("--teacher-model", type=Path, metavar="DIR",
                   help="teacher = this local Hugging Face model directory (same tokenizer as --base)")
    g.add_argument("--distill-alpha", type=float, metavar="X",
                   help="loss = alpha * CE + (1 - alpha) * T^2 * KL(teacher || student)")
    g.add_argument("--distill-temperature", type=float, metavar="T",
                   help="softmax temperature of both models in the KL term")
    g = p.add_argument_group("upload after export")
    g.add_argument("--upload", action="store_true", help="upload the exported adapter to a server")
    g.add_argument("--name", help="adapter name on the server")
    g.add_argument("--server", default="localhost:50051", metavar="HOST:PORT",
                   help="server for --upload (default localhost:50051)")
    g.add_argument("--api-key", default=os.environ.get("LORAFLEET_API_KEY"), metavar="KEY",
                   help="API key (default $LORAFLEET_API_KEY)")
    p.set_defaults(**TRAIN_DEFAULTS)     # one declaration of every default: TrainConfig


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The epilog as written; each option's default (from TrainConfig) appended to its help,
    unless the help already says what the default means."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        hidden = action.default is None or action.default is False or action.default == () \
            or action.default == argparse.SUPPRESS
        if "default" in text or hidden or action.required:
            return text
        shown = ",".join(action.default) if isinstance(action.default, tuple) else action.default
        return f"{text} (default {shown})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorafleet train", description="Train one adapter on a frozen base model "
                                "and export it in the format the server serves.", epilog=EPILOG,
                                formatter_class=HelpFormatter)
    add_arguments(p)
    return p


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    base = a.base
    if base is None:
        from server.model.default import resolve_model
        base = resolve_model(None, DEFAULT_MODELS)        # SmolLM2-135M-Instruct, as the server serves
    return TrainConfig(
        method=a.method, task=a.task, data=tuple(a.data), out=a.out, base=base, eval_path=a.eval_path,
        eval_fraction=a.eval_fraction, labels=a.labels, chat=a.chat, rank=a.rank, alpha=a.alpha, rslora=a.rslora,
        dropout=a.dropout, targets=a.targets, bottleneck_size=a.bottleneck_size, activation=a.activation,
        placement=a.placement, virtual_tokens=a.virtual_tokens, prefix_projection=a.prefix_projection,
        prefix_hidden=a.prefix_hidden, prompt_init_text=a.prompt_init_text, epochs=a.epochs,
        max_steps=a.max_steps, batch_size=a.batch_size, grad_accum=a.grad_accum, lr=a.lr,
        weight_decay=a.weight_decay, warmup_steps=a.warmup_steps, max_grad_norm=a.max_grad_norm,
        eval_every=a.eval_every, early_stopping_patience=a.early_stopping_patience,
        checkpoint_every=a.checkpoint_every, keep_checkpoints=a.keep_checkpoints, seed=a.seed,
        max_length=a.max_length, resume=a.resume, teacher_adapter=a.teacher_adapter, teacher_model=a.teacher_model,
        distill_alpha=a.distill_alpha, distill_temperature=a.distill_temperature, metrics_log=a.metrics_log,
        device=a.device, threads=a.threads, quiet=a.quiet)


def _check_upload(a: argparse.Namespace) -> None:
    if not a.upload:
        return
    from server.adapters.refs import validate_name
    from server.errors import InvalidArgument

    if not a.name:
        raise TrainError("--upload needs --name NAME")
    try:
        validate_name(a.name, "--name")
    except InvalidArgument as e:
        raise TrainError(str(e)) from None


def upload(out: Path, name: str, server: str, api_key: str | None) -> None:
    from client import LoraFleetClient  # lazily: training needs no gRPC

    with LoraFleetClient(server, api_key=api_key) as c:
        c.upload_adapter(out, name)


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(a: argparse.Namespace) -> int:
    """Train from parsed flags (for a `lorafleet train` sub-command built with `add_arguments`)."""
    main_rank = int(os.environ.get("RANK", "0")) == 0
    log = logging.getLogger("lorafleet.trainer")  # ours only: a server in the same process keeps its format
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("lorafleet train: %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO if main_rank else logging.WARNING)
    try:
        _check_upload(a)
        from trainer.loop import train

        result = train(config_from_args(a))
    except TrainError as e:
        print(f"lorafleet train: error: {e}", file=sys.stderr)
        return 2
    if not main_rank:
        return 0
    evals = ", ".join(f"{k} {v:.4g}" for k, v in result.eval.items())
    loss = "n/a" if result.train_loss is None else f"{result.train_loss:.4f}"
    print(f"lorafleet train: exported {a.method} adapter to {result.out} after {result.steps} steps "
          f"(train loss {loss}{'; ' + evals if evals else ''}{'; stopped early' if result.stopped_early else ''})")
    if a.upload:
        try:
            upload(result.out, a.name, a.server, a.api_key)
        except Exception as e:  # grpc.RpcError and friends: report, do not trace back
            detail = e.details() if hasattr(e, "details") else str(e)
            print(f"lorafleet train: upload of {a.name!r} to {a.server} failed: {detail}", file=sys.stderr)
            return 1
        print(f"lorafleet train: uploaded as {a.name!r} to {a.server}")
    return 0
