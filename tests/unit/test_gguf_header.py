"""The GGUF header check (server/model/gguf_header.py): a file we cannot serve is refused from its
header, before any conversion starts, in one line naming the file, with nothing left in the cache.
Files are written by the `gguf` package's own writer, then damaged."""
from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import pytest

from server.model import convert, gguf_header
from server.model.default import resolve_model
from server.model.loader import ModelLoadError
from tests.gguf_fixtures import llama_gguf


@pytest.fixture()
def no_conversion(monkeypatch):
    """Conversion must not start: the header refuses first."""
    def convert_gguf(*a, **k):
        raise AssertionError("conversion started for a file the header check should have refused")

    monkeypatch.setattr(convert, "convert_gguf", convert_gguf)


def refused(spec: Path, cache: Path) -> str:
    with pytest.raises(ModelLoadError) as e:
        resolve_model(str(spec), cache, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{spec}: "), msg
    assert not cache.exists() or list(cache.iterdir()) == []
    return msg


def test_a_complete_llama_passes_and_is_described(tmp_path):
    h = gguf_header.check_file(llama_gguf(tmp_path / "ok.gguf", layers=2))
    assert h.version == 3 and h.architecture == "llama"
    assert h.tensors["blk.1.ffn_down.weight"] == ((128, 64), 0)       # ne0 first, F32
    assert h.metadata["tokenizer.ggml.tokens"] == 257                 # an array stands for its length


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_every_served_architecture_passes(tmp_path, arch):
    assert gguf_header.check_file(llama_gguf(tmp_path / "m.gguf", arch=arch)).architecture == arch


def test_another_architecture_is_refused_before_conversion(tmp_path, no_conversion):
    msg = refused(llama_gguf(tmp_path / "gpt2.gguf", arch="gpt2"), tmp_path / "cache")
    assert "general.architecture is 'gpt2'" in msg and "llama, mistral, qwen2" in msg


@pytest.mark.parametrize("damage,needle", [
    (lambda d: d[:3], "not a GGUF file"),
    (lambda d: d[:20], "damaged GGUF header"),                            # inside the counts
    (lambda d: d[:400], "damaged GGUF header"),                           # inside the key/values
    (lambda d: d[:len(d) // 3], "truncated or corrupt: tensor"),          # inside the tensor data
    (lambda d: d[:-1], "truncated or corrupt: tensor"),                   # one byte short
    (lambda d: d[:8] + bytes(range(256)) * 8 + d[8 + 2048:], "damaged GGUF header"),   # counts overwritten
    (lambda d: d[:4] + struct.pack("<I", 1) + d[8:], "GGUF version 1 is not supported"),
    (lambda d: d[:4] + struct.pack(">I", 3) + d[8:], "big-endian"),
    (lambda d: d.replace(b"tokenizer.ggml.tokens", b"tokenizer.ggml.tokenz", 1), "no tokenizer.ggml.tokens"),
])
def test_damaged_files_are_refused_in_one_line(tmp_path, no_conversion, damage, needle):
    path = llama_gguf(tmp_path / "broken.gguf")
    path.write_bytes(damage(path.read_bytes()))
    assert needle in refused(path, tmp_path / "cache")


@pytest.mark.parametrize("kw,needle", [
    (dict(drop=("blk.0.ffn_up.weight",)), "tensor blk.0.ffn_up.weight is missing"),
    (dict(reshape={"blk.0.attn_k.weight": (64, 64)}), "tensor blk.0.attn_k.weight has shape [64, 64]"),
    (dict(reshape={"token_embd.weight": (300, 64)}), "tensor token_embd.weight has shape [64, 300]"),
    (dict(tokenizer=False), "no tokenizer"),
])
def test_incomplete_models_are_refused_before_conversion(tmp_path, no_conversion, kw, needle):
    """What transformers would fill with random weights, or fail on after a long load report."""
    assert needle in refused(llama_gguf(tmp_path / "partial.gguf", **kw), tmp_path / "cache")


def test_a_wheel_holding_another_architecture_is_refused_naming_wheel_and_member(tmp_path, no_conversion):
    gguf = llama_gguf(tmp_path / "g.gguf", arch="gpt2").read_bytes()
    whl = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("pkg/g.gguf", gguf)
    msg = refused(whl, tmp_path / "cache")
    assert msg.startswith(f"{whl}: pkg/g.gguf: general.architecture is 'gpt2'")


class PanicException(BaseException):
    """As pyo3 defines it (a Rust panic in a native reader): not an Exception."""


def test_a_reader_panic_is_one_line_naming_the_users_file(tmp_path, monkeypatch):
    def convert_gguf(gguf: Path, out: Path, progress: bool = True) -> None:
        (out / "config.json").write_text("{}")
        raise PanicException(f"called `Option::unwrap()` on a `None` value\n  at {gguf}")

    monkeypatch.setattr(convert, "convert_gguf", convert_gguf)
    msg = refused(llama_gguf(tmp_path / "m.gguf"), tmp_path / "cache")
    assert "cannot convert this GGUF file (PanicException: called `Option::unwrap()`" in msg
    assert ".partial-" not in msg                     # the user's path, not the scratch copy


def test_a_conversion_refusal_names_the_users_file_not_the_scratch_copy(tmp_path, monkeypatch):
    def convert_gguf(gguf: Path, out: Path, progress: bool = True) -> None:
        raise ModelLoadError(f"{gguf}: cannot convert this GGUF file (RuntimeError: see the report\nabove)")

    monkeypatch.setattr(convert, "convert_gguf", convert_gguf)
    msg = refused(llama_gguf(tmp_path / "m.gguf"), tmp_path / "cache")
    assert msg == f"{tmp_path / 'm.gguf'}: cannot convert this GGUF file (RuntimeError: see the report ..."


def test_a_complete_little_llama_converts_and_loads(tmp_path):
    """The check refuses no good file: transformers converts this one and the loader reads it."""
    import torch
    from server.model.loader import load_model
    d = resolve_model(str(llama_gguf(tmp_path / "tiny.gguf")), tmp_path / "cache", progress=False)
    loaded = load_model(d, torch.device("cpu"), torch.float32)
    assert loaded.model.shape.hidden_size == 64 and loaded.model.shape.num_kv_heads == 2
    assert loaded.tokenizer.encode("hi t").ids == [ord("h"), ord("i"), 256]     # bytes, then the one merge
