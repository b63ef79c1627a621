"""Greedy decoding with an AdapterModule: exact-match evaluation and the reference the server is checked against.

Recomputes the whole sequence at every step (the oracle way: no cache to get wrong). LoRA, IA3 and
bottleneck rows are batched left-padded (RoPE is relative, so a constant shift of a row changes nothing).
Prefix and prompt tuning rows run one at a time: their virtual positions sit before the padding, so
left padding would change the distance between them and the real tokens.
"""
from __future__ import annotations

import torch

from trainer.data import Tokens
from trainer.methods import AdapterModule


@torch.no_grad()
def greedy(module: AdapterModule, tokens: Tokens, prompts: list[str], max_new_tokens: int) -> list[str]:
    """The greedy continuation of each prompt (BOS added as the server does), stopping at EOS."""
    if module.method in ("prefix", "prompt") and len(prompts) > 1:
        return [greedy(module, tokens, [p], max_new_tokens)[0] for p in prompts]
    rows = [tokens.tokenizer.encode(p).ids for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new_tokens):
        seqs = [r + o for r, o in zip(rows, out)]
        width = max(map(len, seqs))
        ids = torch.tensor([[tokens.pad_id] * (width - len(s)) + s for s in seqs])  # [B, T]
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])  # [B, T]
        nxt = module(ids, mask)[:, -1].argmax(-1).tolist()  # [B]
        for i, t in enumerate(nxt):
            if not done[i]:
                done[i] = t == tokens.eos_id
                if not done[i]:
                    out[i].append(t)
        if all(done):
            break
    return [tokens.tokenizer.decode(o) for o in out]
