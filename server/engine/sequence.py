"""One request's state, owned by the engine thread once submitted.

Other threads may only call `cancel()`, which wakes the engine that owns the sequence. Text is detokenized incrementally; a stop string
ends generation before it, and text that could still become a stop string (or an
incomplete UTF-8 character) is held back until it cannot. Stop strings are looked for only once
`min_tokens` tokens are generated (the sampler masks the end tokens until then), as vLLM does.
Each event carries the ids of the tokens generated since the previous one and, when the request
asked for logprobs, one `TokenLogprobs` per id.

A sequence may carry a compiled constraint (issue 23): its `matcher` has accepted exactly the
tokens in `output_ids`. The engine advances it once per sampled token; a preemption recomputes the
K/V of the output so far without sampling it again, so the matcher is never rolled back or re-fed.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from tokenizers import Tokenizer

from server.engine.kv_cache import PREFIX_TOKEN, VIRTUAL_TOKEN
from server.engine.sampling import RowState, SamplingParams, TokenLogprobs
from server.errors import LoraFleetError

if TYPE_CHECKING:
    from server.adapters.registry import AdapterRef
    from server.engine.constraints import Compiled, Matcher


class FinishReason(enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    EOS = "eos"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True)
class TokenEvent:
    text: str
    token_ids: list[int]
    logprobs: tuple[TokenLogprobs, ...] = ()    # one per token id when asked for, else empty


@dataclass(frozen=True)
class FinishEvent:
    reason: FinishReason
    text: str                       # the last piece of text not yet sent
    token_ids: list[int]            # the ids generated since the last event
    prompt_tokens: int              # the caller's tokens (BOS included)
    completion_tokens: int
    error: LoraFleetError | None = None
    virtual_tokens: int = 0         # prompt/prefix-tuning tokens the adapter added
    probabilities: list[float] | None = None   # classification rows only
    labels: tuple[str, ...] = ()                # names of the probabilities
    logprobs: tuple[TokenLogprobs, ...] = ()    # one per token id when asked for, else empty


Event = TokenEvent | FinishEvent


class Sequence:
    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 sink: Callable[[Event], None], deadline: float | None = None, tenant: str = "",
                 classify: bool = False, stop_ids: frozenset[int] = frozenset(),
                 constraint: Compiled | None = None, constraint_field: str = "constraint",
                 leader: "Sequence | None" = None):
        self.request_id = request_id
        self.prompt_ids = prompt_ids          # prompt-tuning placeholders first, once attached
        self.params = params
        self.sink = sink                      # thread-safe; called from the engine thread
        self.deadline = deadline              # time.monotonic() value, or None
        self.tenant = tenant
        self.adapter: AdapterRef | None = None   # the pinned version; set and released by the engine
        self.classify = classify              # prefill only; finish with label probabilities
        self.stop_ids = stop_ids              # end-of-turn tokens (chat), on top of the model's EOS
        self.constraint = constraint          # what the output must match (shared, compiled), or None
        self.matcher: Matcher | None = constraint.matcher(stop_ids) if constraint is not None else None
        self.constraint_field = constraint_field   # its field as the caller spelled it (errors name it)
        self.leader = leader                  # the first choice of the same prompt (n > 1): see Scheduler.admit
        self.kv_offset = 0                    # prefix-tuning positions ahead of the prompt
        self.virtual_tokens = 0               # prompt-tuning placeholders at the start of prompt_ids
        self.adapter_slot: int | None = None  # device adapter slot while running
        self.error: LoraFleetError | None = None   # found at admission: fail right after it
        self.logits_trace: list[torch.Tensor] | None = None  # tests: set to [] to record each step's logits
        self.arrival = time.monotonic()
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.blocks: list[int] | None = None  # KV block table while running (None: waiting)
        self.extent: tuple[int, int] | None = None   # the run of blocks kept for its growth
        self.block_digests: list[bytes] = []  # prefix-cache digests of its full computed blocks
        self.prepared = False                 # virtual tokens attached (once per request)
        self.admissions = 0                   # times admitted (more than once after a preemption)
        self.cached_tokens = 0                # positions found in the prefix cache at the last admission
        self.num_computed = 0                 # tokens (of prompt_ids + output_ids) whose K/V are in the cache
        self.output_ids: list[int] = []
        self.output_logprobs: list[TokenLogprobs] = []   # one per output id when params.logprobs is set
        self.finished = False
        self._cancelled = False
        self._wake: Callable[[], None] | None = None   # the owning engine's wake(), set at submit
        self._text = ""                       # detokenized output so far
        self._sent_chars = 0
        self._sent_ids = 0
        self.generator = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else int(torch.randint(1 << 62, ()).item())
            self.generator = torch.Generator().manual_seed(seed)

    # ---- any thread
    def cancel(self) -> None:
        """Stop this request (caller gone, or a batch mate failed); the engine frees its slot."""
        self._cancelled = True
        if self._wake is not None:
            self._wake()

    def bind_engine(self, wake: Callable[[], None]) -> None:
        self._wake = wake

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    # ---- engine thread
    @property
    def in_prefill(self) -> bool:
        """Tokens other than the last sampled one still need their K/V: the prompt, or after a
        preemption the prompt and the output so far (recomputed)."""
        return self.num_computed < len(self.prompt_ids) + max(len(self.output_ids) - 1, 0)

    @property
    def prompt_pending(self) -> bool:
        """Its prompt's K/V are not computed yet (waiting, preempted, or in its first prefill) and
        it may still compute them: a sibling choice admitted now would compute them a second time."""
        return not self.finished and not self.cancelled and (
            self.blocks is None or self.num_computed < len(self.prompt_ids))

    @property
    def num_positions(self) -> int:
        """KV positions the sequence holds once its pending tokens have run (prefix-tuning
        positions, prompt and output)."""
        return self.kv_offset + len(self.prompt_ids) + len(self.output_ids)

    def hash_tokens(self, start: int, end: int) -> list[int]:
        """The ids prefix caching hashes for KV positions [start, end): PREFIX_TOKEN for
        prefix-tuning positions, VIRTUAL_TOKEN for prompt-tuning ones, else the token id."""
        out = []
        n_prompt = len(self.prompt_ids)
        for p in range(start, end):
            j = p - self.kv_offset
            if j < 0:
                out.append(PREFIX_TOKEN)
            elif j < self.virtual_tokens:
                out.append(VIRTUAL_TOKEN)
            else:
                out.append(self.prompt_ids[j] if j < n_prompt else self.output_ids[j - n_prompt])
        return out

    def attach_virtual(self, prefix_len: int, prompt_len: int, placeholder: int = 0) -> None:
        """Make room for an adapter's virtual tokens (once): prefix-tuning K/V occupy the first
        `prefix_len` cache positions; prompt-tuning embeddings take `prompt_len` placeholders."""
        if self.prepared:
            return
        self.prepared = True
        self.kv_offset = prefix_len
        self.virtual_tokens = prompt_len
        self.prompt_ids = [placeholder] * prompt_len + self.prompt_ids

    @property
    def context_len(self) -> int:
        """KV positions this sequence needs at most."""
        return self.kv_offset + len(self.prompt_ids) + self.params.max_new_tokens

    def next_tokens(self, budget: int) -> tuple[list[int], int]:
        """Tokens to run this step (at most `budget`, from the first one without K/V to the last
        sampled one) and the first one's position. Decoding, that is the last sampled token alone."""
        start, n_prompt = self.num_computed, len(self.prompt_ids)
        end = min(start + budget, n_prompt + len(self.output_ids))
        chunk = self.prompt_ids[start:min(end, n_prompt)]
        if end > n_prompt:
            chunk = chunk + self.output_ids[max(start - n_prompt, 0):end - n_prompt]
        return chunk, self.kv_offset + start

    def reset_kv(self) -> None:
        """Forget the K/V (a preemption): everything is recomputed at the next admission."""
        self.blocks, self.extent, self.block_digests, self.num_computed = None, None, [], 0

    def row_state(self, eos_ids: frozenset[int] = frozenset()) -> RowState:
        """What the sampler needs of this row; `eos_ids`: the model's, masked (with the chat's
        end-of-turn tokens) while fewer than min_tokens are generated."""
        end = (eos_ids | self.stop_ids) if len(self.output_ids) < self.params.min_tokens else frozenset()
        return RowState(self.params, self.prompt_ids[self.virtual_tokens:] + self.output_ids, self.generator,
                        self.output_ids, end)

    def append_token(self, token: int, tokenizer: Tokenizer, eos_ids: frozenset[int],
                     logprobs: TokenLogprobs | None = None) -> Event | None:
        """Record a sampled token (and its logprobs, when asked for); return what to send (None
        when text is held back)."""
        now = time.monotonic()
        self.first_token_at = self.first_token_at or now
        self.last_token_at = now
        self.output_ids.append(token)
        if logprobs is not None:
            self.output_logprobs.append(logprobs)
        if (token in eos_ids or token in self.stop_ids) and not self.params.ignore_eos:
            return self.finish(FinishReason.EOS)
        self._text = tokenizer.decode(self.output_ids, skip_special_tokens=True)
        stop_at = self._find_stop()
        if stop_at is not None:
            self._text = self._text[:stop_at]
            return self.finish(FinishReason.STOP)
        if len(self.output_ids) >= self.params.max_new_tokens:
            return self.finish(FinishReason.LENGTH)
        safe = len(self._text) - self._holdback()
        if safe <= self._sent_chars:
            return None
        ev = TokenEvent(self._text[self._sent_chars:safe], self.output_ids[self._sent_ids:],
                        tuple(self.output_logprobs[self._sent_ids:]))
        self._sent_chars, self._sent_ids = safe, len(self.output_ids)
        return ev

    def finish(self, reason: FinishReason, error: LoraFleetError | None = None,
               probabilities: list[float] | None = None, labels: tuple[str, ...] = ()) -> FinishEvent:
        self.finished = True
        text = self._text[self._sent_chars:] if reason != FinishReason.ERROR else ""
        ev = FinishEvent(reason, text, self.output_ids[self._sent_ids:],
                         len(self.prompt_ids) - self.virtual_tokens, len(self.output_ids), error,
                         self.virtual_tokens + self.kv_offset, probabilities, labels,
                         tuple(self.output_logprobs[self._sent_ids:]))
        self._sent_chars, self._sent_ids = len(self._text), len(self.output_ids)
        return ev

    def _find_stop(self) -> int | None:
        if not self.params.stop or len(self.output_ids) < self.params.min_tokens:
            return None
        longest = max(len(s) for s in self.params.stop)
        start = max(0, self._sent_chars - longest)
        hits = [i for i in (self._text.find(s, start) for s in self.params.stop) if i >= 0]
        return min(hits) if hits else None

    def _holdback(self) -> int:
        """Chars at the end that may still change: an incomplete UTF-8 char or a stop prefix."""
        text, n = self._text, 0
        while n < len(text) and text[len(text) - 1 - n] == "\ufffd":
            n += 1
        for s in self.params.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    n = max(n, k)
                    break
        return n
