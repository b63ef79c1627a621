"""lorafleet against the servers a user would pick instead: llama.cpp's llama-server and vLLM (issue 24).

Every server runs as a subprocess on 127.0.0.1, one after the other, on the same inputs:
  weights   SmolLM2-135M-Instruct from lorafleet's cache (fp32; llama.cpp: an F32 GGUF converted from it)
  adapters  32 PEFT LoRAs, rank 16 (alpha 32), all seven linears, random non-zero A and B (seeded;
            bench/mixed_adapters.make_peft), saved with save_pretrained (llama.cpp: converted to GGUF)
  prompts   64 fixed English prompts of ~80 tokens (five sentences); 64 new tokens each, greedy, ignore_eos
  traffic   64 requests at concurrency 32 through each server's OpenAI POST /v1/completions, streamed
            (httpx, asyncio): TTFT per request (first streamed text) and generated tokens (usage)
Two workloads: "base" (every request on the base model) and "mix" (request i on the base model when
i % 33 == 0, else LoRA i % 33 - 1: a 33-way mix). Before measuring, each server answers one short
request per model (all 33 at once), so every adapter is loaded. It prints tokens/s and TTFT p50 per
server and workload, mix/base, lorafleet against each peer (`ratio:` lines, with issue 24's targets),
and whether the greedy texts agree across servers (each request's text against lorafleet's).

    PYTHONPATH=.:proto .venv/bin/python bench/peers.py [--peers lorafleet,llama.cpp,vllm] [--smoke]
        [--llama-server PATH] [--vllm-python PATH] [--peers-dir DIR] [--work-dir DIR] [--threads 2]

Peers are used when found, and skipped (with the reason printed) when not; lorafleet always runs.
  llama.cpp  --llama-server PATH, else `llama-server` on PATH, else PEERS_DIR/llama.cpp/build/bin/;
             convert_hf_to_gguf.py and convert_lora_to_gguf.py from the llama.cpp source tree the
             binary was built in (--llama-cpp-dir, default: two levels above build/bin), run with
             this Python (torch, transformers, numpy, safetensors, sentencepiece) and its gguf-py on PYTHONPATH.
             Served with -np 32 --cont-batching --lora-scaled a.gguf:0,... --lora-init-without-apply;
             a request picks its LoRA with "lora": [{"id": i, "scale": 1}].
  vLLM       --vllm-python PATH, else this Python, else PEERS_DIR/vllm-venv/bin/python: the first
             that can `import vllm`. Run with --dtype float32 --enable-lora --max-loras 33 (one
             more than the adapters: its CPU path applies the last slot's LoRA to base rows in a
             mixed batch otherwise) --max-lora-rank 16, VLLM_CPU_KVCACHE_SPACE=4 and
             VLLM_CPU_OMP_THREADS_BIND=0-(threads-1) unless set. It busy-waits when idle, so each
             server is stopped before the next one starts.
PEERS_DIR: --peers-dir, default $LORAFLEET_PEERS_DIR or /work/peers (where README's build commands
put them). Converted GGUFs, the LoRAs and server logs are kept under --work-dir (default
~/.cache/lorafleet/peers). How to build both peers: README, Performance, "Against llama.cpp and vLLM".

--smoke: lorafleet only, on the tiny model, 4 LoRAs (a 5-way mix), 8 requests at concurrency 4 of 8
new tokens, in a temporary directory: seconds (`make test` runs it). Its figures only show it runs.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "proto"))

import httpx  # noqa: E402

from server.config import DEFAULT_CACHE  # noqa: E402
from server.model.default import resolve_model  # noqa: E402

PEERS = ("lorafleet", "llama.cpp", "vllm")
LORA_SEED = 24_000                    # LoRA i is make_peft(..., "lora", LORA_SEED + i)
SENTENCES = [
    "The harbour town woke slowly as fishing boats returned with the morning tide.",
    "A small team of engineers spent the winter rebuilding the old railway bridge.",
    "Most houseplants need bright indirect light and water only when the soil is dry.",
    "The library keeps its rarest maps in a cold room beneath the reading hall.",
    "Every spring the river floods the low meadows and leaves rich silt behind.",
    "She wrote the first draft of the novel in a notebook during long train rides.",
    "Bread rises because yeast turns sugar into carbon dioxide and a little alcohol.",
    "The committee agreed to publish its findings before the end of the year.",
    "Honeybees tell each other where flowers are by dancing in the dark hive.",
    "A good map shows not only roads but also the shape of the land around them.",
    "The orchestra rehearsed the symphony twice before the evening concert began.",
    "Cold fronts often bring a sudden drop in temperature and strong gusty winds.",
    "He fixed the bicycle chain with a borrowed tool and a bit of patience.",
    "Old lighthouses were lit by oil lamps and turned by heavy clockwork gears.",
    "The market sold apples, cheese, warm bread and jars of dark forest honey.",
    "Students measured the height of the tower using its shadow and a ruler.",
]


@dataclass
class Args:
    smoke: bool
    model: str | None
    requests: int
    concurrency: int
    new_tokens: int
    n_loras: int
    threads: int
    peers: list[str]
    work: Path
    peers_dir: Path
    llama_server: str | None
    llama_cpp_dir: Path | None
    vllm_python: str | None
    start_timeout: float
    request_timeout: float


@dataclass
class Result:
    """One workload on one server."""
    wall: float
    ttfts: list[float]
    tokens: list[int]
    texts: list[str]

    @property
    def tokens_per_s(self) -> float:
        return sum(self.tokens) / self.wall

    @property
    def ttft_p50(self) -> float:
        return statistics.median(self.ttfts)


@dataclass
class Run:
    name: str
    label: str
    results: dict[str, Result] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- shared inputs

def make_prompts(n: int, sentences: int = 5) -> list[str]:
    """n fixed prompts of `sentences` sentences each (5: ~80 SmolLM2 tokens), seeded, distinct."""
    out = []
    for i in range(n):
        rng = random.Random(1000 + i)
        out.append(f"Note {i + 1}. " + " ".join(rng.sample(SENTENCES, sentences)))
    return out


def make_loras(base_dir: Path, out: Path, n: int) -> list[Path]:
    """n PEFT LoRA dirs (rank 16, all seven linears, random non-zero A and B, seeded), made once."""
    dirs = [out / f"lora{i}" for i in range(n)]
    todo = [(i, d) for i, d in enumerate(dirs) if not (d / "adapter_model.safetensors").is_file()]
    if todo:
        import torch

        from bench.mixed_adapters import make_peft
        print(f"making {len(todo)} PEFT LoRAs (r16, all 7 linears) under {out} ...", flush=True)
        torch.set_num_threads(2)
        for i, d in todo:
            tmp = d.with_name(d.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            make_peft(base_dir, tmp, "lora", LORA_SEED + i)
            shutil.rmtree(d, ignore_errors=True)
            tmp.rename(d)
    return dirs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- the servers

class Server:
    """A server subprocess: start() -> base URL; model_for(None | adapter index) -> request fields."""
    name = ""
    label = ""

    def __init__(self, args: Args, base_dir: Path, loras: list[Path]):
        self.args, self.base_dir, self.loras = args, base_dir, loras
        self.proc: subprocess.Popen | None = None
        self.log = args.work / "logs" / f"{self.name}.log"

    def spawn(self, cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        out = self.log.open("wb")
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                     start_new_session=True)
        out.close()

    def log_tail(self, n: int = 2500) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log {self.log}:\n{self.log_tail()}")

    def wait_http(self, url: str, deadline: float) -> None:
        while True:
            self.check_alive()
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready at {url} within {self.args.start_timeout:g} s; "
                                   f"log {self.log}:\n{self.log_tail()}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)          # its own session: the server and its workers
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def start(self) -> str:
        raise NotImplementedError

    def fields(self, adapter: int | None) -> dict:
        raise NotImplementedError


class LoraFleet(Server):
    name, label = "lorafleet", "lorafleet"

    def start(self) -> str:
        a = self.args
        data = a.work / "lorafleet-data"
        shutil.rmtree(data, ignore_errors=True)
        self.spawn([sys.executable, "-m", "server", "--port", "0", "--metrics-port", "-1", "--http-port", "0",
                    "--model", str(self.base_dir), "--data-dir", str(data), "--threads", str(a.threads),
                    "--max-batch-size", str(a.concurrency), "--adapter-slots", str(max(len(self.loras), 1)),
                    "--max-adapter-rank", "16", "--max-queued-requests", str(max(256, 2 * a.requests)),
                    "--tenant-max-concurrent", str(max(64, a.concurrency)), "--tenant-max-queued",
                    str(max(256, 2 * a.requests))],
                   env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "proto")])}, cwd=ROOT)
        deadline = time.monotonic() + a.start_timeout
        grpc_target = http = None
        while not (grpc_target and http):
            self.check_alive()
            text = self.log_tail(20000)
            if m := re.search(r"lorafleet: serving .* on (\S+):(\d+)\s*$", text, re.M):
                grpc_target = f"{m.group(1)}:{m.group(2)}"
            if m := re.search(r"OpenAI-compatible HTTP on (http://\S+)/v1", text):
                http = m.group(1)
            if time.monotonic() > deadline:
                raise RuntimeError(f"lorafleet did not start within {a.start_timeout:g} s:\n{self.log_tail()}")
            time.sleep(0.2)
        self.wait_http(f"{http}/v1/models", deadline)
        from client import LoraFleetClient
        with LoraFleetClient(grpc_target, timeout=120) as c:      # its own client, over gRPC
            for i, d in enumerate(self.loras):
                c.upload_adapter(d, f"lora{i}")
        self.base_name = httpx.get(f"{http}/v1/models", timeout=10).json()["data"][0]["id"]
        return http

    def fields(self, adapter: int | None) -> dict:
        return {"model": self.base_name if adapter is None else f"lora{adapter}"}


def _run_checked(cmd: list[str], env: dict, log: Path, what: str) -> None:
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        p = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{what} failed ({p.returncode}); log {log}:\n{log.read_text(errors='replace')[-2000:]}")


class LlamaCpp(Server):
    name, label = "llama.cpp", "llama.cpp `llama-server` (F32 GGUF)"

    def __init__(self, args: Args, base_dir: Path, loras: list[Path], binary: Path, src: Path):
        super().__init__(args, base_dir, loras)
        self.binary, self.src = binary, src

    def convert(self) -> tuple[Path, list[Path]]:
        """The F32 GGUF of the base and one GGUF per LoRA, converted once (cached under --work-dir)."""
        out = self.args.work / "gguf" / f"{self.base_dir.name}-s{LORA_SEED}"
        out.mkdir(parents=True, exist_ok=True)
        path = [str(self.src), str(self.src / "gguf-py")]                # its conversion/ package, gguf
        if (self.args.peers_dir / "convert-lib").is_dir():       # e.g. sentencepiece, which they import
            path.append(str(self.args.peers_dir / "convert-lib"))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
        log = self.args.work / "logs" / "llama.cpp-convert.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        base = out / "base-f32.gguf"
        jobs = []                                                # (script, argv, final file)
        if not base.is_file():
            jobs.append(("convert_hf_to_gguf.py", [str(self.base_dir), "--outtype", "f32"], base))
        ggufs = [out / f"{d.name}-f32.gguf" for d in self.loras]
        jobs += [("convert_lora_to_gguf.py", ["--base", str(self.base_dir), "--outtype", "f32", str(d)], g)
                 for d, g in zip(self.loras, ggufs) if not g.is_file()]
        if jobs:
            print(f"converting to GGUF under {out} ({len(jobs)} files; llama.cpp's converters, log {log}) ...",
                  flush=True)
            todo = [[str(self.src / script), *argv, "--outfile", str(g) + ".tmp"] for script, argv, g in jobs]
            runner = ("import json, runpy, sys\n"                   # one process: torch is imported once
                      "for argv in json.loads(sys.argv[1]):\n"
                      "    sys.argv = argv\n"
                      "    runpy.run_path(argv[0], run_name='__main__')\n")
            _run_checked([sys.executable, "-c", runner, json.dumps(todo)], env, log, "llama.cpp's GGUF conversion")
            for _script, _argv, g in jobs:
                os.replace(str(g) + ".tmp", g)
        return base, ggufs

    def start(self) -> str:
        a = self.args
        base, ggufs = self.convert()
        port = free_port()
        ctx = a.concurrency * 256                              # per slot: ~80 prompt + 64 new, with room
        cmd = [str(self.binary), "-m", str(base), "--host", "127.0.0.1", "--port", str(port), "-t", str(a.threads),
               "-tb", str(a.threads), "-np", str(a.concurrency), "-c", str(ctx), "--cont-batching",
               "-b", "2048", "-ub", "512", "-ctk", "f32", "-ctv", "f32", "--no-webui"]   # fp32 KV, as the others
        if ggufs:
            cmd += ["--lora-scaled", ",".join(f"{g}:0" for g in ggufs), "--lora-init-without-apply"]
        self.spawn(cmd)
        url = f"http://127.0.0.1:{port}"
        self.wait_http(f"{url}/health", time.monotonic() + a.start_timeout)
        return url

    def fields(self, adapter: int | None) -> dict:
        return {"model": "base", "lora": [] if adapter is None else [{"id": adapter, "scale": 1.0}]}


class VLLM(Server):
    name, label = "vllm", "vLLM CPU (fp32)"

    def __init__(self, args: Args, base_dir: Path, loras: list[Path], python: str, version: str):
        super().__init__(args, base_dir, loras)
        self.python = python
        self.label = f"vLLM CPU {version} (fp32)"

    def start(self) -> str:
        a = self.args
        port = free_port()
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{a.threads - 1}")
        cmd = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.base_dir),
               "--served-model-name", "base", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
               "--max-model-len", "512", "--max-num-seqs", str(a.concurrency)]
        if self.loras:
            cmd += ["--enable-lora", "--max-loras", str(len(self.loras) + 1), "--max-lora-rank", "16",
                    "--lora-modules", *[f"lora{i}={d}" for i, d in enumerate(self.loras)]]
        self.spawn(cmd, env=env, cwd=self.args.work)
        url = f"http://127.0.0.1:{port}"
        self.wait_http(f"{url}/v1/models", time.monotonic() + a.start_timeout)
        return url

    def fields(self, adapter: int | None) -> dict:
        return {"model": "base" if adapter is None else f"lora{adapter}"}


def find_llama(args: Args) -> tuple[Path, Path] | str:
    """(llama-server binary, llama.cpp source dir) or why not."""
    cand = args.llama_server or shutil.which("llama-server")
    default = args.peers_dir / "llama.cpp" / "build" / "bin" / "llama-server"
    binary = Path(cand) if cand else default
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        return f"no llama-server (--llama-server, PATH, {default})"
    src = args.llama_cpp_dir or binary.resolve().parents[2]
    missing = [s for s in ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "gguf-py") if not (src / s).exists()]
    if missing:
        return f"llama-server at {binary}, but {src} lacks {', '.join(missing)} (--llama-cpp-dir: its source tree)"
    return binary, src


def find_vllm(args: Args) -> tuple[str, str] | str:
    """(a Python that imports vllm, vllm's version) or why not."""
    cands = [args.vllm_python] if args.vllm_python else [sys.executable, str(args.peers_dir / "vllm-venv/bin/python")]
    tried = []
    for py in cands:
        if not Path(py).is_file():
            tried.append(f"{py}: absent")
            continue
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        try:
            p = subprocess.run([py, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True,
                               timeout=300, env=env, cwd=args.work)
        except subprocess.TimeoutExpired:
            tried.append(f"{py}: `import vllm` timed out")
            continue
        if p.returncode == 0:
            return py, p.stdout.strip().splitlines()[-1]
        tried.append(f"{py}: `import vllm` failed ({(p.stderr.strip().splitlines() or ['?'])[-1][:160]})")
    return "no vLLM: " + "; ".join(tried)


# --------------------------------------------------------------------------- the traffic

async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, int, str]:
    """(TTFT s, generated tokens, text) of one streamed completion."""
    t0 = time.perf_counter()
    ttft, text, usage, timings, chunks = None, [], None, None, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            doc = json.loads(data)
            if "error" in doc:
                raise RuntimeError(f"stream error: {doc['error']}")
            for ch in doc.get("choices") or []:
                piece = ch.get("text") or ""
                if piece:
                    chunks += 1
                    text.append(piece)
                    if ttft is None:
                        ttft = time.perf_counter() - t0
            usage = doc.get("usage") or usage
            timings = doc.get("timings") or timings
    tokens = (usage or {}).get("completion_tokens") or (timings or {}).get("predicted_n") or chunks
    return (ttft if ttft is not None else time.perf_counter() - t0), int(tokens), "".join(text)


async def workload(url: str, bodies: list[dict], concurrency: int, timeout: float) -> Result:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    out: list[tuple[float, int, str] | None] = [None] * len(bodies)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(bodies)):
        queue.put_nowait(i)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout, connect=30)) as client:
        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                out[i] = await one_request(client, url, bodies[i])

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return Result(wall, [o[0] for o in out], [o[1] for o in out], [o[2] for o in out])


