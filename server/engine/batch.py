"""One step's work and its batch: the scheduler's `Segment`s, turned into the model's `ForwardBatch`
(built once per step)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from server.engine.kv_cache import NULL_BLOCK
from server.model.llama import ForwardBatch

if TYPE_CHECKING:
    from server.engine.sequence import Sequence


@dataclass(frozen=True)
class Segment:
    """A run of consecutive tokens of one sequence in one step: what the scheduler hands out and
    what the batch is built from."""
    block_table: list[int]    # KV blocks of the sequence (position p in block_table[p // block_size])
    token_ids: list[int]      # tokens to run this step (1 for decode, a chunk for prefill)
    first_pos: int            # position of token_ids[0] in the sequence (after virtual tokens)
    want_logits: bool         # return logits for the last token (the step ends the prefill, or decodes)
    seq: Sequence | None = None   # the request it runs; None for a bare forward (tests, calibration)


def make_forward_batch(segments: list[Segment], device: torch.device, block_size: int) -> ForwardBatch:
    """The step's `ForwardBatch`: segments' tokens flattened in order, rows of one-token segments
    as decode rows, the others as prefill chunks padded to the longest; block tables padded with
    the null block to the longest of their group."""
    ids, pos, slots, logit_rows = [], [], [], []
    decode, prefill = [], []                      # (first row, segment)
    bs = block_size
    for s in segments:
        row, n = len(ids), len(s.token_ids)
        end = s.first_pos + n
        if len(s.block_table) * bs < end:
            raise ValueError(f"block table of {len(s.block_table)} blocks cannot hold position {end - 1}")
        ids.extend(s.token_ids)
        positions = range(s.first_pos, end)
        pos.extend(positions)
        slots.extend(s.block_table[p // bs] * bs + p % bs for p in positions)
        if s.want_logits:
            logit_rows.append(row + n - 1)
        (decode if n == 1 else prefill).append((row, s))

    def longs(xs: list[int]) -> torch.Tensor:
        return torch.tensor(xs, dtype=torch.long, device=device)

    def tables(group: list[tuple[int, Segment]]) -> tuple[list[list[int]], int]:
        need = [-(-(s.first_pos + len(s.token_ids)) // bs) for _, s in group]
        width = max(need, default=0)
        return [s.block_table[:k] + [NULL_BLOCK] * (width - k) for (_, s), k in zip(group, need)], width

    dec_tables, dec_width = tables(decode)
    views = _even_runs(dec_tables, dec_width)
    dec_lens = torch.tensor([s.first_pos + 1 for _, s in decode], dtype=torch.long)
    dec_mask = torch.arange(dec_width * bs) < dec_lens[:, None]                   # [B, Nd * bs]

    pre_tables, pre_width = tables(prefill)
    lq = max((len(s.token_ids) for _, s in prefill), default=0)
    p_rows = torch.zeros(len(prefill), lq, dtype=torch.long)
    p_valid = torch.zeros(len(prefill), lq, dtype=torch.bool)
    p_qpos = torch.zeros(len(prefill), lq, dtype=torch.long)
    for i, (row, s) in enumerate(prefill):
        n = len(s.token_ids)
        p_rows[i, :n] = torch.arange(row, row + n)
        p_rows[i, n:] = row + n - 1                           # padding re-reads the last query
        p_valid[i, :n] = True
        p_qpos[i] = s.first_pos + torch.arange(lq).clamp(max=n - 1)
    p_mask = torch.arange(pre_width * bs)[None, None, :] <= p_qpos[:, :, None]   # [P, Lq, Np * bs]

    return ForwardBatch(
        input_ids=longs(ids), positions=longs(pos), slot_mapping=longs(slots), logit_rows=longs(logit_rows),
        decode_rows=longs([r for r, _ in decode]),
        decode_blocks=torch.tensor(dec_tables, dtype=torch.long).view(len(decode), dec_width).to(device),
        decode_mask=dec_mask.to(device), decode_views=views, decode_only=not prefill and bool(decode),
        prefill_rows=p_rows.to(device), prefill_valid=p_valid.to(device),
        prefill_blocks=torch.tensor(pre_tables, dtype=torch.long).view(len(prefill), pre_width).to(device),
        prefill_mask=p_mask[:, None].to(device))


MAX_VIEW_GROUPS = 4          # decode rows read in place in at most this many strided views; else gathered


def _even_runs(tables: list[list[int]], width: int) -> tuple[tuple[int, int, int, int], ...] | None:
    """When every row's table is `width` contiguous blocks (no null padding): the rows cut into at
    most MAX_VIEW_GROUPS consecutive groups whose tables start evenly spaced (stride >= width),
    each (first row, rows, first block, stride in blocks): each group's K/V is one strided view of
    the pool, read in place. None otherwise (gathered)."""
    if not tables or width == 0:
        return None
    for t in tables:
        if t[0] == NULL_BLOCK or t[-1] - t[0] != width - 1 or any(y - x != 1 for x, y in zip(t, t[1:])):
            return None
    groups: list[tuple[int, int, int, int]] = []
    row = 0
    while row < len(tables):
        first, end = tables[row][0], row + 1
        stride = tables[end][0] - first if end < len(tables) else width
        if stride < width:
            stride = width                                 # the next row starts a group of its own
        else:
            while end < len(tables) and tables[end][0] - tables[end - 1][0] == stride:
                end += 1
        groups.append((row, end - row, first, stride))
        if len(groups) > MAX_VIEW_GROUPS:
            return None
        row = end
    return tuple(groups)
