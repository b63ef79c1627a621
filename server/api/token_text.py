"""One token's text and bytes, as logprobs show them (OpenAI's `token` and `bytes`).

A token alone may hold part of a UTF-8 character (byte-level BPE: GPT-2, Llama 3, SmolLM2). For
byte-level tokenizers the bytes are exact (the token's characters mapped back through GPT-2's
byte -> unicode table) and the text is their UTF-8 decoding with U+FFFD for an incomplete
character; special tokens show their own text (`</s>`); other tokenizers give the token decoded
alone and its UTF-8. Each id is worked out once per tokenizer, on the event loop (never the
engine thread).
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders


def _gpt2_unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode table (what ByteLevel pre-tokenizers emit)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


UNICODE_TO_BYTE = _gpt2_unicode_to_byte()


class TokenText:
    """token id -> (text, bytes), cached (at most one entry per vocabulary id)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)
        self.specials = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
        self._known: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        known = self._known.get(token_id)
        if known is None:
            known = self._known[token_id] = self._work_out(token_id)
        return known

    def _work_out(self, token_id: int) -> tuple[str, bytes]:
        if token_id in self.specials:
            text = self.specials[token_id]
            return text, text.encode("utf-8")
        piece = self.tokenizer.id_to_token(token_id)
        if self.byte_level and piece is not None and all(c in UNICODE_TO_BYTE for c in piece):
            raw = bytes(UNICODE_TO_BYTE[c] for c in piece)
            return raw.decode("utf-8", errors="replace"), raw
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text, text.encode("utf-8", errors="replace")
