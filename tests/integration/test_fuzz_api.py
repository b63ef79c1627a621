"""Fuzzing the servicers over real gRPC: arbitrary field values never give INTERNAL or UNKNOWN,
and the server stays healthy afterwards."""
from __future__ import annotations

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafleet.v1 import lorafleet_pb2 as pb

BAD = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
u32 = st.integers(0, 2**32 - 1)
names = st.one_of(st.text(max_size=80), st.sampled_from(["", "a", "shared/x", "x@0", "x@99999999999", "../a",
                                                          "a" * 65, "lora@1", "shared/", "@", "A"]))

params = st.builds(pb.SamplingParams, max_new_tokens=st.one_of(st.integers(0, 60), u32), temperature=floats,
                   top_p=floats, top_k=u32, seed=st.integers(0, 2**64 - 1),
                   stop=st.lists(st.text(max_size=80), max_size=12), repetition_penalty=floats,
                   ignore_eos=st.booleans())
generate_requests = st.builds(pb.GenerateRequest, prompt=st.text(max_size=300), adapter=names, params=params,
                              request_id=st.text(max_size=200))


def check(call):
    try:
        call()
    except grpc.RpcError as e:
        assert e.code() not in BAD, (e.code(), e.details())
        assert e.details(), "every rejection explains itself"


@SETTINGS
@given(req=generate_requests)
def test_generate_never_internal(client, req):
    check(lambda: client.inference.Generate(req, timeout=30))


@SETTINGS
@given(req=generate_requests)
def test_stream_never_internal(client, req):
    check(lambda: list(client.inference.GenerateStream(req, timeout=30)))


@SETTINGS
@given(texts=st.lists(st.text(max_size=100), max_size=80), adapter=names)
def test_classify_never_internal(client, texts, adapter):
    check(lambda: client.inference.Classify(pb.ClassifyRequest(texts=texts, adapter=adapter), timeout=30))


meta = st.builds(pb.UploadMetadata, name=names, kind=st.integers(0, 9), sha256=st.one_of(st.text(max_size=70),
                 st.text("0123456789abcdef", min_size=64, max_size=64)), total_bytes=st.integers(0, 2**64 - 1),
                 shared=st.booleans())
parts = st.lists(st.one_of(st.builds(lambda b: pb.UploadAdapterRequest(chunk=b), st.binary(max_size=2000)),
                           st.builds(lambda m: pb.UploadAdapterRequest(metadata=m), meta)), max_size=6)


@SETTINGS
@given(first=meta, rest=parts)
def test_upload_never_internal(client, first, rest):
    msgs = [pb.UploadAdapterRequest(metadata=first), *rest]
    check(lambda: client.adapters.UploadAdapter(iter(msgs), timeout=30))


@SETTINGS
@given(name=names, page_size=u32, token=st.text(max_size=30))
def test_adapter_queries_never_internal(client, name, page_size, token):
    check(lambda: client.adapters.GetAdapter(pb.GetAdapterRequest(name=name), timeout=30))
    check(lambda: client.adapters.DeleteAdapter(pb.DeleteAdapterRequest(name=name), timeout=30))
    check(lambda: client.adapters.ListAdapters(pb.ListAdaptersRequest(page_size=page_size, page_token=token),
                                               timeout=30))


def test_still_healthy_after_fuzzing(client, server):
    assert client.generate("still alive", max_new_tokens=3).completion_tokens >= 1
    assert server.engine.alive
