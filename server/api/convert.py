"""Proto <-> domain for the gRPC servicers: a `pb.GenerateRequest` becomes the domain
`GenerationRequest` (its adapter reference parsed once, in the caller's namespace), and domain enums
and results become their proto spelling. Nothing here validates: `requests.validate` does, once."""
from __future__ import annotations

from lorafleet.v1 import lorafleet_pb2 as pb
from server.adapters.weights import AdapterKind
from server.adapters.refs import parse_tenant_ref
from server.api.requests import GenerationRequest, Sampling
from server.api.token_text import TokenText
from server.engine.constraints import Constraint
from server.engine.sampling import TokenLogprobs
from server.engine.sequence import FinishEvent, FinishReason
from server.errors import InvalidField


def generation_request(r: pb.GenerateRequest, tenant: str, max_logit_bias: int | None = None) -> GenerationRequest:
    """`max_logit_bias`: a larger logit_bias map is refused before its entries are copied
    (`requests.validate` checks every limit again)."""
    p = r.params
    if max_logit_bias is not None and len(p.logit_bias) > max_logit_bias:
        raise InvalidField("params.logit_bias", f"params.logit_bias holds {len(p.logit_bias)} entries; "
                                                f"at most {max_logit_bias}")
    return GenerationRequest(
        sampling=Sampling(max_new_tokens=p.max_new_tokens, temperature=p.temperature, top_p=p.top_p,
                          top_k=p.top_k, seed=p.seed if p.HasField("seed") else None, stop=tuple(p.stop),
                          repetition_penalty=p.repetition_penalty, ignore_eos=p.ignore_eos,
                          presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty, min_p=p.min_p,
                          min_tokens=p.min_tokens, logit_bias=tuple(p.logit_bias.items()),
                          logprobs=p.top_logprobs if p.logprobs else None, n=p.n),
        prompt=r.prompt, messages=tuple((m.role, m.content) for m in r.messages),
        adapter=parse_tenant_ref(tenant, r.adapter) if r.adapter else None, request_id=r.request_id,
        **_constraint(p))


def _constraint(p: pb.SamplingParams) -> dict:
    """SamplingParams' `constraint` oneof -> the domain request's constraint and its field name."""
    which = p.WhichOneof("constraint")
    if which is None or (which == "json_object" and not p.json_object):
        return {}
    text = "" if which == "json_object" else getattr(p, which)
    return {"constraint": Constraint(which, text), "constraint_field": f"params.{which}"}


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


def total_usage(finals: list[FinishEvent], n: int) -> pb.Usage:
    """A call's usage from its choices' finishes in index order (n per prompt): each prompt's
    tokens once, every choice's completion tokens."""
    return pb.Usage(prompt_tokens=sum(ev.prompt_tokens for ev in finals[::n]),
                    completion_tokens=sum(ev.completion_tokens for ev in finals),
                    virtual_tokens=sum(ev.virtual_tokens for ev in finals[::n]))


def logprobs_to_pb(lps: list[TokenLogprobs] | tuple[TokenLogprobs, ...], text: TokenText) -> list[pb.TokenLogprob]:
    out = []
    for lp in lps:
        top = [pb.TokenLogprob(token_id=t, token=text(t)[0], logprob=v, bytes=text(t)[1]) for t, v in lp.top]
        token, raw = text(lp.token)
        out.append(pb.TokenLogprob(token_id=lp.token, token=token, logprob=lp.logprob, bytes=raw, top_logprobs=top))
    return out
