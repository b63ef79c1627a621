"""Proto <-> domain for the gRPC servicers: a `pb.GenerateRequest` becomes the domain
`GenerationRequest` (its adapter reference parsed once, in the caller's namespace), and domain enums
and results become their proto spelling. Nothing here validates: `requests.validate` does, once."""
from __future__ import annotations

from lorafleet.v1 import lorafleet_pb2 as pb
from server.adapters.weights import AdapterKind
from server.adapters.refs import parse_tenant_ref
from server.api.requests import GenerationRequest, Sampling
from server.engine.sequence import FinishEvent, FinishReason
from server.errors import InvalidField


def generation_request(r: pb.GenerateRequest, tenant: str) -> GenerationRequest:
    p = r.params
    return GenerationRequest(
        sampling=Sampling(max_new_tokens=p.max_new_tokens, temperature=p.temperature, top_p=p.top_p,
                          top_k=p.top_k, seed=p.seed, stop=tuple(p.stop), repetition_penalty=p.repetition_penalty,
                          ignore_eos=p.ignore_eos),
        prompt=r.prompt, messages=tuple((m.role, m.content) for m in r.messages),
        adapter=parse_tenant_ref(tenant, r.adapter) if r.adapter else None, request_id=r.request_id)


def adapter_kind(value: int) -> AdapterKind | None:
    """UploadMetadata.kind -> the expected kind (None: unspecified, any kind)."""
    if value == pb.ADAPTER_KIND_UNSPECIFIED:
        return None
    name = pb.AdapterKind.Name(value) if value in pb.AdapterKind.values() else ""
    kind = AdapterKind.__members__.get(name.removeprefix("ADAPTER_KIND_"))
    if kind is None:
        raise InvalidField("metadata.kind", f"metadata.kind={value} is not an adapter kind this server knows "
                           f"({', '.join(k.value for k in AdapterKind)})")
    return kind


def kind_to_pb(kind: AdapterKind) -> int:
    return pb.AdapterKind.Value("ADAPTER_KIND_" + kind.value)


def finish_to_pb(reason: FinishReason) -> int:
    return pb.FinishReason.Value("FINISH_REASON_" + reason.name)


def usage(ev: FinishEvent) -> pb.Usage:
    return pb.Usage(prompt_tokens=ev.prompt_tokens, completion_tokens=ev.completion_tokens,
                    virtual_tokens=ev.virtual_tokens)
