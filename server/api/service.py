"""The Inference servicer: translates between proto and domain types (`convert`); the one
generation path (`Generation`) and the engine do the work. The caller was authenticated once, by
the interceptor (`caller()`)."""
from __future__ import annotations

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
from server.api.generation import Generation, Submission
from server.api.token_text import TokenText
from server.config import ServerConfig
from server.engine.engine import Engine
from server.engine.sampling import SamplingParams
from server.engine.sequence import Event, FinishEvent
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
        self.token_text = TokenText(self.tokenizer)

    async def _submit(self, request: pb.GenerateRequest, context) -> Submission:
        principal = caller()
        domain = convert.generation_request(request, principal.tenant, self.cfg.max_logit_bias)
        return await self.gen.submit(principal, domain, _deadline(context))

    def _events(self, sub: Submission) -> AsyncIterator[tuple[int, Event]]:
        return self.gen.events(sub, "grpc")

    @unary("Generate")
    async def Generate(self, request, context):
        """Choice 0 in the top-level fields; with n > 1 every choice in `choices` too."""
        sub = await self._submit(request, context)
        text = [[] for _ in sub.seqs]
        ids = [[] for _ in sub.seqs]
        lps = [[] for _ in sub.seqs]
        finals: list[FinishEvent | None] = [None] * len(sub.seqs)
        async for i, ev in self._events(sub):
            text[i].append(ev.text)
            ids[i].extend(ev.token_ids)
            lps[i].extend(ev.logprobs)
            if isinstance(ev, FinishEvent):
                finals[i] = ev
        choices = [pb.GenerateChoice(index=i, text="".join(text[i]), token_ids=ids[i],
                                     finish_reason=convert.finish_to_pb(finals[i].reason),
                                     logprobs=convert.logprobs_to_pb(lps[i], self.token_text),
                                     completion_tokens=finals[i].completion_tokens) for i in range(len(sub.seqs))]
        first = choices[0]
        return pb.GenerateResponse(
            text=first.text, token_ids=first.token_ids, finish_reason=first.finish_reason, logprobs=first.logprobs,
            usage=convert.usage(finals[0]) if len(finals) == 1 else convert.total_usage(finals, sub.n),
            request_id=sub.request_id, choices=choices if len(choices) > 1 else [])

    @streaming("GenerateStream")
    async def GenerateStream(self, request, context):
        """One message per new piece of text of any choice (`index`); each choice's last message
        carries its finish_reason and usage."""
        sub = await self._submit(request, context)
        async for i, ev in self._events(sub):
            msg = pb.GenerateStreamResponse(text=ev.text, token_ids=ev.token_ids, request_id=sub.request_id,
                                            logprobs=convert.logprobs_to_pb(ev.logprobs, self.token_text), index=i)
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
        subs: list[Submission] = []
        try:
            for ids in texts_ids:
                subs.append(self.gen.submit_one(principal, adapter, ids, params, rid, _deadline(context),
                                                classify=True))
            results = []
            for sub in subs:
                async for _, ev in self._events(sub):
                    pass
                scores = [pb.LabelScore(label=lbl, probability=p) for lbl, p in zip(ev.labels, ev.probabilities)]
                top = max(scores, key=lambda s: s.probability).label
                results.append(pb.Classification(scores=scores, top_label=top, prompt_tokens=ev.prompt_tokens))
        finally:   # a failure or cancellation part-way must not leave the other texts running
            for sub in subs:
                self.gen.close(sub)   # cancelling is a no-op for the ones that finished
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
                max_adapter_bytes=c.max_adapter_bytes, max_n=min(c.max_n, c.max_choices),
                max_top_logprobs=c.max_top_logprobs, max_logit_bias=c.max_logit_bias,
                kv_cache_bytes=kv.nbytes,
                kv_cache_tokens=kv.blocks.capacity * kv.block_size, kv_block_size=kv.block_size,
                prefix_cache=kv.blocks.prefix_cache, max_constraint_bytes=c.max_constraint_bytes),
            adapter_kinds=[k.value for k in AdapterKind], kernels=self.kernels, chat=self.chat is not None)
