"""lorafleet load-test scenarios: pick them by user class on the locust command line.

    locust -f loadtest/locustfile.py --headless -u 16 -r 4 -t 60s --host 127.0.0.1:50051 \
        ZipfTenantsUser MixedUser UploadChurnUser

  ZipfTenantsUser  Generate / GenerateStream with the adapter of a tenant drawn zipf(s): a few
                   tenants get most calls, the long tail keeps the adapter cache evicting
  MixedUser        Generate, GenerateStream and Classify (tenants with an adapter) mixed
  UploadChurnUser  exactly one user uploading new adapter versions and deleting them during traffic
  OpenAIUser       the OpenAI-compatible HTTP door (--http-target host:port): completions, streamed
                   and not, and chat when the model has a chat template; adapters as `model`

Tenants come from `--adapters FILE` (`tenant key adapter` lines, most popular first; run.py
provisions such a fleet); without it, 100 synthetic tenants call the base model without keys
(a server without --api-keys).

`loadtest/run.py` (`make loadtest`) starts a server, runs this and prints a summary.
"""
from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: client/, loadtest/

import grpc  # noqa: E402
from locust import events, task  # noqa: E402
from locust.exception import StopUser  # noqa: E402

from lorafleet.v1 import lorafleet_pb2 as pb  # noqa: E402
from loadtest.grpc_user import GrpcUser  # noqa: E402
from loadtest.http_user import OpenAIHttpUser  # noqa: E402
from loadtest.traffic import (LABELS, Tenant, Zipf, load_adapters_file, lora_archive, prompt,  # noqa: E402
                              synthetic_tenants, upload_messages)


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    g = parser.add_argument_group("lorafleet")
    g.add_argument("--adapters", type=str, default="",
                   help="file of 'tenant key adapter' lines, most popular first (default: 100 tenants, base model)")
    g.add_argument("--synthetic-tenants", type=int, default=100, help="tenants when --adapters is not given")
    g.add_argument("--zipf-s", type=float, default=1.1, help="zipf exponent of tenant popularity (0 = uniform)")
    g.add_argument("--strict", action="store_true", default=False,
                   help="count UNIMPLEMENTED answers as failures (default: counted apart as '<Method> [UNIMPLEMENTED]')")
    g.add_argument("--max-new-tokens", type=int, default=32, help="tokens per generation request")
    g.add_argument("--prompt-chars", type=int, default=200, help="longest prompt, in characters")
    g.add_argument("--think-time", type=float, default=0.5,
                   help="mean pause between a user's calls in seconds (exponential; 0 = none)")
    g.add_argument("--request-timeout", type=float, default=60.0, help="gRPC deadline per call, seconds")
    g.add_argument("--seed", type=int, default=0, help="seed of the traffic (tenants, prompts)")
    g.add_argument("--http-target", type=str, default="",
                   help="host:port of the server's OpenAI-compatible HTTP door (OpenAIUser; without it that "
                        "user stops at once)")


class _Traffic:
    """Built once per locust process from the parsed options."""

    def __init__(self, opts) -> None:
        self.opts = opts
        self.tenants: list[Tenant] = (load_adapters_file(Path(opts.adapters)) if opts.adapters
                                      else synthetic_tenants(opts.synthetic_tenants))


_traffic: _Traffic | None = None
_user_ids = itertools.count()


@events.init.add_listener
def _init(environment, **_kw) -> None:
    global _traffic
    _traffic = _Traffic(environment.parsed_options)


class _Fleet:
    """What every scenario user shares: its own seeded rng, zipf-popular tenants, think time."""

    def _join_fleet(self) -> None:
        self.opts = _traffic.opts
        self.rng = random.Random(f"{self.opts.seed}-{next(_user_ids)}")
        self.zipf = Zipf(len(_traffic.tenants), self.opts.zipf_s, self.rng)

    def wait_time(self) -> float:
        t = self.opts.think_time
        return self.rng.expovariate(1.0 / t) if t > 0 else 0.0

    def tenant(self) -> Tenant:
        return _traffic.tenants[self.zipf.draw()]


class _LoraFleetUser(_Fleet, GrpcUser):
    abstract = True

    def __init__(self, environment):
        super().__init__(environment)
        self._join_fleet()

    def _request(self, tenant: Tenant) -> pb.GenerateRequest:
        return pb.GenerateRequest(
            prompt=prompt(self.rng, self.opts.prompt_chars), adapter=tenant.adapter,
            params=pb.SamplingParams(max_new_tokens=self.opts.max_new_tokens, ignore_eos=True,
                                     temperature=self.rng.choice([0.0, 0.8]), top_p=0.95,
                                     seed=self.rng.getrandbits(32)))

    def generate(self) -> None:
        t = self.tenant()
        try:
            self.inference.Generate(self._request(t), timeout=self.opts.request_timeout, metadata=t.metadata())
        except grpc.RpcError:
            pass                        # recorded by the interceptor

    def generate_stream(self) -> None:
        t = self.tenant()
        try:
            for _ in self.inference.GenerateStream(self._request(t), timeout=self.opts.request_timeout,
                                                   metadata=t.metadata()):
                pass
        except grpc.RpcError:
            pass


