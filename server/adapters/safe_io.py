"""Reading untrusted bytes without trusting them: JSON objects (no duplicate keys, no NaN
constants, bounded errors) and safetensors files (header length, entry count, dtypes and
offsets checked by our code before the library parses anything; tensors converted to float32
and rejected when not finite). No pickle, ever. The adapter rules built on these are in
`validate.py`.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_safetensors

from lorafleet.archive import WEIGHTS_FILE
from server.errors import InvalidArgument, ResourceExhausted

DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}


# ---------------------------------------------------------------- JSON

def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise InvalidArgument("JSON object has duplicate keys")
    return out


def _reject_constant(name: str) -> None:
    raise InvalidArgument(f"JSON contains {name}, which is not valid JSON")


def load_json_object(data: bytes, what: str) -> dict:
    try:
        value = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates,
                           parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # bad UTF-8 / JSON, ints over 4300 digits, deep nesting
        raise InvalidArgument(f"{what} is not valid UTF-8 JSON ({str(e)[:120]})") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------- safetensors header

@dataclass(frozen=True)
class TensorHeader:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offset into the data section
    end: int


def read_safetensors_header(data: bytes, max_tensors: int) -> dict[str, TensorHeader]:
    """Parse and check the header ourselves: length, entries, dtypes, offsets vs dtype x shape."""
    if len(data) < 8:
        raise InvalidArgument(f"{WEIGHTS_FILE} is {len(data)} bytes, too short for safetensors")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise InvalidArgument(f"safetensors header claims {header_len} bytes but the file has {len(data) - 8} "
                              "after the length field (truncated, or not a safetensors file)")
    header_cap = 4096 + 512 * max_tensors
    if header_len > header_cap:
        raise ResourceExhausted(f"safetensors header is {header_len} bytes; the limit is {header_cap}")
    raw = load_json_object(data[8:8 + header_len], "safetensors header")
    meta = raw.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise InvalidArgument("safetensors __metadata__ must map strings to strings")
    if len(raw) > max_tensors:
        raise ResourceExhausted(f"adapter has {len(raw)} tensors; the limit is {max_tensors}")
    entries = {name: _header_entry(name, value) for name, value in raw.items()}
    _check_offsets(entries, len(data) - 8 - header_len)
    return entries


def _header_entry(name: str, value: object) -> TensorHeader:
    bad = f"safetensors entry {name[:100]!r} "
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data_offsets"}:
        raise InvalidArgument(bad + "must hold exactly dtype, shape and data_offsets")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if dtype not in DTYPES:
        raise InvalidArgument(bad + f"has dtype {str(dtype)[:10]}; accepted: {', '.join(DTYPES)}")
    if not (isinstance(shape, list) and len(shape) <= 4 and all(_is_count(d) for d in shape)):
        raise InvalidArgument(bad + "has an invalid shape (expected up to 4 non-negative integers)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise InvalidArgument(bad + "has invalid data_offsets (expected [begin, end])")
    return TensorHeader(dtype, tuple(shape), offsets[0], offsets[1])


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 53


def _check_offsets(entries: dict[str, TensorHeader], data_len: int) -> None:
    position = 0
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if e.begin != position:
            raise InvalidArgument(f"safetensors entry {name[:100]!r} starts at {e.begin}, expected {position}: "
                                  "offsets overlap or leave gaps")
        if e.end - e.begin != math.prod(e.shape) * DTYPES[e.dtype]:
            raise InvalidArgument(f"safetensors entry {name[:100]!r} spans {e.end - e.begin} bytes but "
                                  f"{e.dtype} x {list(e.shape)} needs {math.prod(e.shape) * DTYPES[e.dtype]}")
        position = e.end
    if position != data_len:
        raise InvalidArgument(f"safetensors data section is {data_len} bytes but the tensors cover {position}")


# ---------------------------------------------------------------- tensors

def load_tensors(weights: bytes, max_abs: float = float("inf")) -> dict[str, torch.Tensor]:
    """safetensors bytes (header already checked) -> float32 CPU tensors; NaN/Inf, and any value
    of magnitude above `max_abs`, rejected."""
    try:
        raw = load_safetensors(weights)
    except Exception as e:  # the checked header makes this unlikely; never let it escape as INTERNAL
        raise InvalidArgument(f"{WEIGHTS_FILE} could not be read ({str(e)[:120]})") from None
    out = {}
    for name, t in raw.items():
        t = t.to(torch.float32).contiguous()  # F64 values beyond float32 range become Inf and are rejected
        if not bool(torch.isfinite(t).all()):
            raise InvalidArgument(f"tensor {name} contains NaN or Inf")
        biggest = float(t.abs().max()) if t.numel() else 0.0
        if biggest > max_abs:
            raise InvalidArgument(f"tensor {name} holds a value of magnitude {biggest:.3g}; this server accepts "
                                  f"adapter values up to {max_abs:.3g} (see the README, 'Adapter value bounds')")
        out[name] = t
    return out
