"""Training data: JSONL files -> tokenized examples -> deterministic global batches -> padded tensors.

Formats (one JSON object per line; blank lines are skipped):
  lm   {"prompt": str, "completion": str}   loss on the completion (and the EOS after it) only
       {"text": str}                        loss on every token
  cls  {"text": str, "label": str | int}

Tokenization is the server's: `tokenizers.Tokenizer.encode(prompt)` (BOS from the tokenizer's
post-processor), the completion encoded without special tokens, then EOS. With --chat (lm only) the
prompt is one user message rendered by the base model's chat template, encoded as the server encodes
a chat request (no special tokens added; special-token characters in the prompt or the completion
are text, never control tokens), and the completion ends with the template's end-of-turn token.

A step's global batch is a pure function of (seed, step) and the files, the same on every rank;
rank r takes items r, r + world, ... of it and splits its share into --grad-accum micro-batches.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from server.model.chat import ChatTemplate, ChatTemplateError, encode_text, load_chat_template
from trainer.config import TrainConfig, TrainError

IGNORE = -100  # label of a position that is not a target


@dataclass(frozen=True)
class Example:
    input_ids: list[int]  # [T]
    labels: list[int]  # [T] lm: target id at t (predicted from t-1) or IGNORE; cls: []
    label: int  # cls: class index; lm: -1
    where: str  # "file:line"


@dataclass(frozen=True)
class Tokens:
    """What the data needs from the base model's tokenizer directory."""

    tokenizer: Tokenizer
    eos_id: int
    pad_id: int

    @staticmethod
    def load(model_dir: Path, model_config: dict) -> "Tokens":
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise TrainError(f"{model_dir}: no tokenizer.json (the trainer reads the same tokenizer as the server)")
        eos = model_config.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) else eos
        if eos is None:
            raise TrainError(f"{model_dir}/config.json has no eos_token_id")
        pad = model_config.get("pad_token_id")
        return Tokens(Tokenizer.from_file(str(path)), int(eos), int(eos if pad is None else pad))


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [B, T] right-padded
    attention_mask: torch.Tensor  # [B, T] 1 = real token
    labels: torch.Tensor  # lm: [B, T] (IGNORE on prompt and padding); cls: [B]

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


@dataclass(frozen=True)
class ChatPrompt:
    """--chat: how a prompt becomes the assistant turn's context, as the server's chat call renders it."""

    template: ChatTemplate
    end_id: int  # the token that ends the assistant's turn (trained after the completion)

    @staticmethod
    def load(model_dir: Path, tok: Tokens) -> "ChatPrompt":
        template = load_chat_template(Path(model_dir), tok.tokenizer)
        if template is None:
            raise TrainError(f"--chat: {model_dir} has no chat template (no chat_template in tokenizer_config.json "
                             "or chat_template.jinja); train on plain prompts without --chat")
        ends = template.end_of_turn_ids
        return ChatPrompt(template, tok.eos_id if tok.eos_id in ends or not ends else min(ends))

    def prompt_ids(self, tok: Tokens, prompt: str, where: str) -> list[int]:
        """The prompt as the server encodes a chat request: its text is text (special-token
        characters in it stay ordinary tokens)."""
        try:
            return self.template.encode([("user", prompt)], tok.tokenizer)
        except ChatTemplateError as e:
            raise TrainError(f"{where}: {e}") from None


