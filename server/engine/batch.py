"""Turn the scheduler's choice for one step into the model's `ForwardBatch` (built once per step)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from server.model.llama import ForwardBatch


@dataclass(frozen=True)
class Segment:
    slot: int                 # KV slot of the sequence
    token_ids: list[int]      # tokens to run this step (1 for decode, a chunk for prefill)
    first_pos: int            # position of token_ids[0] in the sequence (after virtual tokens)
    want_logits: bool         # return logits for the last token


def make_forward_batch(segments: list[Segment], device: torch.device) -> ForwardBatch:
    ids, pos, slots, logit_rows = [], [], [], []
    dec_rows, dec_slots, dec_lens, prefill = [], [], [], []
    for s in segments:
        row, n = len(ids), len(s.token_ids)
        ids.extend(s.token_ids)
        pos.extend(range(s.first_pos, s.first_pos + n))
        slots.extend([s.slot] * n)
        if s.want_logits:
            logit_rows.append(row + n - 1)
        if n == 1:
            dec_rows.append(row)
            dec_slots.append(s.slot)
            dec_lens.append(s.first_pos + 1)
        else:
            prefill.append((s.slot, row, n, s.first_pos))

    def lt(xs: list[int]) -> torch.Tensor:
        return torch.tensor(xs, dtype=torch.long, device=device)

    return ForwardBatch(
        input_ids=lt(ids), positions=lt(pos), token_slots=lt(slots), logit_rows=lt(logit_rows),
        decode_rows=lt(dec_rows), decode_slots=lt(dec_slots), decode_lens=lt(dec_lens),
        max_decode_len=max(dec_lens, default=0), prefill=tuple(prefill))