def bodies_for(server: Server, prompts: list[str], adapters: list[int | None], n: int) -> list[dict]:
    return [{**server.fields(a), "prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True,
             "stream_options": {"include_usage": True}} for p, a in zip(prompts, adapters)]


def measure(server: Server, args: Args, prompts: list[str]) -> Run:
    run = Run(server.name, server.label)
    n_models = len(server.loras) + 1
    mix = [None if i % n_models == 0 else i % n_models - 1 for i in range(args.requests)]
    try:
        t0 = time.perf_counter()
        url = server.start()
        print(f"{server.name}: ready in {time.perf_counter() - t0:.1f} s at {url}", flush=True)
        warm = bodies_for(server, prompts[:n_models], [None, *range(len(server.loras))], 2)
        asyncio.run(workload(url, warm, min(args.concurrency, n_models), args.request_timeout))
        for name, adapters in (("base", [None] * args.requests), ("mix", mix)):
            r = asyncio.run(workload(url, bodies_for(server, prompts, adapters, args.new_tokens), args.concurrency,
                                     args.request_timeout))
            run.results[name] = r
            short = sum(t != args.new_tokens for t in r.tokens)
            if short:
                run.notes.append(f"{name}: {short} of {len(r.tokens)} requests generated other than "
                                 f"{args.new_tokens} tokens")
            print(f"{server.name} {name}: {sum(r.tokens)} tokens in {r.wall:.1f} s = {r.tokens_per_s:.1f} tok/s, "
                  f"TTFT p50 {r.ttft_p50:.2f} s", flush=True)
    finally:
        server.stop()
    return run