def read_jsonl(path: Path) -> list[tuple[str, dict]]:
    """[(where, object)] for every non-blank line; TrainError naming file:line on anything else."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TrainError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TrainError(f"{path}: cannot read as UTF-8 text ({e})") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrainError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise TrainError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        rows.append((where, obj))
    if not rows:
        raise TrainError(f"{path}: no examples (the file is empty)")
    return rows


def _string(obj: dict, key: str, where: str) -> str:
    v = obj[key]
    if not isinstance(v, str):
        raise TrainError(f"{where}: \"{key}\" must be a string, got {type(v).__name__}")
    return v


def encode_lm(obj: dict, tok: Tokens, max_length: int, where: str, chat: ChatPrompt | None = None) -> Example:
    if "prompt" in obj and "completion" in obj:
        text = _string(obj, "prompt", where)
        prompt = chat.prompt_ids(tok, text, where) if chat else tok.tokenizer.encode(text).ids
        reply = _string(obj, "completion", where)
        completion = (encode_text(tok.tokenizer, reply) if chat else       # --chat: the reply is text
                      tok.tokenizer.encode(reply, add_special_tokens=False).ids)
        end = chat.end_id if chat else tok.eos_id
        ids = prompt + completion + [end]
        labels = [IGNORE] * len(prompt) + completion + [end]
    elif "text" in obj and chat is not None:
        raise TrainError(f"{where}: --chat trains on {{\"prompt\", \"completion\"}} examples; got a \"text\" one")
    elif "text" in obj:
        ids = tok.tokenizer.encode(_string(obj, "text", where)).ids + [tok.eos_id]
        labels = [IGNORE] + ids[1:]  # the first token is never predicted
    else:
        raise TrainError(f"{where}: an lm example needs \"prompt\" and \"completion\", or \"text\"; "
                         f"got keys {sorted(obj)}")
    return Example(ids[:max_length], labels[:max_length], -1, where)


def label_key(v: object, where: str) -> str:
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise TrainError(f"{where}: \"label\" must be a string or an integer, got {json.dumps(v)[:40]}")
    return str(v)


def collect_labels(rows: list[tuple[str, dict]]) -> tuple[str, ...]:
    """The label names of the training rows, sorted (numerically when all are integers)."""
    names = set()
    for where, obj in rows:
        if "label" not in obj:
            raise TrainError(f"{where}: a cls example needs \"text\" and \"label\"; got keys {sorted(obj)}")
        names.add(label_key(obj["label"], where))
    numeric = all(n.lstrip("-").isdigit() for n in names)
    return tuple(sorted(names, key=(lambda n: (int(n), n)) if numeric else None))


def encode_cls(obj: dict, tok: Tokens, max_length: int, where: str, labels: tuple[str, ...]) -> Example:
    if "text" not in obj or "label" not in obj:
        raise TrainError(f"{where}: a cls example needs \"text\" and \"label\"; got keys {sorted(obj)}")
    name = label_key(obj["label"], where)
    if name not in labels:
        shown = ", ".join(labels[:20]) + (" ..." if len(labels) > 20 else "")
        raise TrainError(f"{where}: unknown label {name!r}; the labels are: {shown}")
    ids = tok.tokenizer.encode(_string(obj, "text", where)).ids[:max_length]
    return Example(ids, [], labels.index(name), where)


def encode_rows(rows: list[tuple[str, dict]], cfg: TrainConfig, tok: Tokens,
                labels: tuple[str, ...], chat: ChatPrompt | None = None) -> list[Example]:
    out = []
    for where, obj in rows:
        if cfg.task == "lm":
            ex = encode_lm(obj, tok, cfg.max_length, where, chat)
            if all(x == IGNORE for x in ex.labels[1:]):
                raise TrainError(f"{where}: no completion token is left within --max-length {cfg.max_length}")
        else:
            ex = encode_cls(obj, tok, cfg.max_length, where, labels)
        out.append(ex)
    return out


@dataclass(frozen=True)
class Datasets:
    train: list[list[Example]]  # one list per --data file
    weights: list[float]  # per --data file
    eval: list[Example]
    labels: tuple[str, ...]  # cls label names, index = class id; () for lm


def split_off(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): a seeded shuffle, the last ceil(fraction * n) rows held out (at least one row kept)."""
    if fraction <= 0 or len(rows) < 2:
        return rows, []
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(rows), generator=g).tolist()
    n_eval = min(len(rows) - 1, math.ceil(fraction * len(rows)))
    return [rows[i] for i in order[:-n_eval]], [rows[i] for i in order[-n_eval:]]


