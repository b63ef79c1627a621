"""Device adapter slots: the stacked tensors the batched kernels read, and the per-step hooks.

Every resident adapter occupies one slot `s` (the tiered cache decides which). A slot holds the
adapter in the form its kind needs, in typed stacks (one per layer and fused target or place):

  LoraStack    LoRA, DoRA, AdaLoRA and VeRA (the last two folded to LoRA factors at parse): packed
               A [S, n*r, d_in] and one B per part of the fused target (q/k/v, gate/up) (S, r: the
               capacity and rank bucket grown so far, `AdapterSlots._grow`); rank r_s
               per slot (modules of smaller rank are zero-padded up to r_s). B (and the
               bottleneck's U) are stored transposed, [S, r, d_out] contiguous, and handed to the
               kernels as [S, d_out, r] views: the expand bmm then reads contiguous rows.
  ColumnAffine per-slot output column scale and shift, y = scale * y + shift, applied after the
               LoRA add: DoRA's scale g = m / ||W + s B A||_row (computed here at write time from
               the frozen base weight; shift (1 - g) * b0 where the base linear has a bias b0),
               and LoRA bias (scale 1, shift s * b). 1 and 0 where a slot has none.
  Ia3Stack     output scales of q/k/v (fused), o, gate/up (fused), down; input scales of o and
               down (PEFT's feedforward modules); 1 where the adapter has none
  BottleneckStack  per layer and place (attn | mlp): D [S, r, d], U [S, d, r], biases
  Prefix       prefix K/V [layers, 2, kv_heads, n, hd], written into a sequence's first KV positions at admission
  Prompt       virtual-token embeddings [n, d], swapped into the input embeddings at prefill
  Head         classification head (weight [labels, d], bias, label names), any kind may carry one

Fused targets, their parts and the LayerWeights field of each: `server.model.shape` (LINEARS).

`StepAdapters` is built once per step from each row's adapter slot and passed to the forward as
its hooks (no per-step state lives on the model or on this store). Its plans are made from the
host-side row -> adapter slot lists (one host->device copy per plan, nothing read back), each
with only the layouts the chosen kernels read (`kernels.layouts`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from server import kernels
from server.adapters.peft_variants import dora_scale
from server.adapters.weights import LORA_FAMILY, AdapterKind, AdapterWeights, ClassificationHead
from server.errors import FailedPrecondition
from server.kernels.activation import Activation
from server.model.llama import LayerWeights
from server.model.shape import MODULES, TARGET_WEIGHT, TARGETS, UNFUSED, BaseModelShape

IA3_IN = UNFUSED   # IA3 input scales are served where a module is its target alone (o_proj, down_proj)


@dataclass(frozen=True)
class LoraStack:
    """LoRA factors of one fused target for every slot (n parts: 3 for q/k/v, 2 for gate/up)."""
    A: torch.Tensor                  # [S, n * r_max, d_in], part i owns rank rows [i*r_max, (i+1)*r_max)
    B: list[torch.Tensor]            # n x [S, d_out_i, r_max] (views of contiguous [S, r_max, d_out_i])
    scale: list[torch.Tensor]        # n x [S]


@dataclass(frozen=True)
class ColumnAffine:
    """Per-slot column scale and shift of one fused target's output: y = scale * y + shift
    (DoRA's magnitude / norm, the shift of a base bias under it, a LoRA bias)."""
    scale: torch.Tensor              # [S, sum(d_out_i)], 1 where a slot has no DoRA
    shift: torch.Tensor              # [S, sum(d_out_i)], 0 where a slot has no bias term


@dataclass(frozen=True)
class Ia3Stack:
    """IA3 scales of one fused target for every slot."""
    out: torch.Tensor                # [S, sum(d_out_i)] output scales, 1 where none
    inp: torch.Tensor | None         # [S, d_in] input scales (targets o and down only), 1 where none


@dataclass(frozen=True)
class BottleneckStack:
    """Bottleneck adapters of one place (attn | mlp) for every slot."""
    D: torch.Tensor                  # [S, r_max, d] down projection
    U: torch.Tensor                  # [S, d, r_max] up projection (view of contiguous [S, r_max, d])
    bd: torch.Tensor                 # [S, r_max] down bias, 0 where none
    bu: torch.Tensor                 # [S, d] up bias, 0 where none


@dataclass
class SlotInfo:
    kind: AdapterKind
    prefix_kv: torch.Tensor | None        # [layers, 2, kv_heads, n, hd] (device)
    prompt_embeds: torch.Tensor | None    # [n, hidden] (device)
    head: ClassificationHead | None       # float32, CPU


MIN_RANK_BUCKET = 8     # the smallest rank the stacks are sized for once an adapter with a rank arrives


def rank_bucket(rank: int, max_rank: int) -> int:
    """The stack rank that holds `rank`: the next power of two, at least MIN_RANK_BUCKET, at most max_rank."""
    return min(max_rank, max(MIN_RANK_BUCKET, 1 << max(rank - 1, 0).bit_length()))


class AdapterSlots:
    def __init__(self, shape: BaseModelShape, num_slots: int, max_rank: int, device: torch.device,
                 dtype: torch.dtype, base: Sequence[LayerWeights] | None = None, max_gain: float = float("inf")):
        """`base`: the frozen model's layers (LlamaModel.layers), read when a DoRA adapter is written
        (its scale depends on W); without them DoRA adapters are refused at write time. `max_gain`:
        the largest DoRA column scale accepted (validate.AdapterLimits.max_value).

        Device memory is sized by use: the stacks hold `capacity` slots (grown by doubling as higher
        slots are written; the tiered cache fills the lowest free slot first) of rank `r` (grown to the
        rank bucket of the largest adapter written so far, at most `max_rank`); nothing at start."""
        self.shape, self.num_slots, self.max_rank, self.max_gain = shape, num_slots, max_rank, max_gain
        self.device, self.dtype, self.base = device, dtype, base
        self.out_dims = {t: shape.target_dims(t)[1] for t in TARGETS}   # d_out of each part
        self.in_dims = {t: shape.target_dims(t)[0] for t in TARGETS}
        starts = {t: [sum(outs[:i]) for i in range(len(outs))] for t, outs in self.out_dims.items()}
        self.out_slices = {t: [slice(a, a + o) for a, o in zip(starts[t], outs)]   # columns of each
                           for t, outs in self.out_dims.items()}                      # part of a fused output
        self.capacity, self.r = 0, 0
        self._allocate(0, 0)
        S = num_slots
        self.info: list[SlotInfo | None] = [None] * S
        self.lora_targets: list[frozenset[str]] = [frozenset()] * S     # targets a slot's LoRA touches
        self.affine_targets: list[frozenset[str]] = [frozenset()] * S   # targets with a column scale or shift
        self.affine_shift = [False] * S                                  # some target has a shift

    @property
    def nbytes(self) -> int:
        """Device bytes the stacks take now."""
        seen, total = set(), 0
        for layer in (*self.lora, *self.col_affine, *self.ia3, *self.bn):
            for st in layer.values():
                for t in vars(st).values():
                    for x in (t if isinstance(t, list) else [t]):
                        if isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() not in seen:
                            seen.add(x.untyped_storage().data_ptr())
                            total += x.untyped_storage().nbytes()
        return total

    def _grow(self, slot: int, rank: int) -> None:
        """Make the stacks hold `slot` and `rank` (doubling the slots, rank to its bucket)."""
        cap = self.capacity if slot < self.capacity else min(self.num_slots, max(slot + 1, 2 * self.capacity, 4))
        r = self.r if rank <= self.r else rank_bucket(rank, self.max_rank)
        if (cap, r) != (self.capacity, self.r):
            self._allocate(cap, r)

    def _allocate(self, S: int, r: int) -> None:
        """(Re)build every stack for S slots of rank r, keeping what the current ones hold."""
        device, dtype, d = self.device, self.dtype, self.shape.hidden_size

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, device=device, dtype=dtype)

        def ones(*shape: int) -> torch.Tensor:
            return torch.ones(shape, device=device, dtype=dtype)

        L, widths = self.shape.num_layers, {t: sum(outs) for t, outs in self.out_dims.items()}
        lora = [{t: LoraStack(zeros(S, len(outs) * r, self.in_dims[t]),
                              [zeros(S, r, o).transpose(1, 2) for o in outs], [zeros(S) for _ in outs])
                 for t, outs in self.out_dims.items()} for _ in range(L)]
        col_affine = [{t: ColumnAffine(ones(S, w), zeros(S, w)) for t, w in widths.items()} for _ in range(L)]
        ia3 = [{t: Ia3Stack(ones(S, w), ones(S, self.in_dims[t]) if t in IA3_IN.values() else None)
                for t, w in widths.items()} for _ in range(L)]
        bn = [{p: BottleneckStack(zeros(S, r, d), zeros(S, r, d).transpose(1, 2), zeros(S, r), zeros(S, d))
               for p in ("attn", "mlp")} for _ in range(L)]
        lora_rank, bn_rank = torch.zeros(S, dtype=torch.long, device=device), torch.zeros(S, dtype=torch.long,
                                                                                          device=device)
        bn_act = torch.zeros(S, dtype=torch.long, device=device)                  # [S] Activation
        lora_rank_host, bn_rank_host = np.zeros(S, np.int64), np.zeros(S, np.int64)
        c, r0 = self.capacity, self.r
        if c:                                                                     # copy the old stacks in
            for new, old in zip(lora, self.lora):
                for t, st in new.items():
                    o = old[t]
                    for i in range(len(st.B)):
                        st.A[:c, i * r:i * r + r0] = o.A[:, i * r0:(i + 1) * r0]
                        st.B[i][:c, :, :r0] = o.B[i]
                        st.scale[i][:c] = o.scale[i]
            for new, old in zip(col_affine, self.col_affine):
                for t, ca in new.items():
                    ca.scale[:c], ca.shift[:c] = old[t].scale, old[t].shift
            for new, old in zip(ia3, self.ia3):
                for t, st in new.items():
                    st.out[:c] = old[t].out
                    if st.inp is not None:
                        st.inp[:c] = old[t].inp
            for new, old in zip(bn, self.bn):
                for p, st in new.items():
                    o = old[p]
                    st.D[:c, :r0], st.U[:c, :, :r0], st.bd[:c, :r0], st.bu[:c] = o.D, o.U, o.bd, o.bu
            lora_rank[:c], bn_rank[:c], bn_act[:c] = self.lora_rank, self.bn_rank, self.bn_act
            lora_rank_host[:c], bn_rank_host[:c] = self.lora_rank_host, self.bn_rank_host
        self.lora, self.col_affine, self.ia3, self.bn = lora, col_affine, ia3, bn
        # true rank of each slot, on the host (the plans are made there) and on the device (kernels)
        self.lora_rank, self.lora_rank_host = lora_rank, lora_rank_host
        self.bn_rank, self.bn_rank_host = bn_rank, bn_rank_host
        self.ones_rank, self.ones_rank_host = torch.ones(S, dtype=torch.long, device=device), np.ones(S, np.int64)
        self.bn_act = bn_act
        self.capacity, self.r = S, r

    # ------------------------------------------------------------------ writing a slot
    def write(self, slot: int, w: AdapterWeights) -> None:
        """Copy one adapter into `slot` (the tiered cache's write_slot). Engine thread only."""
        if w.rank > self.max_rank:
            raise FailedPrecondition(f"adapter rank {w.rank} exceeds this server's slot rank {self.max_rank}")
        self._grow(slot, w.rank)
        self._clear(slot)
        dev = dict(device=self.device, dtype=self.dtype)
        try:
            if w.kind in LORA_FAMILY:
                self._write_lora(slot, w)
            elif w.kind is AdapterKind.IA3:
                self._write_ia3(slot, w)
            elif w.kind is AdapterKind.BOTTLENECK:
                self._write_bottleneck(slot, w)
        except FailedPrecondition:
            self._clear(slot)   # nothing half-written stays in the slot
            raise
        self.info[slot] = SlotInfo(
            w.kind,
            w.prefix_kv.to(**dev) if w.prefix_kv is not None else None,
            w.prompt_embeds.to(**dev) if w.prompt_embeds is not None else None,
            w.head)

    def _clear(self, slot: int) -> None:
        for layer in self.lora:
            for st in layer.values():
                st.A[slot].zero_()
                for B, s in zip(st.B, st.scale):
                    B[slot].zero_()
                    s[slot] = 0
        for layer in self.col_affine:
            for ca in layer.values():
                ca.scale[slot] = 1
                ca.shift[slot] = 0
        for layer in self.ia3:
            for st in layer.values():
                st.out[slot] = 1
                if st.inp is not None:
                    st.inp[slot] = 1
        for layer in self.bn:
            for st in layer.values():
                for x in (st.D, st.U, st.bd, st.bu):
                    x[slot].zero_()
        self.lora_rank[slot] = self.bn_rank[slot] = self.bn_act[slot] = 0
        self.lora_rank_host[slot] = self.bn_rank_host[slot] = 0
        self.lora_targets[slot] = self.affine_targets[slot] = frozenset()
        self.affine_shift[slot] = False
        self.info[slot] = None

    def _write_lora(self, slot: int, w: AdapterWeights) -> None:
        """LoRA factors of every target, then DoRA's scale and the LoRA bias as column scale/shift."""
        if w.kind is AdapterKind.DORA and self.base is None:
            raise FailedPrecondition("this server was started without the base weights DoRA needs")
        for (layer, module), t in w.lora.items():
            target, i = MODULES[module].target, MODULES[module].part
            st, r = self.lora[layer][target], t.A.shape[0]
            st.A[slot, i * self.r:i * self.r + r] = t.A
            st.B[i][slot, :, :r] = t.B
            st.scale[i][slot] = t.scale
            cols = self.out_slices[target][i]
            ca = self.col_affine[layer][target]
            if t.bias is not None:
                ca.shift[slot, cols] = t.scale * t.bias
            if t.magnitude is not None:
                base = getattr(self.base[layer], TARGET_WEIGHT[target])
                W = base.dense()[cols]                                               # [d_out_i, d_in]
                g = dora_scale(W, t, f"layer {layer} {module}", self.max_gain)       # [d_out_i] float32
                ca.scale[slot, cols] = g
                if base.bias is not None:                                            # the base bias b0
                    ca.shift[slot, cols] = (1 - g) * base.bias[cols].float()
                    self.affine_shift[slot] = True
            self.affine_shift[slot] |= t.bias is not None
        self.lora_rank[slot] = self.lora_rank_host[slot] = w.rank
        self.lora_targets[slot] = frozenset(MODULES[m].target for _, m in w.lora)
        self.affine_targets[slot] = frozenset(MODULES[m].target for (_, m), t in w.lora.items()
                                              if t.bias is not None or t.magnitude is not None)

    def _write_ia3(self, slot: int, w: AdapterWeights) -> None:
        for (layer, module), t in w.ia3.items():
            if t.on_input:
                if module not in IA3_IN:
                    raise FailedPrecondition(
                        f"IA3 input scaling (feedforward_modules) is served on o_proj and down_proj "
                        f"only, not {module}")
                self.ia3[layer][IA3_IN[module]].inp[slot] = t.vec
            else:
                target, i = MODULES[module].target, MODULES[module].part
                self.ia3[layer][target].out[slot, self.out_slices[target][i]] = t.vec

    def _write_bottleneck(self, slot: int, w: AdapterWeights) -> None:
        acts = {t.activation for t in w.bottleneck.values()}
        if len(acts) != 1:
            raise FailedPrecondition("a bottleneck adapter must use one activation throughout")
        for (layer, place), t in w.bottleneck.items():
            st, r = self.bn[layer][place], t.down.shape[0]
            st.D[slot, :r] = t.down
            st.U[slot, :, :r] = t.up
            if t.down_bias is not None:
                st.bd[slot, :r] = t.down_bias
            if t.up_bias is not None:
                st.bu[slot] = t.up_bias
        self.bn_rank[slot] = self.bn_rank_host[slot] = w.rank
        self.bn_act[slot] = Activation.of(acts.pop())

    # ------------------------------------------------------------------ per step
    def step(self, row_slots: list[int], prompt_rows: list[tuple[int, int, int]]) -> "StepAdapters":
        """row_slots [T]: each row's adapter slot or -1; prompt_rows: (row, adapter slot, virtual
        index) for rows that carry a prompt-tuning virtual token."""
        def plan(rows: list[int], ranks: tuple[np.ndarray, torch.Tensor], *ops: str) -> kernels.AdapterPlan | None:
            if all(s < 0 for s in rows):
                return None
            return kernels.plan_rows(rows, *ranks, layouts=kernels.layouts(self.device, *ops))

        kinds = [self.info[s].kind if s >= 0 else None for s in row_slots]
        lora_rows = [s if k in LORA_FAMILY and self.lora_targets[s] else -1 for s, k in zip(row_slots, kinds)]
        affine_rows = [s if s >= 0 and self.affine_targets[s] else -1 for s in lora_rows]
        ones = (self.ones_rank_host, self.ones_rank)
        prompt = None
        if prompt_rows:
            rows = torch.tensor([r for r, _, _ in prompt_rows], dtype=torch.long, device=self.device)
            vals = torch.stack([self.info[s].prompt_embeds[i] for _, s, i in prompt_rows])
            prompt = (rows, vals)
        return StepAdapters(
            self, plan(lora_rows, (self.lora_rank_host, self.lora_rank), "lora", "lora_packed"),
            frozenset().union(*(self.lora_targets[s] for s in set(lora_rows) if s >= 0)),
            plan(affine_rows, ones, "col_scale"),
            frozenset().union(*(self.affine_targets[s] for s in set(affine_rows) if s >= 0)),
            any(self.affine_shift[s] for s in set(affine_rows) if s >= 0),
            plan([s if k is AdapterKind.IA3 else -1 for s, k in zip(row_slots, kinds)], ones, "ia3"),
            plan([s if k is AdapterKind.BOTTLENECK else -1 for s, k in zip(row_slots, kinds)],
                 (self.bn_rank_host, self.bn_rank), "bottleneck"),
            prompt)


