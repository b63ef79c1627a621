"""One step's work and its batch: the scheduler's `Segment`s, turned into the model's `ForwardBatch`
(built once per step)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from server.model.llama import ForwardBatch

if TYPE_CHECKING:
    from server.engine.sequence import Sequence


@dataclass(frozen=True)
class Segment:
    """A run of consecutive tokens of one sequence in one step: what the scheduler hands out and
    what the batch is built from."""
    kv_slot: int              # KV slot of the sequence
    token_ids: list[int]      # tokens to run this step (1 for decode, a chunk for prefill)
    first_pos: int            # position of token_ids[0] in the sequence (after virtual tokens)
    want_logits: bool         # return logits for the last token (the step ends the prefill, or decodes)
    seq: Sequence | None = None   # the request it runs; None for a bare forward (tests, calibration)


def make_forward_batch(segments: list[Segment], device: torch.device) -> ForwardBatch:
    """The step's `ForwardBatch`: segments' tokens flattened in order, rows of one-token segments
    as decode rows, the others as prefill chunks padded to the longest."""
    ids, pos, kv_slots, logit_rows = [], [], [], []
    decode, prefill = [], []                      # (first row, segment)
    for s in segments:
        row, n = len(ids), len(s.token_ids)
        ids.extend(s.token_ids)
        pos.extend(range(s.first_pos, s.first_pos + n))
        kv_slots.extend([s.kv_slot] * n)
        if s.want_logits:
            logit_rows.append(row + n - 1)
        (decode if n == 1 else prefill).append((row, s))

    def longs(xs: list[int]) -> torch.Tensor:
        return torch.tensor(xs, dtype=torch.long, device=device)

    dec_kv = [s.kv_slot for _, s in decode]
    dec_lens = longs([s.first_pos + 1 for _, s in decode])
    consecutive = bool(decode) and dec_kv == list(range(dec_kv[0], dec_kv[0] + len(dec_kv)))
    dec_mask = torch.arange(int(dec_lens.max()) if decode else 0, device=device) < dec_lens[:, None]

    lq = max((len(s.token_ids) for _, s in prefill), default=0)
    lk = max((s.first_pos + len(s.token_ids) for _, s in prefill), default=0)
    p_rows = torch.zeros(len(prefill), lq, dtype=torch.long)
    p_valid = torch.zeros(len(prefill), lq, dtype=torch.bool)
    p_qpos = torch.zeros(len(prefill), lq, dtype=torch.long)
    for i, (row, s) in enumerate(prefill):
        n = len(s.token_ids)
        p_rows[i, :n] = torch.arange(row, row + n)
        p_rows[i, n:] = row + n - 1                           # padding re-reads the last query
        p_valid[i, :n] = True
        p_qpos[i] = s.first_pos + torch.arange(lq).clamp(max=n - 1)
    p_mask = torch.arange(lk)[None, None, :] <= p_qpos[:, :, None]   # [P, Lq, Lk]

    return ForwardBatch(
        input_ids=longs(ids), positions=longs(pos), token_kv_slots=longs(kv_slots), logit_rows=longs(logit_rows),
        decode_rows=longs([r for r, _ in decode]), decode_kv_slots=longs(dec_kv),
        decode_mask=dec_mask[:, None, None, :],
        decode_kv_range=(dec_kv[0], len(dec_kv)) if consecutive else None,
        decode_only=not prefill and bool(decode),
        prefill_rows=p_rows.to(device), prefill_valid=p_valid.to(device),
        prefill_kv_slots=longs([s.kv_slot for _, s in prefill]), prefill_mask=p_mask[:, None].to(device))
