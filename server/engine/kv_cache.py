"""KV storage and slot allocation: one preallocated `[slots, kv_heads, max_len, head_dim]`
pair of tensors per layer; a sequence owns one slot from admission until it finishes."""
from __future__ import annotations

import torch

from server.model.llama import ModelArgs


class KVCache:
    def __init__(self, args: ModelArgs, num_slots: int, max_len: int, device: torch.device,
                 dtype: torch.dtype):
        shape = (num_slots, args.n_kv_heads, max_len, args.head_dim)
        self.layers = [(torch.zeros(shape, device=device, dtype=dtype),
                        torch.zeros(shape, device=device, dtype=dtype)) for _ in range(args.n_layers)]
        self.num_slots, self.max_len = num_slots, max_len
        self._free = list(range(num_slots - 1, -1, -1))

    def allocate(self) -> int | None:
        """A free slot, or None when every slot is taken."""
        return self._free.pop() if self._free else None

    def release(self, slot: int) -> None:
        assert slot not in self._free, f"slot {slot} released twice"
        self._free.append(slot)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of slots in use, 0..1."""
        return 1.0 - len(self._free) / self.num_slots