# --------------------------------------------------------------------------- the report

def agreement(runs: list[Run], workloads: list[str]) -> list[str]:
    """Per peer and workload: requests whose greedy text equals lorafleet's."""
    ref = runs[0]
    lines = []
    for run in runs[1:]:
        for w in workloads:
            if w not in run.results or w not in ref.results:
                continue
            a, b = ref.results[w].texts, run.results[w].texts
            same = sum(x == y for x, y in zip(a, b))
            msg = f"{run.name} {w}: {same}/{len(a)} greedy texts identical to lorafleet's"
            if same < len(a):
                i = next(k for k, (x, y) in enumerate(zip(a, b)) if x != y)
                pre = len(os.path.commonprefix([a[i], b[i]]))
                msg += f" (first differing: request {i}, after {pre} of {len(a[i])} characters)"
            lines.append(msg)
    return lines


def base_rows_in_mix(run: Run, n_models: int) -> str | None:
    """Does a server give the base-model rows of the mix the same text as the base run?"""
    if "mix" not in run.results or "base" not in run.results:
        return None
    b, m = run.results["base"].texts, run.results["mix"].texts
    rows = [i for i in range(len(m)) if i % n_models == 0]
    same = sum(b[i] == m[i] for i in rows)
    return f"{run.name}: base-model rows of the mix equal to the base run: {same}/{len(rows)}"


