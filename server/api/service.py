"""The Inference servicer: translates between proto and domain types (`convert`); the one
generation path (`Generation`) and the engine do the work. The caller was authenticated once, by
the interceptor (`caller()`)."""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import AsyncIterator

from lorafleet.v1 import lorafleet_pb2 as pb
from lorafleet.v1 import lorafleet_pb2_grpc as pb_grpc
from server import kernels
from server.adapters.weights import AdapterKind
from server.adapters.refs import parse_tenant_ref
from server.api import convert, requests
from server.api.auth import caller
from server.api.common import streaming, unary
from server.api.generation import Generation
from server.config import ServerConfig
from server.engine.engine import Engine
from server.engine.sampling import SamplingParams
from server.engine.sequence import Event, FinishEvent, Sequence
from server.errors import InvalidArgument

VERSION = "0.1.0"


def _deadline(context) -> float | None:
    remaining = context.time_remaining()
    return time.monotonic() + remaining if remaining is not None else None


class InferenceService(pb_grpc.InferenceServicer):
    def __init__(self, cfg: ServerConfig, engine: Engine, generation: Generation):
        self.cfg, self.engine, self.gen = cfg, engine, generation
        self.draining, self.limiter = generation.draining, generation.limiter
        self.tokenizer = engine.loaded.tokenizer
        self.kernels = kernels.backend_name(engine.model.device)
        self.chat = engine.loaded.chat

    def _submit(self, request: pb.GenerateRequest, context) -> tuple[Sequence, asyncio.Queue]:
        principal = caller()
        return self.gen.submit(principal, convert.generation_request(request, principal.tenant), _deadline(context))

    def _events(self, seq: Sequence, events: asyncio.Queue) -> AsyncIterator[Event]:
        return self.gen.events(seq, events, "grpc")

    @unary("Generate")
    async def Generate(self, request, context):
        seq, events = self._submit(request, context)
        text, ids = [], []
        async for ev in self._events(seq, events):
            text.append(ev.text)
            ids.extend(ev.token_ids)
        return pb.GenerateResponse(text="".join(text), token_ids=ids,
                                   finish_reason=convert.finish_to_pb(ev.reason), usage=convert.usage(ev),
                                   request_id=seq.request_id)

    @streaming("GenerateStream")
    async def GenerateStream(self, request, context):
        seq, events = self._submit(request, context)
        async for ev in self._events(seq, events):
            msg = pb.GenerateStreamResponse(text=ev.text, token_ids=ev.token_ids, request_id=seq.request_id)
            if isinstance(ev, FinishEvent):
                msg.finish_reason = convert.finish_to_pb(ev.reason)
                msg.usage.CopyFrom(convert.usage(ev))
            yield msg

    @unary("Classify")
    async def Classify(self, request, context):
        self.draining.check()
        principal = caller()
        rid = requests.request_id(request.request_id) or uuid.uuid4().hex
        if not request.adapter:
            raise InvalidArgument("Classify needs an adapter that carries a classification head")
        adapter = parse_tenant_ref(principal.tenant, request.adapter)
        if not request.texts or len(request.texts) > self.cfg.max_classify_batch:
            raise InvalidArgument(f"texts must hold 1..{self.cfg.max_classify_batch} strings "
                                  f"(got {len(request.texts)})")
        texts_ids = [requests.prompt_ids(t, self.tokenizer, self.cfg, 0, field=f"texts[{i}]")
                     for i, t in enumerate(request.texts)]
        self.limiter.check(principal, len(texts_ids))
        params = SamplingParams(max_new_tokens=0)
        subs: list[tuple[Sequence, asyncio.Queue]] = []
        try:
            for ids in texts_ids:
                subs.append(self.gen.submit_one(principal, adapter, ids, params, rid, _deadline(context),
                                                classify=True))
            results = []
            for seq, events in subs:
                async for ev in self._events(seq, events):
                    pass
                scores = [pb.LabelScore(label=lbl, probability=p) for lbl, p in zip(ev.labels, ev.probabilities)]
                top = max(scores, key=lambda s: s.probability).label
                results.append(pb.Classification(scores=scores, top_label=top, prompt_tokens=ev.prompt_tokens))
        finally:   # a failure or cancellation part-way must not leave the other texts running
            for seq, _ in subs:
                self.limiter.done(seq)
                seq.cancel()          # a no-op for the ones that finished
        return pb.ClassifyResponse(results=results, request_id=rid)

    @unary("GetServerInfo")
    async def GetServerInfo(self, request, context):
        a, c, kv = self.engine.model.shape, self.cfg, self.engine.kv
        return pb.ServerInfo(
            version=VERSION, model_name=self.engine.loaded.name,
            model_architecture=(self.engine.loaded.hf_config.get("architectures") or ["?"])[0],
            vocab_size=a.vocab_size, hidden_size=a.hidden_size, num_layers=a.num_layers,
            device=str(self.engine.model.device), dtype=str(self.engine.model.dtype).replace("torch.", ""),
            limits=pb.ServerLimits(
                max_prompt_tokens=c.max_prompt_tokens, max_new_tokens=c.max_new_tokens,
                max_context_tokens=c.max_context_tokens, max_stop_strings=c.max_stop_strings,
                max_stop_string_chars=c.max_stop_string_chars, max_classify_batch=c.max_classify_batch,
                max_message_bytes=c.max_message_bytes, max_queued_requests=c.max_queued_requests,
                max_batch_size=c.max_batch_size, max_adapter_rank=c.max_adapter_rank,
                max_adapter_bytes=c.max_adapter_bytes,
                kv_cache_bytes=kv.nbytes,
                kv_cache_tokens=kv.blocks.capacity * kv.block_size, kv_block_size=kv.block_size,
                prefix_cache=kv.blocks.prefix_cache),
            adapter_kinds=[k.value for k in AdapterKind], kernels=self.kernels, chat=self.chat is not None)