def load_datasets(cfg: TrainConfig, tok: Tokens) -> Datasets:
    raw = [read_jsonl(src.path) for src in cfg.data]
    eval_rows: list[tuple[str, dict]] = []
    if cfg.eval_path is not None:
        eval_rows = read_jsonl(cfg.eval_path)
    else:
        split = [split_off(rows, cfg.eval_fraction, cfg.seed + i) for i, rows in enumerate(raw)]
        raw = [t for t, _ in split]
        eval_rows = [r for _, e in split for r in e]
    labels: tuple[str, ...] = ()
    if cfg.task == "cls":
        labels = cfg.labels or collect_labels([r for rows in raw for r in rows])
        if len(labels) < 2:
            raise TrainError(f"classification needs at least two labels; the training data has {list(labels)}")
    chat = ChatPrompt.load(cfg.base, tok) if cfg.chat else None
    train = [encode_rows(rows, cfg, tok, labels, chat) for rows in raw]
    return Datasets(train, [s.weight for s in cfg.data], encode_rows(eval_rows, cfg, tok, labels, chat), labels)


class BatchPlan:
    """Deterministic global batches: (dataset index, example index) pairs for each optimizer step.

    One dataset: a fresh seeded permutation per epoch. Several: each slot picks a dataset by weight
    (a generator seeded by seed and step), then takes the next example of that dataset's own
    permutation stream. Resuming replays `next_batch` (index arithmetic only).
    """

    def __init__(self, sizes: list[int], weights: list[float], batch_size: int, seed: int):
        self.sizes, self.batch_size, self.seed = sizes, batch_size, seed
        self.weights = torch.tensor(weights, dtype=torch.float64)
        self.cursor = [0] * len(sizes)  # examples consumed from each dataset's stream
        self.step = 0
        self._perms: dict[tuple[int, int], list[int]] = {}

    def _example(self, d: int) -> int:
        epoch, pos = divmod(self.cursor[d], self.sizes[d])
        key = (d, epoch)
        if key not in self._perms:
            self._perms = {k: v for k, v in self._perms.items() if k[0] != d}  # keep one epoch per dataset
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + d * 10_007 + epoch)
            self._perms[key] = torch.randperm(self.sizes[d], generator=g).tolist()
        self.cursor[d] += 1
        return self._perms[key][pos]

    def next_batch(self) -> list[tuple[int, int]]:
        if len(self.sizes) == 1:
            picks = [0] * self.batch_size
        else:
            g = torch.Generator().manual_seed(self.seed * 7_919 + self.step)
            picks = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=g).tolist()
        self.step += 1
        return [(d, self._example(d)) for d in picks]


def shard(items: list, rank: int, world: int, micro_batches: int) -> list[list]:
    """This rank's share (items rank::world) split into `micro_batches` near-equal, non-empty chunks."""
    mine = items[rank::world]
    if len(mine) < micro_batches:
        raise TrainError(f"a global batch of {len(items)} cannot give {world} rank(s) x {micro_batches} "
                         "micro-batches at least one example each; raise --batch-size")
    q, r = divmod(len(mine), micro_batches)
    bounds = [i * q + min(i, r) for i in range(micro_batches + 1)]
    return [mine[bounds[i]:bounds[i + 1]] for i in range(micro_batches)]


def collate(examples: list[Example], task: str, pad_id: int) -> Batch:
    """Right-pad to the longest example."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        if task == "lm":
            labels[i, :n] = torch.tensor(e.labels)
    if task == "cls":
        labels = torch.tensor([e.label for e in examples], dtype=torch.long)
    return Batch(ids, mask, labels)


def count_targets(examples: list[Example], task: str) -> int:
    """Loss terms the examples contribute: lm target tokens (never position 0) or cls examples."""
    if task == "cls":
        return len(examples)
    return sum(sum(1 for x in e.labels[1:] if x != IGNORE) for e in examples)