class ZipfTenantsUser(_LoraFleetUser):
    """Popular tenants (and their adapters) get most of the traffic: the adapter cache's best case."""

    @task(3)
    def unary(self) -> None:
        self.generate()

    @task(1)
    def stream(self) -> None:
        self.generate_stream()


class MixedUser(_LoraFleetUser):
    """Generation and classification from the same tenants."""

    @task(5)
    def unary(self) -> None:
        self.generate()

    @task(4)
    def stream(self) -> None:
        self.generate_stream()

    @task(2)
    def classify(self) -> None:
        t = self.tenant()
        if not t.adapter:               # classification needs an adapter with a head
            return
        texts = [prompt(self.rng, 64) for _ in range(self.rng.randint(1, 4))]
        try:
            self.inference.Classify(pb.ClassifyRequest(texts=texts, adapter=t.adapter),
                                    timeout=self.opts.request_timeout, metadata=t.metadata())
        except grpc.RpcError:
            pass


class UploadChurnUser(_LoraFleetUser):
    """One user uploading during traffic: alternately a new version of a tenant's served adapter (a
    hot swap under the requests using it) and a throwaway adapter that it deletes again."""

    fixed_count = 1

    def on_start(self) -> None:
        info = self.inference.GetServerInfo(pb.GetServerInfoRequest(), timeout=self.opts.request_timeout,
                                            metadata=self.tenant().metadata())
        self.archives = [lora_archive(info.hidden_size, info.num_layers, rank=4, seed=self.opts.seed + k,
                                      labels=LABELS) for k in range(2)]
        self.round = 0

    def wait_time(self) -> float:
        return 1.0 + self.rng.random()

    @task
    def churn(self) -> None:
        t = self.tenant()
        self.round += 1
        archive = self.archives[self.round % 2]
        timeout, md = self.opts.request_timeout, t.metadata()
        try:
            if t.adapter and self.round % 2:
                self.adapters.UploadAdapter(upload_messages(t.adapter.split("@")[0], archive),
                                            timeout=timeout, metadata=md)
            else:
                name = f"churn-{self.round % 4}"
                self.adapters.UploadAdapter(upload_messages(name, archive), timeout=timeout, metadata=md)
                self.adapters.DeleteAdapter(pb.DeleteAdapterRequest(name=name), timeout=timeout, metadata=md)
        except grpc.RpcError:
            pass


class OpenAIUser(_Fleet, OpenAIHttpUser):
    """The same tenants and adapters through the OpenAI-compatible HTTP door: `model` is the
    tenant's adapter (or the base model's name, from GET /v1/models)."""

    def __init__(self, environment):
        super().__init__(environment)
        self._join_fleet()
        self.http_base = f"http://{self.opts.http_target}" if self.opts.http_target else ""

    def on_start(self) -> None:
        if not self.http_base:
            raise StopUser()
        t = self.tenant()
        models = self.get_json("/v1/models", "ListModels", _headers(t), self.opts.request_timeout)
        self.base = models["data"][0]["id"] if models else ""
        # chat only where the model has a template (asked once, not counted)
        probe = self.session.post(f"{self.http_base}/v1/chat/completions", headers=_headers(t), timeout=30,
                                  json={"model": self.base, "max_tokens": 1,
                                        "messages": [{"role": "user", "content": "hi"}]})
        self.chat = probe.status_code == 200

    def _body(self, t: Tenant) -> dict:
        return {"model": t.adapter or self.base, "max_tokens": self.opts.max_new_tokens, "ignore_eos": True,
                "temperature": self.rng.choice([0.0, 0.8]), "top_p": 0.95, "seed": self.rng.getrandbits(32)}

    @task(3)
    def completion(self) -> None:
        t = self.tenant()
        self.post("/v1/completions", "Completions", {**self._body(t), "prompt": prompt(self.rng, self.opts.prompt_chars)},
                  _headers(t), self.opts.request_timeout)

    @task(2)
    def completion_stream(self) -> None:
        t = self.tenant()
        self.post_stream("/v1/completions", "CompletionsStream",
                         {**self._body(t), "prompt": prompt(self.rng, self.opts.prompt_chars)},
                         _headers(t), self.opts.request_timeout)

    @task(2)
    def chat_completion(self) -> None:
        if not self.chat:
            return
        t = self.tenant()
        body = {**self._body(t), "messages": [{"role": "user", "content": prompt(self.rng, self.opts.prompt_chars)}]}
        if self.rng.random() < 0.5:
            self.post("/v1/chat/completions", "ChatCompletions", body, _headers(t), self.opts.request_timeout)
        else:
            self.post_stream("/v1/chat/completions", "ChatCompletionsStream", body, _headers(t),
                             self.opts.request_timeout)


def _headers(t: Tenant) -> dict[str, str]:
    """The gRPC metadata of the tenant (x-tenant for the load balancer, the key) as HTTP headers."""
    return dict(t.metadata())