def table(runs: list[Run], mix_label: str) -> list[str]:
    def cell(run: Run, w: str) -> str:
        r = run.results.get(w)
        return f"{r.tokens_per_s:.1f} (TTFT p50 {r.ttft_p50:.2f} s)" if r else "-"

    def ratio(run: Run) -> str:
        b, m = run.results.get("base"), run.results.get("mix")
        return f"{m.tokens_per_s / b.tokens_per_s:.2f}" if b and m else "-"

    out = ["| workload | " + " | ".join(r.label for r in runs) + " |",
           "| --- |" + " --- |" * len(runs),
           "| base model only | " + " | ".join(cell(r, "base") for r in runs) + " |",
           f"| {mix_label} | " + " | ".join(cell(r, "mix") for r in runs) + " |",
           "| mix / base | " + " | ".join(ratio(r) for r in runs) + " |"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", default=",".join(PEERS), help="servers to run, comma-separated (lorafleet always runs)")
    ap.add_argument("--model", default=None, help="model spec (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--loras", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads of every server")
    ap.add_argument("--peers-dir", type=Path, default=Path(os.environ.get("LORAFLEET_PEERS_DIR", "/work/peers")))
    ap.add_argument("--work-dir", type=Path, default=DEFAULT_CACHE / "peers",
                    help="LoRAs, converted GGUFs and server logs (kept between runs)")
    ap.add_argument("--llama-server", default=None, help="the llama-server binary")
    ap.add_argument("--llama-cpp-dir", type=Path, default=None, help="llama.cpp source tree (its converters)")
    ap.add_argument("--vllm-python", default=None, help="a Python that can `import vllm`")
    ap.add_argument("--start-timeout", type=float, default=900.0, help="seconds a server gets to become ready")
    ap.add_argument("--request-timeout", type=float, default=1800.0)
    ap.add_argument("--smoke", action="store_true",
                    help="lorafleet only, tiny model, 4 LoRAs, 8 requests at concurrency 4, 8 new tokens (seconds)")
    ns = ap.parse_args()
    tmp = None
    if ns.smoke:
        tmp = tempfile.TemporaryDirectory(prefix="lorafleet-peers-")
        ns.model, ns.requests, ns.concurrency, ns.new_tokens, ns.loras = "tiny", 8, 4, 8, 4
        ns.peers, ns.work_dir = "lorafleet", Path(tmp.name)
    want = [p.strip() for p in ns.peers.split(",") if p.strip()]
    unknown = sorted(set(want) - set(PEERS))
    if unknown:
        raise SystemExit(f"peers.py: unknown peers {unknown}; known: {', '.join(PEERS)}")
    args = Args(ns.smoke, ns.model, ns.requests, ns.concurrency, ns.new_tokens, ns.loras, ns.threads,
                ["lorafleet", *[p for p in want if p != "lorafleet"]], ns.work_dir, ns.peers_dir, ns.llama_server,
                ns.llama_cpp_dir, ns.vllm_python, ns.start_timeout, ns.request_timeout)
    args.work.mkdir(parents=True, exist_ok=True)
    try:
        bench(args)
    finally:
        if tmp is not None:
            tmp.cleanup()


def bench(args: Args) -> None:
    base_dir = resolve_model(args.model, DEFAULT_CACHE / "models")
    loras = make_loras(base_dir, args.work / "loras" / f"{base_dir.name}-r16-s{LORA_SEED}", args.n_loras)
    prompts = make_prompts(args.requests, 1 if args.smoke else 5)   # the tiny model's tokens are bytes
    try:
        from transformers import AutoTokenizer
        lens = [len(ids) for ids in AutoTokenizer.from_pretrained(str(base_dir))(prompts)["input_ids"]]
        prompt_note = f"{min(lens)}-{max(lens)} (mean {statistics.mean(lens):.0f}) prompt tokens"
    except Exception as e:                                   # the count is for the report only
        prompt_note = f"prompt tokens not counted ({type(e).__name__})"
    servers: list[Server] = [LoraFleet(args, base_dir, loras)]
    skipped: list[str] = []
    if "llama.cpp" in args.peers:
        found = find_llama(args)
        if isinstance(found, str):
            skipped.append(f"llama.cpp: {found}")
        else:
            servers.append(LlamaCpp(args, base_dir, loras, *found))
    if "vllm" in args.peers:
        found = find_vllm(args)
        if isinstance(found, str):
            skipped.append(f"vllm: {found}")
        else:
            servers.append(VLLM(args, base_dir, loras, *found))
    for s in skipped:
        print(f"skipped {s}", flush=True)
    runs = []
    for s in servers:
        try:
            runs.append(measure(s, args, prompts))
        except Exception as e:
            if s.name == "lorafleet":
                raise
            skipped.append(f"{s.name}: failed: {str(e)[:1500]}")
            print(f"skipped {skipped[-1]}", flush=True)
    n_models = len(loras) + 1
    print(f"\nmodel {base_dir.name} fp32; {len(loras)} PEFT LoRA r16 on all 7 linears; {args.requests} requests x "
          f"{prompt_note} x {args.new_tokens} new tokens, greedy, ignore_eos, concurrency {args.concurrency}, "
          f"streamed /v1/completions; {args.threads} threads per server; load average {os.getloadavg()[0]:.2f}")
    print(f"tokens/s (generated); mix: {n_models}-way (base + {len(loras)} LoRAs, request i on i % {n_models})\n")
    for line in table(runs, f"{n_models}-way mix (base + {len(loras)} LoRAs)"):
        print(line)
    print()
    for line in agreement(runs, ["base", "mix"]):
        print(line)
    for run in runs:
        if line := base_rows_in_mix(run, n_models):
            print(line)
        for note in run.notes:
            print(f"{run.name}: {note}")
    for s in skipped:
        print(f"skipped {s}")
    out = args.work / "last-run.json"
    out.write_text(json.dumps({"prompts": prompts, "skipped": skipped, "runs": {
        r.name: {w: {"wall_s": x.wall, "ttft_s": x.ttfts, "tokens": x.tokens, "texts": x.texts}
                 for w, x in r.results.items()} for r in runs}}, indent=1))
    print(f"texts, TTFTs and token counts per request: {out}")
    lf = runs[0].results
    print(f"ratio: lorafleet mix/base = {lf['mix'].tokens_per_s / lf['base'].tokens_per_s:.2f} (target >= 0.8)")
    targets = {"llama.cpp": ("1.0", "8"), "vllm": ("1.5", "2")}
    for run in runs[1:]:
        b, m = run.results["base"], run.results["mix"]
        tb, tm = targets[run.name]
        print(f"ratio: lorafleet/{run.name} base = {lf['base'].tokens_per_s / b.tokens_per_s:.2f} (target >= {tb})   "
              f"mix = {lf['mix'].tokens_per_s / m.tokens_per_s:.2f} (target >= {tm})   "
              f"TTFT p50 base = {lf['base'].ttft_p50 / b.ttft_p50:.2f}x theirs"
              + (" (target <= 1)" if run.name == "llama.cpp" else ""))


if __name__ == "__main__":
    main()
