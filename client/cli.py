"""`lorafleet`: the command line for a lorafleet server. Imports only grpcio, protobuf and the
wire contract; `lorafleet train` hands over to the trainer in its own process (torch lives there)."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

import grpc
from google.protobuf import json_format

from client.api import LoraFleetClient
from client.common import KIND_NAMES, human_bytes, looks_like_http_port

DEFAULT_SERVER = "127.0.0.1:50051"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorafleet", description="Talk to a lorafleet server; train adapters "
                                "(`lorafleet train --help`). API keys: `lorafleet-server keys create`.")
    p.add_argument("--server", default=os.environ.get("LORAFLEET_SERVER", DEFAULT_SERVER),
                   help="host:port of the server (env LORAFLEET_SERVER)")
    p.add_argument("--api-key", default=os.environ.get("LORAFLEET_API_KEY"),
                   help="API key, sent as 'authorization: Bearer KEY' (env LORAFLEET_API_KEY)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before a call is abandoned")
    p.add_argument("--retries", type=int, default=2, help="retries on UNAVAILABLE / RESOURCE_EXHAUSTED")
    p.add_argument("--tls-ca", type=Path, default=None, help="PEM root certificate: connect with TLS")
    p.add_argument("--tls-cert", type=Path, default=None, help="PEM client certificate (mutual TLS)")
    p.add_argument("--tls-key", type=Path, default=None, help="PEM key of --tls-cert")
    sub = p.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    g = sub.add_parser("generate", help="generate a completion", formatter_class=fmt)
    g.add_argument("--prompt", required=True, help="the prompt text")
    g.add_argument("--adapter", default="", help="adapter name, name@version or shared/name; empty = base model")
    g.add_argument("--max-new-tokens", type=int, default=0, help="0 = the server's default")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling; 0 = off")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--seed", type=int, default=None, help="left out = the server picks one (0 is a seed)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--repetition-penalty", type=float, default=0.0, help="0 or 1 = off")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="-2..2, on generated tokens; 0 = off")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="-2..2, on generated tokens; 0 = off")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top one's probability")
    g.add_argument("--min-tokens", type=int, default=0, help="no end of sequence before this many tokens")
    g.add_argument("--logit-bias", action="append", default=[], metavar="TOKEN_ID=BIAS",
                   help="add BIAS (-100..100) to a token's logit (repeatable)")
    g.add_argument("--logprobs", type=int, default=None, metavar="K",
                   help="print each token's logprob and the K most likely tokens at its position")
    g.add_argument("-n", type=int, default=1, help="completions to generate (seeded: seed, seed+1, ...)")
    g.add_argument("--stream", action="store_true", help="print text as it is generated (with -n 1)")
    ch = sub.add_parser("chat", help="chat with the model (interactive; --message for one turn in scripts)",
                        formatter_class=fmt)
    ch.add_argument("--message", action="append", default=[],
                    help="send this user message, print the reply and exit (repeat for several turns of the"
                         " user side); without it: an interactive chat that keeps the conversation")
    ch.add_argument("--system", default="", help="a system message put first")
    ch.add_argument("--adapter", default="", help="adapter name, name@version or shared/name; empty = base model")
    ch.add_argument("--max-new-tokens", type=int, default=0, help="0 = the server's default")
    ch.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ch.add_argument("--seed", type=int, default=None, help="left out = the server picks one (0 is a seed)")
    c = sub.add_parser("classify", help="classify texts with an adapter that has a classification head")
    c.add_argument("--adapter", required=True, help="adapter name (must carry a head)")
    c.add_argument("texts", nargs="+", help="texts to classify")
    u = sub.add_parser("upload", help="upload an adapter directory (PEFT or lorafleet bottleneck format)")
    u.add_argument("directory", type=Path, help="holds adapter_config.json and adapter_model.safetensors")
    u.add_argument("--name", required=True, help="adapter name: [a-z0-9][a-z0-9._-]{0,63}")
    u.add_argument("--shared", action="store_true", help="admins: publish as shared/NAME for every tenant")
    a = sub.add_parser("adapters", help="list, inspect or delete adapters")
    asub = a.add_subparsers(dest="action", required=True)
    asub.add_parser("list", help="your adapters and the shared ones")
    ag = asub.add_parser("get", help="details of one adapter")
    ag.add_argument("name")
    ad = asub.add_parser("delete", help="delete every version of an adapter")
    ad.add_argument("name")
    sub.add_parser("info", help="show the served model and the server's limits")
    sub.add_parser("train", help="train an adapter (see `lorafleet train --help`)", add_help=False)
    return p


class _Progress:
    """`LABEL:  42% of 256.0 MiB` rewritten in place on stderr when it is a terminal; nothing
    otherwise (scripts, logs). The client package needs only grpcio and protobuf, so no tqdm."""

    def __init__(self, label: str, stream=sys.stderr):
        self.label, self.stream, self.shown = label, stream, -1
        self.on = hasattr(stream, "isatty") and stream.isatty()

    def __call__(self, done: int, total: int) -> None:
        pct = 100 * done // max(total, 1)
        if self.on and pct != self.shown:
            self.shown = pct
            tail = "; the server is checking it ..." if done >= total else ""
            self.stream.write(f"\r{self.label}: {pct:3d}% of {human_bytes(total)}{tail}")
            self.stream.flush()

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.on and self.shown >= 0:
            self.stream.write("\n")
            self.stream.flush()


def _rpc_error_line(e: grpc.RpcError, server: str) -> str:
    if looks_like_http_port(e):
        return (f"lorafleet: {server} answered in HTTP/1.x: this looks like the HTTP port (the OpenAI-compatible "
                f"door); the gRPC port is {DEFAULT_SERVER.rsplit(':', 1)[1]} by default (--server HOST:PORT or "
                f"LORAFLEET_SERVER)")
    return f"lorafleet: {e.code().name}: {e.details()}"


def _show(msg) -> None:
    print(json_format.MessageToJson(msg, preserving_proto_field_name=True))


def _logit_bias(pairs: list[str]) -> dict[int, float]:
    out = {}
    for pair in pairs:
        token, sep, bias = pair.partition("=")
        try:
            out[int(token)] = float(bias)
        except ValueError:
            raise ValueError(f"--logit-bias {pair!r}: expected TOKEN_ID=BIAS, e.g. 42=-100") from None
    return out


def _print_logprobs(logprobs) -> None:
    print("[logprobs: token, logprob, the most likely tokens]")
    for lp in logprobs:
        top = "  ".join(f"{t.token!r} {t.logprob:.3f}" for t in lp.top)
        print(f"  {lp.token!r:<16} {lp.logprob:9.4f}   {top}")


def _generate(c: LoraFleetClient, args) -> None:
    if args.stream and args.n > 1:
        raise ValueError("--stream prints one completion: use it with -n 1")
    kw = dict(adapter=args.adapter, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
              top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop,
              repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
              frequency_penalty=args.frequency_penalty, min_p=args.min_p, min_tokens=args.min_tokens,
              logit_bias=_logit_bias(args.logit_bias), logprobs=args.logprobs, n=args.n)
    if args.stream:
        logprobs = []
        for piece in c.generate_stream(args.prompt, **kw):
            sys.stdout.write(piece.text)
            sys.stdout.flush()
            logprobs.extend(piece.logprobs)
            if piece.finish_reason:
                print(f"\n[finish: {piece.finish_reason}]", file=sys.stderr)
        if args.logprobs is not None:
            _print_logprobs(logprobs)
        return
    r = c.generate(args.prompt, **kw)
    for choice in r.choices:
        if args.n > 1:
            print(f"[choice {choice.index}: finish {choice.finish_reason}]")
        print(choice.text)
        if args.logprobs is not None:
            _print_logprobs(choice.logprobs)
    print(f"[finish: {r.finish_reason}; prompt {r.prompt_tokens} tokens, completion {r.completion_tokens} tokens]",
          file=sys.stderr)


def _reply(c: LoraFleetClient, history: list[tuple[str, str]], args) -> str:
    """Stream one assistant reply to stdout; returns its text."""
    parts = []
    for piece in c.chat_stream(history, adapter=args.adapter, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, seed=args.seed):
        sys.stdout.write(piece.text)
        sys.stdout.flush()
        parts.append(piece.text)
    print()
    return "".join(parts)


def _chat(c: LoraFleetClient, args) -> None:
    history = [("system", args.system)] if args.system else []
    if args.message:
        for text in args.message:
            history.append(("user", text))
            history.append(("assistant", _reply(c, history, args)))
        return
    print("[chat: an empty line or Ctrl-D ends it]", file=sys.stderr)
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            print()
            return
        if not text:
            return
        history.append(("user", text))
        sys.stdout.write("assistant> ")
        history.append(("assistant", _reply(c, history, args)))


def _adapters(c: LoraFleetClient, args) -> None:
    if args.action == "list":
        for a in c.list_adapters():
            print(f"{a.name:<40} v{a.version:<4} {KIND_NAMES[a.kind]:<14} {a.size_bytes:>10} bytes  "
                  f"{a.resident_tier}")
    elif args.action == "get":
        _show(c.get_adapter(args.name))
    else:
        print("deleted versions:", " ".join(map(str, c.delete_adapter(args.name))))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        if importlib.util.find_spec("trainer") is None:
            print("lorafleet: the trainer is not installed here (pip install lorafleet, with torch)", file=sys.stderr)
            return 1
        os.execv(sys.executable, [sys.executable, "-m", "trainer", *argv[1:]])
    args = build_parser().parse_args(argv)
    with LoraFleetClient(args.server, api_key=args.api_key, timeout=args.timeout, retries=args.retries,
                         tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key) as c:
        try:
            if args.command == "info":
                _show(c.server_info())
            elif args.command == "generate":
                _generate(c, args)
            elif args.command == "chat":
                _chat(c, args)
            elif args.command == "classify":
                print(json.dumps(c.classify(args.texts, args.adapter), indent=2))
            elif args.command == "upload":
                with _Progress(f"uploading {args.name}") as progress:
                    info = c.upload_adapter(args.directory, args.name, shared=args.shared, progress=progress)
                print(f"uploaded {info.name} version {info.version} ({KIND_NAMES[info.kind]}, "
                      f"{info.size_bytes} bytes, sha256 {info.sha256[:12]}...)")
            elif args.command == "adapters":
                _adapters(c, args)
            return 0
        except grpc.RpcError as e:
            print(_rpc_error_line(e, args.server), file=sys.stderr)
            return 1
        except (OSError, ValueError) as e:
            print(f"lorafleet: {e}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
