"""What a new user tripped on (issue 21), against a real `lorafleet-server` process on 127.0.0.1
port 0 (tiny model) and the real `lorafleet` CLI: an upload over the server's limit is refused
by the client before anything is sent; uploads stream with a progress display on a terminal;
the CLI pointed at the HTTP port says so; a GGUF the server cannot serve is refused in one line
with nothing left in the cache."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from client import LoraFleetClient
from lorafleet.archive import WEIGHTS_FILE, DirArchive
from tests.gguf_fixtures import llama_gguf
from tests.serving_fixtures import make_adapter

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 256 * 1024                    # --max-adapter-bytes of the server below
START_S = 90.0                        # a deadline, not an assertion about speed


class Server:
    def __init__(self, proc: subprocess.Popen, ports: dict[str, int]):
        self.proc, self.ports = proc, ports
        self.grpc = f"127.0.0.1:{ports['grpc']}"

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 when none)."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.ports['metrics']}/metrics", timeout=10).read().decode()
        total = 0.0
        for line in text.splitlines():
            m = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
            if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
                total += float(m.group(2))
        return total


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """`python -m server --port 0 --http-port 0 --metrics-port 0`, as a user starts it."""
    work = tmp_path_factory.mktemp("newuser")
    proc = subprocess.Popen([sys.executable, "-m", "server", "--model", str(tiny_model_dir), "--port", "0",
                             "--http-port", "0", "--metrics-port", "0", "--data-dir", str(work / "data"),
                             "--max-adapter-bytes", str(LIMIT), "--shutdown-grace-s", "1"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ports: dict[str, int] = {}
    patterns = {"grpc": r"serving .* on 127\.0\.0\.1:(\d+)", "http": r"HTTP on http://127\.0\.0\.1:(\d+)/v1",
                "metrics": r"metrics on http://127\.0\.0\.1:(\d+)/metrics"}
    deadline, seen = time.monotonic() + START_S, []
    try:
        while len(ports) < 3 and time.monotonic() < deadline and (line := proc.stdout.readline()):
            seen.append(line)
            for key, pat in patterns.items():
                if m := re.search(pat, line):
                    ports[key] = int(m.group(1))
        assert len(ports) == 3, "the server did not print its three ports:\n" + "".join(seen[-20:])
        yield Server(proc, ports)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def cli(*args: str, stderr_tty: bool = False) -> tuple[int, str, str]:
    """Run `lorafleet ARGS`; with `stderr_tty` its stderr is a pseudo-terminal (as in a shell)."""
    cmd = [sys.executable, "-m", "client.cli", *args]
    if not stderr_tty:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        return r.returncode, r.stdout, r.stderr
    master, slave = os.openpty()
    try:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=slave, text=True)
        os.close(slave)
        out = p.communicate(timeout=120)[0]
        err = b""
        while True:
            try:
                block = os.read(master, 65536)
            except OSError:                 # EIO: the child closed its end
                break
            if not block:
                break
            err += block
        return p.returncode, out, err.decode()
    finally:
        os.close(master)


# --------------------------------------------------------------------------- uploads

def test_upload_over_the_limit_is_refused_by_the_client_before_sending(server, tmp_path):
    big = tmp_path / "big"
    big.mkdir()
    (big / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with open(big / WEIGHTS_FILE, "wb") as f:
        f.truncate(2 * LIMIT)                                   # sparse: never read
    asked = server.metric("lorafleet_requests_total", method="GetServerInfo")
    uploads = server.metric("lorafleet_requests_total", method="UploadAdapter")
    code, out, err = cli("--server", server.grpc, "upload", str(big), "--name", "big")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"lorafleet: {big}: the upload would be 512.3 KiB"), err
    assert f"at most 256.0 KiB ({LIMIT} bytes)" in err and "nothing was sent" in err
    assert server.metric("lorafleet_requests_total", method="GetServerInfo") == asked + 1   # it asked ...
    assert server.metric("lorafleet_requests_total", method="UploadAdapter") == uploads      # ... and sent nothing


def test_upload_streams_with_a_progress_display_on_a_terminal(server, tiny_model_dir, tmp_path):
    d, _ = make_adapter(tiny_model_dir, tmp_path, "lora", seed=31)
    code, out, err = cli("--server", server.grpc, "upload", str(d), "--name", "shown", stderr_tty=True)
    assert code == 0 and "uploaded shown version 1" in out, err
    frames = [f for f in err.replace("\r\n", "\n").split("\r") if f.strip()]
    assert len(frames) >= 2 and frames[-1].startswith("uploading shown: 100% of ") and err.endswith("\n"), err
    code, out, err = cli("--server", server.grpc, "upload", str(d), "--name", "shown")          # not a terminal
    assert code == 0 and "uploaded shown version 2" in out and err == ""


def test_library_upload_reports_progress_and_the_server_stores_those_bytes(server, tiny_model_dir, tmp_path):
    d, _ = make_adapter(tiny_model_dir, tmp_path, "ia3", seed=32)
    seen: list[tuple[int, int]] = []
    with LoraFleetClient(server.grpc, timeout=60) as c:
        info = c.upload_adapter(d, "counted", progress=lambda sent, total: seen.append((sent, total)))
        assert c.generate("hi", adapter="counted", max_new_tokens=3).completion_tokens >= 1
    total = DirArchive(d).size
    assert seen and all(t == total for _, t in seen) and seen[-1][0] == total
    assert [s for s, _ in seen] == sorted(s for s, _ in seen)
    assert info.size_bytes == total and info.sha256 == DirArchive(d).digest()


def test_the_readme_classify_walkthrough_train_upload_classify(server, tiny_model_dir, tmp_path):
    """The README's classification commands, on the tiny base (`--base`) and fewer steps: the
    shipped data trains a head, the upload makes `sentiment` exist, classify answers with it."""
    data = ROOT / "trainer" / "examples" / "sentiment.jsonl"
    labels = {json.loads(line)["label"] for line in data.read_text().splitlines()}
    assert labels == {"negative", "positive"}
    out = tmp_path / "adapters" / "sentiment"
    code, _, err = cli("train", "--method", "lora", "--task", "cls", "--data", str(data), "--out", str(out),
                       "--rank", "4", "--max-steps", "2", "--batch-size", "8", "--lr", "3e-3", "--quiet",
                       "--base", str(tiny_model_dir))
    assert code == 0, err[-2000:]
    code, out_text, err = cli("--server", server.grpc, "upload", str(out), "--name", "sentiment")
    assert code == 0 and "uploaded sentiment version 1" in out_text, err
    code, out_text, err = cli("--server", server.grpc, "classify", "--adapter", "sentiment", "great stuff", "terrible")
    assert code == 0, err
    results = json.loads(out_text)
    assert len(results) == 2 and all(set(r["scores"]) == labels for r in results)
    assert all(abs(sum(r["scores"].values()) - 1) < 1e-5 for r in results)


# --------------------------------------------------------------------------- the wrong port

@pytest.mark.parametrize("command", [["info"], ["generate", "--prompt", "hi"], ["adapters", "list"]])
def test_cli_pointed_at_the_http_port_says_so_in_one_line(server, command):
    code, out, err = cli("--server", f"127.0.0.1:{server.ports['http']}", *command)
    assert code == 1 and out == ""
    assert err.count("\n") == 1, err
    assert "this looks like the HTTP port" in err and "the gRPC port is 50051 by default" in err, err
    assert "HTTP/2" not in err and "SETTINGS" not in err


def test_the_grpc_port_still_answers_and_a_closed_port_is_not_called_http(server):
    code, out, _ = cli("--server", server.grpc, "info")
    assert code == 0 and json.loads(out)["hidden_size"] == 64
    code, _, err = cli("--server", "127.0.0.1:1", "--retries", "0", "info")
    assert code == 1 and "UNAVAILABLE" in err and "HTTP port" not in err


# --------------------------------------------------------------------------- GGUF refusals

@pytest.mark.parametrize("make,needle", [
    (lambda p: llama_gguf(p, arch="gpt2"), "general.architecture is 'gpt2'; lorafleet serves Llama-family"),
    (lambda p: p.write_bytes(llama_gguf(p).read_bytes()[:-100]) and p, "the file is truncated or corrupt"),
    (lambda p: p.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 64) and p, "damaged GGUF header"),
])
def test_a_gguf_the_server_cannot_serve_is_one_line_and_caches_nothing(tmp_path, make, needle):
    path = tmp_path / "model.gguf"
    make(path)
    cache = tmp_path / "cache"
    r = subprocess.run([sys.executable, "-m", "server", "--model", str(path), "--cache-dir", str(cache),
                        "--port", "0", "--metrics-port", "-1", "--data-dir", str(tmp_path / "data")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    refusal = [ln for ln in r.stderr.splitlines() if ln.startswith("lorafleet-server:")]
    assert len(refusal) == 1 and refusal[0].startswith(f"lorafleet-server: {path}: {needle}"), r.stderr[-2000:]
    assert r.stderr.rstrip().endswith(refusal[0])
    for noise in ("Traceback", "MISSING", "PanicException", "Converting", "report"):
        assert noise not in r.stderr, r.stderr[-2000:]
    assert not cache.exists() or list(cache.iterdir()) == []
