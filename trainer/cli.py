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
import types
import typing
from pathlib import Path

from trainer.config import LORA, DataSource, TrainConfig, TrainError

DEFAULT_MODELS = Path.home() / ".cache" / "lorafleet" / "models"
EPILOG = """\
data formats (JSONL, one object per line):
  --task lm   {"prompt": "...", "completion": "..."}  (loss on the completion + EOS only)  or  {"text": "..."}
  --task cls  {"text": "...", "label": "..."}          (label names are stored in the exported config)
  --chat      {"prompt": "...", "completion": "..."}  the prompt is sent as one user message through the base
              model's chat template (as `lorafleet chat` does); the completion is the reply, ended by end-of-turn
distributed: torchrun --nproc_per_node N -m trainer ...  (same flags; --batch-size stays the global batch)
"""


_data_source = DataSource.parse
GROUP_HELP = {LORA: "DoRA takes the LoRA options and learns a magnitude per output row"}
METAVARS = {int: "N", float: "X"}


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _flag_type(hint: object) -> object:
    """The argparse `type` of a TrainConfig field's type: X | None -> X; tuple[str, ...] -> comma list."""
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return _csv if typing.get_origin(hint) is tuple else hint


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (its knob: help, default, choices, group, flag settings), then the
    upload flags, which are the CLI's own."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        meta = dict(f.metadata)
        title, flag, choices = meta.pop("group"), meta.pop("flag"), meta.pop("choices")
        if title not in groups:
            groups[title] = p.add_argument_group(title, GROUP_HELP.get(title))
        required = f.default is dataclasses.MISSING
        kw: dict = {"dest": f.name, "required": required, "default": None if required else f.default}
        if hints[f.name] is bool:
            kw["action"] = "store_true"
        else:
            kw["type"] = _flag_type(hints[f.name])
            if choices:
                kw["choices"] = choices
            elif kw["type"] in METAVARS:
                kw["metavar"] = METAVARS[kw["type"]]
        kw.update(meta)                  # the knob's own settings win: help, metavar, action, nargs, required
        groups[title].add_argument(flag or "--" + f.name.replace("_", "-"), **kw)
    g = p.add_argument_group("upload after export")
    g.add_argument("--upload", action="store_true", help="upload the exported adapter to a server")
    g.add_argument("--name", help="adapter name on the server")
    g.add_argument("--server", default="localhost:50051", metavar="HOST:PORT",
                   help="server for --upload (default localhost:50051)")
    g.add_argument("--api-key", default=os.environ.get("LORAFLEET_API_KEY"), metavar="KEY",
                   help="API key (default $LORAFLEET_API_KEY)")


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
    values = {f.name: getattr(a, f.name) for f in dataclasses.fields(TrainConfig)}
    values["data"] = tuple(values["data"])                 # appended to a list, one per --data
    if values["base"] is None:
        from server.model.default import resolve_model
        values["base"] = resolve_model(None, DEFAULT_MODELS)   # SmolLM2-135M-Instruct, as the server serves
    return TrainConfig(**values)


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
