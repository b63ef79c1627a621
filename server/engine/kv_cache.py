"""KV storage and KV slot allocation: one preallocated `[kv_slots, num_kv_heads, max_len, head_dim]`
pair of tensors per layer; a sequence owns one KV slot from admission until it finishes."""
from __future__ import annotations

import torch

from server.model.shape import BaseModelShape


class KVCache:
    def __init__(self, shape: BaseModelShape, num_slots: int, max_len: int, device: torch.device,
                 dtype: torch.dtype):
        size = (num_slots, shape.num_kv_heads, max_len, shape.head_dim)
        self.layers = [(torch.zeros(size, device=device, dtype=dtype),                 # k, v [S, Hkv, L, hd]
                        torch.zeros(size, device=device, dtype=dtype)) for _ in range(shape.num_layers)]
        self.num_slots, self.max_len = num_slots, max_len
        self._free = list(range(num_slots - 1, -1, -1))

    def allocate(self) -> int | None:
        """A free KV slot, or None when every one is taken."""
        return self._free.pop() if self._free else None

    def release(self, kv_slot: int) -> None:
        assert kv_slot not in self._free, f"KV slot {kv_slot} released twice"
        self._free.append(kv_slot)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of slots in use, 0..1."""
        return 1.0 - len(self._free) / self.num_slots