@dataclass(frozen=True)
class StepAdapters:
    """The model's AdapterHooks for one step."""
    slots: AdapterSlots
    lora: kernels.AdapterPlan | None
    lora_targets: frozenset[str]          # targets some LoRA-family row of this step touches
    col_affine: kernels.AdapterPlan | None   # rows whose adapter slot has a column scale or shift
    affine_targets: frozenset[str]        # targets where some of those rows have one
    affine_shift: bool                    # some of those rows have a shift (else only scales apply)
    ia3: kernels.AdapterPlan | None
    bn: kernels.AdapterPlan | None
    prompt: tuple[torch.Tensor, torch.Tensor] | None   # rows [V], embeddings [V, hidden]

    def embed(self, h: torch.Tensor) -> torch.Tensor:
        if self.prompt is not None:
            h = h.clone()
            h[self.prompt[0]] = self.prompt[1]
        return h

    def pre_linear(self, layer: int, target: str, x: torch.Tensor) -> torch.Tensor:
        if self.ia3 is not None and target in IA3_IN.values():
            x = x.clone()
            kernels.ia3(x, self.slots.ia3[layer][target].inp, self.ia3)
        return x

    def post_linear(self, layer: int, target: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.lora is not None and target in self.lora_targets:
            st = self.slots.lora[layer][target]
            if len(st.B) == 1:
                kernels.lora(y, x, st.A, st.B[0], st.scale[0], self.lora)
            else:
                kernels.lora_packed(y, x, st.A, st.B, st.scale, self.slots.out_slices[target], self.lora)
        if self.col_affine is not None and target in self.affine_targets:
            ca = self.slots.col_affine[layer][target]
            kernels.col_scale(y, ca.scale, ca.shift if self.affine_shift else None, self.col_affine)
        if self.ia3 is not None:
            kernels.ia3(y, self.slots.ia3[layer][target].out, self.ia3)
        return y

    def block_out(self, layer: int, place: str, h: torch.Tensor) -> torch.Tensor:
        if self.bn is not None:
            st = self.slots.bn[layer][place]
            kernels.bottleneck(h, st.D, st.U, st.bd, st.bu, self.slots.bn_act, self.bn)
        return h
