"""LoraFleetClient: a thin, typed wrapper over the generated stubs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import grpc

from client.pb.lorafleet.v1 import lorafleet_pb2 as pb
from client.pb.lorafleet.v1 import lorafleet_pb2_grpc as pb_grpc

FINISH_NAMES = {v: k.removeprefix("FINISH_REASON_").lower() for k, v in pb.FinishReason.items()}


@dataclass(frozen=True)
class GenerateResult:
    text: str
    token_ids: list[int]
    finish_reason: str          # length | stop | eos | cancelled | error
    prompt_tokens: int
    completion_tokens: int
    request_id: str


@dataclass(frozen=True)
class StreamPiece:
    text: str
    token_ids: list[int]
    finish_reason: str | None   # set on the last piece only


class LoraFleetClient:
    def __init__(self, target: str, api_key: str | None = None, timeout: float | None = 120.0,
                 channel: grpc.Channel | None = None):
        self.channel = channel or grpc.insecure_channel(target)
        self.inference = pb_grpc.InferenceStub(self.channel)
        self.adapters = pb_grpc.AdaptersStub(self.channel)
        self.timeout = timeout
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def __enter__(self) -> "LoraFleetClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    @staticmethod
    def request(prompt: str, adapter: str = "", max_new_tokens: int = 0, temperature: float = 0.0,
                top_p: float = 0.0, top_k: int = 0, seed: int = 0, stop: list[str] | None = None,
                repetition_penalty: float = 0.0, ignore_eos: bool = False,
                request_id: str = "") -> pb.GenerateRequest:
        return pb.GenerateRequest(
            prompt=prompt, adapter=adapter, request_id=request_id,
            params=pb.SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                     top_k=top_k, seed=seed, stop=stop or [],
                                     repetition_penalty=repetition_penalty, ignore_eos=ignore_eos))

    def generate(self, prompt: str, **kw) -> GenerateResult:
        timeout = kw.pop("timeout", self.timeout)
        r = self.inference.Generate(self.request(prompt, **kw), timeout=timeout, metadata=self.metadata)
        return GenerateResult(r.text, list(r.token_ids), FINISH_NAMES[r.finish_reason],
                              r.usage.prompt_tokens, r.usage.completion_tokens, r.request_id)

    def generate_stream(self, prompt: str, **kw) -> Iterator[StreamPiece]:
        timeout = kw.pop("timeout", self.timeout)
        for m in self.inference.GenerateStream(self.request(prompt, **kw), timeout=timeout,
                                               metadata=self.metadata):
            fin = FINISH_NAMES[m.finish_reason] if m.finish_reason else None
            yield StreamPiece(m.text, list(m.token_ids), fin)

    def server_info(self) -> pb.ServerInfo:
        return self.inference.GetServerInfo(pb.GetServerInfoRequest(), timeout=self.timeout,
                                            metadata=self.metadata)
