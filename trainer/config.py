"""One frozen dataclass for every training knob, and the one error type users see.

Each knob is declared once, as `server.config` declares the server's (`knob(default, help, ...)`):
`trainer.cli` derives the flags, their defaults and --help from the fields and maps a parse back into
a TrainConfig; every other trainer module reads it and nothing else.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from server.config import REQUIRED, knob
from server.kernels.activation import NAMES as ACTIVATION_NAMES
from server.model.shape import LINEAR_MODULES, MLP_MODULES  # noqa: F401 - MLP_MODULES: for trainer.methods

METHODS = ("lora", "dora", "ia3", "bottleneck", "prefix", "prompt")
TASKS = ("lm", "cls")
DEFAULT_TARGETS = {"lora": LINEAR_MODULES, "dora": LINEAR_MODULES, "ia3": ("k_proj", "v_proj", "down_proj")}
# measured on the tiny and default models: prompt-learning methods want a larger step
DEFAULT_LR = {"lora": 2e-3, "dora": 2e-3, "ia3": 1e-2, "bottleneck": 2e-3, "prefix": 1e-2, "prompt": 3e-2}


class TrainError(Exception):
    """A problem the user can fix (bad data, bad flag, missing file); printed without a traceback."""


@dataclass(frozen=True)
class DataSource:
    path: Path
    weight: float  # relative sampling weight in a multi-task mixture

    @staticmethod
    def parse(text: str) -> "DataSource":
        """'FILE[:WEIGHT]' (the --data flag); a colon not followed by a number is part of the path."""
        path, sep, weight = text.rpartition(":")
        if sep and path:
            try:
                return DataSource(Path(path), float(weight))
            except ValueError:
                pass
        return DataSource(Path(text), 1.0)


# The flag groups of `lorafleet train --help` (trainer.cli), in the order they are shown
WHAT, LORA, BOTTLENECK, VIRTUAL, LOOP, DISTILL = ("what to train", "LoRA / DoRA / IA3", "bottleneck adapters",
                                                   "prefix / prompt tuning", "loop", "knowledge distillation")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Each knob declared once: type, default (REQUIRED: none), help, flag group, and where the flag
    differs from the field, its name, metavar or argparse settings; trainer.cli derives the flags."""

    method: str = knob(REQUIRED, "adapter kind", choices=METHODS, group=WHAT)
    task: str = knob("lm", "lm: causal-LM fine-tuning; cls: sequence classification with a head", choices=TASKS,
                     group=WHAT)
    data: tuple[DataSource, ...] = knob(
        REQUIRED, "training JSONL; repeat for a multi-task mixture sampled by WEIGHT (default 1)", group=WHAT,
        metavar="FILE[:WEIGHT]", action="append", type=DataSource.parse)
    eval_path: Path | None = knob(None, "evaluation JSONL (default: hold out --eval-fraction of each --data file)",
                                  flag="--eval", group=WHAT, metavar="FILE")  # None = held out from --data
    eval_fraction: float = knob(0.1, "held-out share without --eval (0 = none)", group=WHAT)
    chat: bool = knob(False, "lm: render each prompt as one user message with the base model's chat template, as "
                      "the server's chat call does; the completion is the assistant's reply (ends at end-of-turn)",
                      group=WHAT)
    labels: tuple[str, ...] = knob((), "cls: label names in head order (default: the sorted labels of the training "
                                   "data)", group=WHAT, metavar="A,B,...")  # empty = sorted labels of the data
    # a required field but an optional flag: without --base, trainer.cli resolves the default model
    base: Path = knob(REQUIRED, "base model directory (default: the server's default, SmolLM2-135M-Instruct, "
                      "converted once)", group=WHAT, metavar="DIR", required=False)
    out: Path = knob(REQUIRED, "adapter output directory (also holds checkpoints/ and metrics.jsonl)", group=WHAT,
                     metavar="DIR")
    # LoRA / DoRA (LoRA plus a learned magnitude per output row) / IA3
    rank: int = knob(8, "LoRA rank r", group=LORA)
    alpha: float = knob(16.0, "LoRA alpha; scale = alpha / r", group=LORA)
    rslora: bool = knob(False, "rank-stabilised LoRA: scale = alpha / sqrt(r)", group=LORA)
    dropout: float = knob(0.0, "LoRA dropout", group=LORA)
    targets: tuple[str, ...] = knob((), f"modules to adapt, of {', '.join(LINEAR_MODULES)} (default: all seven for "
                                    "LoRA and DoRA; k_proj,v_proj,down_proj for IA3)", group=LORA,
                                    metavar="M,M,...")  # empty = DEFAULT_TARGETS[method]
    # bottleneck
    bottleneck_size: int = knob(16, "bottleneck width r", group=BOTTLENECK)
    activation: str = knob("relu", "nonlinearity between down and up", choices=ACTIVATION_NAMES, group=BOTTLENECK)
    placement: tuple[str, ...] = knob(("attn", "mlp"), "after the attention block and/or the MLP block",
                                      group=BOTTLENECK, metavar="attn,mlp")
    # prefix / prompt tuning
    virtual_tokens: int = knob(8, "number of virtual tokens", group=VIRTUAL)
    prefix_projection: bool = knob(False, "prefix: train through an MLP reparameterisation (folded away at export)",
                                   group=VIRTUAL)
    prefix_hidden: int = knob(0, "prefix: MLP width (default: hidden size)", group=VIRTUAL)  # 0 = hidden size
    prompt_init_text: str | None = knob(None, "prompt: initialise from this text's token embeddings (default: "
                                        "random)", group=VIRTUAL, metavar="TEXT")
    # loop
    epochs: int = knob(1, "passes over the training data", group=LOOP)
    max_steps: int = knob(0, "optimizer steps; overrides --epochs when > 0", group=LOOP)
    batch_size: int = knob(16, "GLOBAL examples per optimizer step, over all processes and accumulation", group=LOOP)
    grad_accum: int = knob(1, "micro-batches per step on each process", group=LOOP)
    lr: float = knob(0.0, "peak learning rate (default per method: "
                     + ", ".join(f"{m} {v:g}" for m, v in DEFAULT_LR.items()) + ")", group=LOOP)  # 0 = DEFAULT_LR
    weight_decay: float = knob(0.0, "AdamW weight decay", group=LOOP)
    warmup_steps: int = knob(0, "linear warmup, then cosine to 0", group=LOOP)
    max_grad_norm: float = knob(1.0, "clip the global grad norm; 0 = off", group=LOOP)
    eval_every: int = knob(0, "steps between evaluations (default: total / 5)", group=LOOP)  # 0 = 5 per run + the end
    early_stopping_patience: int = knob(0, "stop after this many evaluations without a lower eval loss; 0 = off. "
                                        "The export holds the weights of the best evaluation.", group=LOOP)
    checkpoint_every: int = knob(0, "steps between checkpoints (default: each eval)", group=LOOP)  # 0 = at each eval
    keep_checkpoints: int = knob(2, "newest checkpoints kept", group=LOOP)
    resume: str | None = knob(None, "continue from a checkpoint directory, or (no value) the newest under --out",
                              group=LOOP, metavar="CHECKPOINT", nargs="?", const="latest")
    seed: int = knob(0, "seeds the adapter init, data order and split", group=LOOP)
    max_length: int = knob(256, "truncate examples to this many tokens", group=LOOP)
    metrics_log: Path | None = knob(None, "JSONL metrics (default OUT/metrics.jsonl)", group=LOOP,
                                    metavar="FILE")  # None = OUT/metrics.jsonl
    device: str = knob("auto", "auto takes the GPU when present (bf16 autocast there; fp32 on CPU)",
                       choices=("auto", "cpu", "cuda"), group=LOOP)
    threads: int = knob(0, "CPU threads per process (default: cores / processes)", group=LOOP)  # 0 = cores / ranks
    quiet: bool = knob(False, "no progress bar", group=LOOP)
    # distillation
    teacher_adapter: Path | None = knob(None, "teacher = the base (or --teacher-model) with this adapter directory",
                                        group=DISTILL, metavar="DIR")
    teacher_model: Path | None = knob(None, "teacher = this local Hugging Face model directory (same tokenizer as "
                                      "--base)", group=DISTILL, metavar="DIR")
    distill_alpha: float = knob(0.5, "loss = alpha * CE + (1 - alpha) * T^2 * KL(teacher || student)", group=DISTILL)
    distill_temperature: float = knob(2.0, "softmax temperature of both models in the KL term", group=DISTILL,
                                      metavar="T")

    @property
    def distill(self) -> bool:
        return self.teacher_adapter is not None or self.teacher_model is not None

    @property
    def learning_rate(self) -> float:
        return self.lr or DEFAULT_LR[self.method]

    @property
    def target_modules(self) -> tuple[str, ...]:
        return self.targets or DEFAULT_TARGETS.get(self.method, ())

    def adapter_shape(self) -> dict:
        """The fields that fix the adapter's tensors: a checkpoint is only resumable when these agree."""
        keys = {"lora": ("rank", "alpha", "rslora", "targets"), "dora": ("rank", "alpha", "rslora", "targets"),
                "ia3": ("targets",),
                "bottleneck": ("bottleneck_size", "activation", "placement"),
                "prefix": ("virtual_tokens", "prefix_projection", "prefix_hidden"),
                "prompt": ("virtual_tokens",)}[self.method]
        shape = {"method": self.method, "task": self.task, "labels": list(self.labels)}
        shape.update({k: _jsonable(getattr(self, k if k != "targets" else "target_modules")) for k in keys})
        return shape

    def to_json(self) -> dict:
        return {k: _jsonable(v) for k, v in asdict(self).items()}

    def check(self) -> None:
        """Flag combinations that can never work; raises TrainError."""
        if self.method not in METHODS:
            raise TrainError(f"unknown --method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.task not in TASKS:
            raise TrainError(f"unknown --task {self.task!r}; choose one of {', '.join(TASKS)}")
        if self.chat and self.task != "lm":
            raise TrainError("--chat is for --task lm (the prompt becomes a user message, the completion the reply)")
        if not self.data:
            raise TrainError("no training data: pass --data FILE[:WEIGHT] at least once")
        for src in self.data:
            if not src.weight > 0:
                raise TrainError(f"--data {src.path}: weight must be > 0, got {src.weight}")
        bad = [t for t in self.targets if t not in LINEAR_MODULES]
        if bad:
            raise TrainError(f"--targets: unknown module(s) {', '.join(bad)}; known: {', '.join(LINEAR_MODULES)}")
        bad = [p for p in self.placement if p not in ("attn", "mlp")]
        if bad or not self.placement:
            raise TrainError("--placement must list attn and/or mlp")
        for name in ("rank", "bottleneck_size", "virtual_tokens", "batch_size", "grad_accum", "max_length",
                     "epochs"):
            if getattr(self, name) < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise TrainError("--dropout must be in [0, 1)")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise TrainError("--eval-fraction must be in [0, 1)")
        if not 0.0 <= self.distill_alpha <= 1.0 or self.distill_temperature <= 0:
            raise TrainError("--distill-alpha must be in [0, 1] and --distill-temperature > 0")
        if self.batch_size < self.grad_accum:
            raise TrainError(f"--batch-size {self.batch_size} is smaller than --grad-accum {self.grad_accum}: "
                             "--batch-size is the global batch per optimizer step")


def _jsonable(v: object) -> object:
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, DataSource):
        return {"path": str(v.path), "weight": v.weight}
    return v
