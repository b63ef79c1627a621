"""Device adapter slots: the stacked tensors the batched kernels read, and the per-step hooks.

Every resident adapter occupies one slot `s` (the tiered cache decides which). A slot holds the
adapter in the form its kind needs:

  LoRA        per layer: packed q/k/v  A_qkv [S, 3r, d] + B_q/B_k/B_v, o, packed gate/up, down;
              rank r_s per slot (modules of smaller rank are zero-padded up to r_s). B (and the
              bottleneck's U) are stored transposed, [S, r, d_out] contiguous, and handed to the
              kernels as [S, d_out, r] views: the expand bmm then reads contiguous rows.
  IA3         per layer: output scales of q/k/v (fused), o, gate/up (fused), down; input scales
              of o and down (PEFT's feedforward modules); 1 where the adapter has none
  Bottleneck  per layer and place (attn | mlp): D [S, r, d], U [S, d, r], biases, activation id
  Prefix      prefix K/V [layers, 2, kv_heads, n, hd], copied into a sequence's KV slot at admission
  Prompt      virtual-token embeddings [n, d], swapped into the input embeddings at prefill
  Head        classification head (weight [labels, d], bias, label names), any kind may carry one

`StepAdapters` is built once per step from each row's slot and passed to the forward as its
hooks (no per-step state lives on the model or on this store).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from server import kernels
from server.adapters.formats import AdapterKind, AdapterWeights, ClassificationHead
from server.errors import FailedPrecondition
from server.model.llama import ModelArgs

ACT_ID = {"relu": 0, "gelu": 1, "silu": 2}
# each Llama linear -> (fused target of the forward, its position in that target's output)
MODULE_TARGET = {"q_proj": ("qkv", 0), "k_proj": ("qkv", 1), "v_proj": ("qkv", 2), "o_proj": ("o", 0),
                 "gate_proj": ("gate_up", 0), "up_proj": ("gate_up", 1), "down_proj": ("down", 0)}
IA3_IN = {"o_proj": "o", "down_proj": "down"}


@dataclass
class SlotInfo:
    kind: AdapterKind
    prefix_kv: torch.Tensor | None        # [layers, 2, kv_heads, n, hd] (device)
    prompt_embeds: torch.Tensor | None    # [n, dim] (device)
    head: ClassificationHead | None       # float32, CPU


class AdapterSlots:
    def __init__(self, args: ModelArgs, num_slots: int, max_rank: int, device: torch.device,
                 dtype: torch.dtype):
        self.args, self.num_slots, self.r = args, num_slots, max_rank
        self.device, self.dtype = device, dtype
        S, r, d, f = num_slots, max_rank, args.dim, args.intermediate_size
        q, kv = args.q_size, args.kv_size
        self.out_dims = {"qkv": (q, kv, kv), "o": (d,), "gate_up": (f, f), "down": (d,)}
        self.in_dims = {"qkv": d, "o": q, "gate_up": d, "down": f}
        starts = {t: [sum(outs[:i]) for i in range(len(outs))] for t, outs in self.out_dims.items()}
        self.out_slices = {t: [slice(a, a + o) for a, o in zip(starts[t], outs)]   # columns of each
                           for t, outs in self.out_dims.items()}                      # part of a fused output

        def z(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, device=device, dtype=dtype)

        def ones(*shape: int) -> torch.Tensor:
            return torch.ones(shape, device=device, dtype=dtype)

        self.lora_rank = torch.zeros(S, dtype=torch.long, device=device)
        self.lora = [{t: (z(S, len(outs) * r, self.in_dims[t]), [z(S, r, o).transpose(1, 2) for o in outs],
                          [z(S) for _ in outs]) for t, outs in self.out_dims.items()}
                     for _ in range(args.n_layers)]
        self.ia3_out = [{t: ones(S, sum(outs)) for t, outs in self.out_dims.items()}
                        for _ in range(args.n_layers)]
        self.ia3_in = [{t: ones(S, self.in_dims[t]) for t in ("o", "down")} for _ in range(args.n_layers)]
        self.bn_rank = torch.zeros(S, dtype=torch.long, device=device)
        self.bn_act = torch.zeros(S, dtype=torch.long, device=device)
        self.bn = [{p: (z(S, r, d), z(S, r, d).transpose(1, 2), z(S, r), z(S, d)) for p in ("attn", "mlp")}
                   for _ in range(args.n_layers)]
        self.info: list[SlotInfo | None] = [None] * S
        self.ones_rank = torch.ones(S, dtype=torch.long, device=device)
        self.lora_targets: list[frozenset[str]] = [frozenset()] * S   # targets a slot's LoRA touches

    # ------------------------------------------------------------------ writing a slot
    def write(self, slot: int, w: AdapterWeights) -> None:
        """Copy one adapter into `slot` (the tiered cache's write_slot). Engine thread only."""
        if w.rank > self.r:
            raise FailedPrecondition(f"adapter rank {w.rank} exceeds this server's slot rank {self.r}")
        self._clear(slot)
        dev = dict(device=self.device, dtype=self.dtype)
        if w.kind is AdapterKind.LORA:
            self._write_lora(slot, w)
        elif w.kind is AdapterKind.IA3:
            self._write_ia3(slot, w)
        elif w.kind is AdapterKind.BOTTLENECK:
            self._write_bottleneck(slot, w)
        self.info[slot] = SlotInfo(
            w.kind,
            w.prefix_kv.to(**dev) if w.prefix_kv is not None else None,
            w.prompt_embeds.to(**dev) if w.prompt_embeds is not None else None,
            w.head)

    def _clear(self, slot: int) -> None:
        for layer in self.lora:
            for A, Bs, scales in layer.values():
                A[slot].zero_()
                for B, s in zip(Bs, scales):
                    B[slot].zero_()
                    s[slot] = 0
        for layer in self.ia3_out + self.ia3_in:
            for v in layer.values():
                v[slot] = 1
        for layer in self.bn:
            for t in layer.values():
                for x in t:
                    x[slot].zero_()
        self.lora_rank[slot] = self.bn_rank[slot] = self.bn_act[slot] = 0
        self.lora_targets[slot] = frozenset()
        self.info[slot] = None

    def _write_lora(self, slot: int, w: AdapterWeights) -> None:
        rank = max(t.A.shape[0] for t in w.lora.values())
        for (layer, module), t in w.lora.items():
            target, i = MODULE_TARGET[module]
            A, Bs, scales = self.lora[layer][target]
            r = t.A.shape[0]
            A[slot, i * self.r:i * self.r + r] = t.A
            Bs[i][slot, :, :r] = t.B
            scales[i][slot] = t.scale
        self.lora_rank[slot] = rank
        self.lora_targets[slot] = frozenset(MODULE_TARGET[m][0] for _, m in w.lora)

    def _write_ia3(self, slot: int, w: AdapterWeights) -> None:
        for (layer, module), t in w.ia3.items():
            if t.on_input:
                if module not in IA3_IN:
                    raise FailedPrecondition(
                        f"IA3 input scaling (feedforward_modules) is served on o_proj and down_proj "
                        f"only, not {module}")
                self.ia3_in[layer][IA3_IN[module]][slot] = t.vec
            else:
                target, i = MODULE_TARGET[module]
                self.ia3_out[layer][target][slot, self.out_slices[target][i]] = t.vec

    def _write_bottleneck(self, slot: int, w: AdapterWeights) -> None:
        acts = {t.activation for t in w.bottleneck.values()}
        if len(acts) != 1:
            raise FailedPrecondition("a bottleneck adapter must use one activation throughout")
        for (layer, place), t in w.bottleneck.items():
            D, U, bd, bu = self.bn[layer][place]
            r = t.down.shape[0]
            D[slot, :r] = t.down
            U[slot, :, :r] = t.up
            if t.down_bias is not None:
                bd[slot, :r] = t.down_bias
            if t.up_bias is not None:
                bu[slot] = t.up_bias
        self.bn_rank[slot] = w.rank
        self.bn_act[slot] = ACT_ID[acts.pop()]

    # ------------------------------------------------------------------ per step
    def step(self, token_slots: list[int], prompt_rows: list[tuple[int, int, int]]) -> "StepAdapters":
        """token_slots [T]: each row's adapter slot or -1; prompt_rows: (row, slot, virtual index)
        for rows that carry a prompt-tuning virtual token."""
        kinds = [self.info[s].kind if s >= 0 else None for s in token_slots]

        def plan(kind: AdapterKind, ranks: torch.Tensor) -> kernels.AdapterPlan | None:
            sl = [s if k is kind else -1 for s, k in zip(token_slots, kinds)]
            if all(s < 0 for s in sl):
                return None
            return kernels.make_plan(torch.tensor(sl, dtype=torch.long, device=self.device), ranks)

        lora_targets = frozenset().union(*(self.lora_targets[s] for s, k in zip(token_slots, kinds)
                                           if k is AdapterKind.LORA))
        prompt = None
        if prompt_rows:
            rows = torch.tensor([r for r, _, _ in prompt_rows], dtype=torch.long, device=self.device)
            vals = torch.stack([self.info[s].prompt_embeds[i] for _, s, i in prompt_rows])
            prompt = (rows, vals)
        return StepAdapters(self, plan(AdapterKind.LORA, self.lora_rank), lora_targets,
                            plan(AdapterKind.IA3, self.ones_rank),
                            plan(AdapterKind.BOTTLENECK, self.bn_rank), prompt)


@dataclass(frozen=True)
class StepAdapters:
    """The model's AdapterHooks for one step."""
    store: AdapterSlots
    lora: kernels.AdapterPlan | None
    lora_targets: frozenset[str]          # targets some LoRA row of this step touches
    ia3: kernels.AdapterPlan | None
    bn: kernels.AdapterPlan | None
    prompt: tuple[torch.Tensor, torch.Tensor] | None   # rows [V], embeddings [V, dim]

    def embed(self, h: torch.Tensor) -> torch.Tensor:
        if self.prompt is not None:
            h = h.clone()
            h[self.prompt[0]] = self.prompt[1]
        return h

    def pre_linear(self, layer: int, target: str, x: torch.Tensor) -> torch.Tensor:
        if self.ia3 is not None and target in ("o", "down"):
            x = x.clone()
            kernels.ia3(x, self.store.ia3_in[layer][target], self.ia3)
        return x

    def post_linear(self, layer: int, target: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.lora is not None and target in self.lora_targets:
            A, Bs, scales = self.store.lora[layer][target]
            if len(Bs) == 1:
                kernels.lora(y, x, A, Bs[0], scales[0], self.lora)
            else:
                kernels.lora_packed(y, x, A, Bs, scales, self.store.out_slices[target], self.lora)
        if self.ia3 is not None:
            kernels.ia3(y, self.store.ia3_out[layer][target], self.ia3)
        return y

    def block_out(self, layer: int, place: str, h: torch.Tensor) -> torch.Tensor:
        if self.bn is not None:
            D, U, bd, bu = self.store.bn[layer][place]
            kernels.bottleneck(h, D, U, bd, bu, self.store.bn_act, self.bn)
        return h
