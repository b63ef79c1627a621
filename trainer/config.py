"""One frozen dataclass for every training knob, and the one error type users see.

Built by `trainer.cli` from flags; every other trainer module reads it and nothing else.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

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


@dataclass(frozen=True)
class TrainConfig:
    method: str
    task: str
    data: tuple[DataSource, ...]
    out: Path
    base: Path
    eval_path: Path | None = None
    eval_fraction: float = 0.1  # held out from each --data file when there is no --eval
    labels: tuple[str, ...] = ()  # cls: fixed label order; empty = sorted labels of the training data
    chat: bool = False  # lm: prompts rendered as one user message by the base model's chat template
    # LoRA / DoRA (LoRA plus a learned magnitude per output row) / IA3
    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False
    dropout: float = 0.0
    targets: tuple[str, ...] = ()  # empty = DEFAULT_TARGETS[method]
    # bottleneck
    bottleneck_size: int = 16
    activation: str = "relu"
    placement: tuple[str, ...] = ("attn", "mlp")
    # prefix / prompt tuning
    virtual_tokens: int = 8
    prefix_projection: bool = False
    prefix_hidden: int = 0  # width of the reparameterisation MLP; 0 = the model's hidden size
    prompt_init_text: str | None = None
    # loop
    epochs: int = 1
    max_steps: int = 0  # > 0 overrides epochs
    batch_size: int = 16  # global examples per optimizer step, over all ranks and accumulation
    grad_accum: int = 1
    lr: float = 0.0  # 0 = DEFAULT_LR[method]
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    eval_every: int = 0  # 0 = five evaluations per run (and one at the end)
    early_stopping_patience: int = 0  # evaluations without improvement; 0 = off
    checkpoint_every: int = 0  # 0 = at every evaluation
    keep_checkpoints: int = 2
    seed: int = 0
    max_length: int = 256
    resume: str | None = None  # "latest" or a checkpoint directory
    # distillation
    teacher_adapter: Path | None = None
    teacher_model: Path | None = None
    distill_alpha: float = 0.5
    distill_temperature: float = 2.0
    # runtime
    metrics_log: Path | None = None  # None = OUT/metrics.jsonl
    device: str = "auto"
    threads: int = 0
    quiet: bool = False

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
