"""The header of a GGUF file, read before any conversion: `check_file`.

A file we cannot serve is refused in a moment and in one line, before transformers dequantizes
anything: the magic, the version, the key/value metadata and the tensor directory (names, shapes,
types, offsets) are parsed with every length bounded by the file's size (the tensor data is never
read, only checked to be there), then the model is checked to be a complete Llama-family model:
its `general.architecture`, the shape metadata, and every tensor the forward needs, with the shape
the metadata implies. Standard library and `gguf.constants` only (no torch).

Layout (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), little-endian:
  "GGUF", u32 version, u64 tensor count, u64 key/value count,
  key/values: string key, u32 value type, value (a string is u64 length + UTF-8 bytes; an array is
              u32 item type, u64 count, items),
  tensor infos: string name, u32 n_dims, u64 dims[n_dims] (ne0 first), u32 ggml type, u64 offset,
  padding to `general.alignment` (32), then the tensor data.
"""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

MAGIC = b"GGUF"
VERSIONS = (2, 3)
ARCHITECTURES = ("llama", "mistral", "qwen2")   # general.architecture values of the family we serve
MAX_NAME = 65535                               # longest key or tensor name the format allows
MAX_DEPTH = 4                                  # arrays of arrays, at most this deep
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_U32, _U64, _STRING, _ARRAY = 4, 10, 8, 9
_LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                  "ffn_down")


class GgufError(ValueError):
    """The file is not a GGUF of a model we serve; the message is one line naming the file."""


class _Damaged(Exception):
    """The header does not parse; the message says where."""


@dataclass(frozen=True)
class GgufHeader:
    version: int
    metadata: dict[str, object]                        # scalars and strings; an array stands for its length
    tensors: dict[str, tuple[tuple[int, ...], int]]    # name -> (dims, ne0 first as stored; ggml type)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))


class _Cursor:
    """Bounded sequential reads from the start of a GGUF byte stream of known size."""

    def __init__(self, f: BinaryIO, size: int):
        self.f, self.size, self.pos = f, size, 0

    def take(self, n: int, what: str) -> bytes:
        if n > self.size - self.pos:
            raise _Damaged(f"{what} at byte {self.pos} runs past the end of the file ({self.size} bytes)")
        data = self.f.read(n)
        if len(data) != n:
            raise _Damaged(f"{what} at byte {self.pos}: the file ends early")
        self.pos += n
        return data

    def scalar(self, code: int, what: str):
        fmt = _SCALARS[code]
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str, cap: int | None = None) -> str:
        n = self.scalar(_U64, what)
        if cap is not None and n > cap:
            raise _Damaged(f"{what} at byte {self.pos} claims {n} bytes (at most {cap})")
        try:
            return self.take(n, what).decode("utf-8")
        except UnicodeDecodeError:
            raise _Damaged(f"{what} at byte {self.pos - n} is not UTF-8") from None

    def value(self, code: int, what: str, depth: int = 0):
        """One metadata value; an array is read past and stands for its length."""
        if code in _SCALARS:
            return self.scalar(code, what)
        if code == _STRING:
            return self.string(what)
        if code != _ARRAY or depth >= MAX_DEPTH:
            raise _Damaged(f"{what} at byte {self.pos} has value type {code}, which GGUF does not define")
        item, n = self.scalar(_U32, what), self.scalar(_U64, what)
        smallest = struct.calcsize(_SCALARS[item]) if item in _SCALARS else 8
        if n * smallest > self.size - self.pos:
            raise _Damaged(f"{what} claims {n} items, more than the rest of the file holds")
        for _ in range(n):
            self.value(item, what, depth + 1)
        return n


def _directory(c: _Cursor) -> tuple[int, dict[str, object], dict[str, tuple[tuple[int, ...], int, int]]]:
    """(version, metadata, name -> (dims, ggml type, offset)) after the magic."""
    version = c.scalar(_U32, "the version")
    if version not in VERSIONS:
        swapped = struct.unpack(">I", struct.pack("<I", version))[0]
        raise GgufError("big-endian GGUF files are not supported" if swapped in VERSIONS else
                        f"GGUF version {version} is not supported (only {', '.join(map(str, VERSIONS))})")
    n_tensors, n_kv = c.scalar(_U64, "the tensor count"), c.scalar(_U64, "the key/value count")
    if (n_tensors + n_kv) * 16 > c.size:
        raise _Damaged(f"the header claims {n_tensors} tensors and {n_kv} keys, more than {c.size} bytes hold")
    meta: dict[str, object] = {}
    for i in range(n_kv):
        key = c.string(f"key {i + 1} of {n_kv}", MAX_NAME)
        meta[key] = c.value(c.scalar(_U32, f"the type of {key}"), key)
    tensors = {}
    for i in range(n_tensors):
        name = c.string(f"tensor name {i + 1} of {n_tensors}", MAX_NAME)
        n_dims = c.scalar(_U32, f"tensor {name}")
        if not 1 <= n_dims <= 4:
            raise _Damaged(f"tensor {name} has {n_dims} dimensions")
        dims = tuple(c.scalar(_U64, f"tensor {name}") for _ in range(n_dims))
        tensors[name] = (dims, c.scalar(_U32, f"tensor {name}"), c.scalar(_U64, f"tensor {name}"))
    return version, meta, tensors


