"""Python client for lorafleet. Needs only grpcio and protobuf.

    from client import LoraFleetClient
    with LoraFleetClient("127.0.0.1:50051") as c:
        print(c.generate("Hello", max_new_tokens=16).text)
"""
from client.aio import AsyncLoraFleetClient
from client.api import GenerateResult, LoraFleetClient, StreamPiece
from client.common import Choice, TokenLogprob

__all__ = ["LoraFleetClient", "AsyncLoraFleetClient", "GenerateResult", "StreamPiece", "Choice", "TokenLogprob"]
