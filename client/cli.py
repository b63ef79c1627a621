"""`lorafleet`: the command line for a lorafleet server."""
from __future__ import annotations

import argparse
import sys

import grpc
from google.protobuf import json_format

from client.api import LoraFleetClient


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorafleet", description="Talk to a lorafleet server.")
    p.add_argument("--server", default="127.0.0.1:50051", help="host:port of the server")
    p.add_argument("--api-key", default=None, help="API key (sent as 'authorization: Bearer KEY')")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before the call is abandoned")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a completion",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g.add_argument("--prompt", required=True, help="the prompt text")
    g.add_argument("--adapter", default="", help="adapter name or name@version; empty = base model")
    g.add_argument("--max-new-tokens", type=int, default=0, help="0 = the server's default")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling; 0 = off")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--seed", type=int, default=0, help="0 = the server picks one")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--repetition-penalty", type=float, default=0.0, help="0 or 1 = off")
    g.add_argument("--stream", action="store_true", help="print text as it is generated")
    sub.add_parser("info", help="show the served model and the server's limits")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with LoraFleetClient(args.server, api_key=args.api_key, timeout=args.timeout) as c:
        try:
            if args.command == "info":
                print(json_format.MessageToJson(c.server_info(), preserving_proto_field_name=True))
                return 0
            kw = dict(adapter=args.adapter, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop,
                      repetition_penalty=args.repetition_penalty)
            if args.stream:
                for piece in c.generate_stream(args.prompt, **kw):
                    sys.stdout.write(piece.text)
                    sys.stdout.flush()
                    if piece.finish_reason:
                        print(f"\n[finish: {piece.finish_reason}]", file=sys.stderr)
                return 0
            r = c.generate(args.prompt, **kw)
            print(r.text)
            print(f"[finish: {r.finish_reason}; prompt {r.prompt_tokens} tokens, "
                  f"completion {r.completion_tokens} tokens]", file=sys.stderr)
            return 0
        except grpc.RpcError as e:
            print(f"lorafleet: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