def read_header(f: BinaryIO, size: int, where: str) -> GgufHeader:
    """Parse the header of the GGUF stream `f` (`size` bytes) and check that the file holds every
    tensor's data. Raises GgufError, its message one line starting with `where`."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType   # numpy, no torch

    magic = f.read(4)
    if magic != MAGIC:
        raise GgufError(f"{where}: not a GGUF file (starts with {magic!r}, expected {MAGIC!r})")
    c = _Cursor(f, size)
    c.pos = 4
    try:
        version, meta, entries = _directory(c)
    except _Damaged as e:
        raise GgufError(f"{where}: damaged GGUF header ({e}); the file is truncated or corrupt") from None
    except GgufError as e:
        raise GgufError(f"{where}: {e}") from None
    align = meta.get("general.alignment", 32)
    if not isinstance(align, int) or isinstance(align, bool) or align <= 0:
        raise GgufError(f"{where}: damaged GGUF header (general.alignment is {align!r})")
    data_start = -(-c.pos // align) * align
    tensors = {}
    for name, (dims, kind, offset) in entries.items():
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            raise GgufError(f"{where}: tensor {name} has ggml type {kind}, which this reader does not know") from None
        end = data_start + offset + math.prod(dims) // block * type_size
        if dims[0] % block or end > size:
            raise GgufError(f"{where}: the file is truncated or corrupt: tensor {name} {list(dims)} would end at "
                            f"byte {end}, the file has {size}")
        tensors[name] = (dims, kind)
    return GgufHeader(version, meta, tensors)


def _positive(meta: dict[str, object], key: str, where: str) -> int:
    v = meta.get(key)
    if v is None:
        raise GgufError(f"{where}: the GGUF metadata has no {key}")
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise GgufError(f"{where}: the GGUF metadata's {key} is {v!r}, not a positive integer")
    return v


def expected_tensors(h: GgufHeader, where: str) -> dict[str, tuple[int, ...]]:
    """Every tensor a Llama-family forward needs, with the shape (ne0 first) the metadata implies."""
    arch, m = h.architecture, h.metadata
    d, layers = _positive(m, f"{arch}.embedding_length", where), _positive(m, f"{arch}.block_count", where)
    heads, ffn = _positive(m, f"{arch}.attention.head_count", where), _positive(m, f"{arch}.feed_forward_length", where)
    vocab = _positive(m, "tokenizer.ggml.tokens", where)          # the token list's length
    kv_heads = _positive(m, f"{arch}.attention.head_count_kv", where) if f"{arch}.attention.head_count_kv" in m \
        else heads
    head_dim = _positive(m, f"{arch}.attention.key_length", where) if f"{arch}.attention.key_length" in m \
        else d // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    per_layer = {"attn_norm": (d,), "ffn_norm": (d,), "attn_q": (d, q), "attn_k": (d, kv), "attn_v": (d, kv),
                 "attn_output": (q, d), "ffn_gate": (d, ffn), "ffn_up": (d, ffn), "ffn_down": (ffn, d)}
    want = {"token_embd.weight": (d, vocab), "output_norm.weight": (d,)}
    for i in range(layers):
        want.update({f"blk.{i}.{t}.weight": per_layer[t] for t in _LAYER_TENSORS})
    if "output.weight" in h.tensors:                               # absent: tied to the embeddings
        want["output.weight"] = (d, vocab)
    return want


def check_llama_family(h: GgufHeader, where: str) -> None:
    """Refuse a GGUF that would not convert into a complete model we serve: another architecture,
    no tokenizer, shape metadata missing, or a tensor missing or of another shape (transformers
    would initialise it at random, or print a long load report and fail)."""
    if h.architecture not in ARCHITECTURES:
        raise GgufError(f"{where}: general.architecture is {h.architecture!r}; lorafleet serves Llama-family "
                        f"models ({', '.join(ARCHITECTURES)})")
    if not isinstance(h.metadata.get("tokenizer.ggml.model"), str):
        raise GgufError(f"{where}: the GGUF metadata has no tokenizer (tokenizer.ggml.model)")
    for name, shape in expected_tensors(h, where).items():
        if name not in h.tensors:
            raise GgufError(f"{where}: tensor {name} is missing (a complete {h.architecture} model has it)")
        if h.tensors[name][0] != shape:
            raise GgufError(f"{where}: tensor {name} has shape {list(h.tensors[name][0])}; the metadata implies "
                            f"{list(shape)}")


def check_stream(f: BinaryIO, size: int, where: str) -> GgufHeader:
    """read_header + check_llama_family."""
    header = read_header(f, size, where)
    check_llama_family(header, where)
    return header


def check_file(path: Path, where: str | None = None) -> GgufHeader:
    """The header of a .gguf file, refused (GgufError) unless it describes a complete model we serve."""
    with open(path, "rb") as f:
        return check_stream(f, os.fstat(f.fileno()).st_size, where or str(path))
