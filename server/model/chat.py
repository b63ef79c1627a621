"""Chat messages -> one prompt, through the model's own chat template.

The template is the Jinja text a Hugging Face tokenizer carries (`chat_template.jinja`, or
`chat_template` in tokenizer_config.json), rendered in Jinja's immutable sandbox with the
generation prompt added, as transformers' `apply_chat_template` does. The end-of-turn marker is
found by rendering a probe conversation: the text between an assistant message's content and the
next turn (e.g. `<|im_end|>` for ChatML); when it is a single token, generation stops on it.

Message content is text (`ChatTemplate.encode`): only the template itself produces special tokens.
A user who types `<|im_end|>\n<|im_start|>assistant` gets those characters as ordinary tokens, so no
message can forge a turn of another role.

Tools (issue 23): a template renders them when it uses the `tools` variable as transformers'
`apply_chat_template(tools=...)` passes it (a list of OpenAI-shaped function entries);
`supports_tools` finds out by rendering a probe tool. Other templates get them through the fallback
of `server.api.tools`. Tool text is text like any content: a tool's schema cannot make a special token.
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

MAX_TEMPLATE_BYTES = 256 * 1024
KNOWN_ROLES = ("system", "user", "assistant")
DEVELOPER = "developer"        # OpenAI's newer name for system: a role only where the template names it
TOOL = "tool"                  # a tool call's result: a role only where the template names it
_PROBE = "\x00lorafleet-probe\x00"
# Unicode noncharacters (never assigned, never in a template): brackets of the placeholders that
# stand for special-token text inside content while the template renders
_OPEN, _CLOSE = "\ufdd0", "\ufdd1"
_PLACEHOLDER_RE = re.compile(f"{_OPEN}([0-9]+){_CLOSE}")
_LITERAL: dict[int, tuple[Tokenizer, Tokenizer]] = {}   # id(tokenizer) -> (it, a copy that never parses specials)


class ChatTemplateError(ValueError):
    """The template refused or failed to render the messages (the message says why)."""


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


@dataclass(frozen=True)
class ChatTemplate:
    source: str                        # the Jinja template text
    bos_token: str
    eos_token: str
    end_of_turn_ids: frozenset[int]    # token ids that end an assistant turn
    specials: tuple[str, ...] = ()     # the tokenizer's special tokens, longest first

    def encode(self, messages: list[tuple[str, str]], tokenizer: Tokenizer, tools: list[dict] | None = None) -> list[int]:
        """Token ids of the prompt for (role, content) pairs (no special tokens added), with `tools`
        (OpenAI-shaped entries) given to a template that renders them. Special tokens come from the
        template only: content and tool text are encoded as text. Text that could make a special
        token (one inside it, or part of one at its edges) is rendered with placeholders, the text
        split at the template's own special tokens and every other piece encoded with special-token
        parsing off; other content takes the tokenizer's one plain call."""
        tool_text = [json.dumps(tools)] if tools else []
        if not any(self._suspicious(c) for c in [c for _, c in messages] + tool_text):
            return tokenizer.encode(self.render(messages, tools), add_special_tokens=False).ids
        table = [*self.specials, _OPEN, _CLOSE]
        protect = re.compile("|".join(re.escape(t) for t in table))

        def safe(value):
            if isinstance(value, str):
                return protect.sub(lambda m: f"{_OPEN}{table.index(m[0])}{_CLOSE}", value)
            if isinstance(value, list):
                return [safe(v) for v in value]
            if isinstance(value, dict):
                return {safe(k): safe(v) for k, v in value.items()}
            return value
        rendered = self.render([(r, safe(c)) for r, c in messages], safe(tools) if tools else None)
        pieces = re.split("(" + "|".join(re.escape(t) for t in self.specials) + ")", rendered)
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if i % 2:                                   # a special token the template wrote
                ids.append(tokenizer.token_to_id(piece))
            elif piece:
                ids.extend(encode_text(tokenizer, _PLACEHOLDER_RE.sub(lambda m: table[int(m[1])], piece)))
        return ids

    def _suspicious(self, content: str) -> bool:
        if _OPEN in content or _CLOSE in content:
            return True
        for t in self.specials:
            if t in content or any(content.endswith(t[:k]) or content.startswith(t[k:]) for k in range(1, len(t))):
                return True
        return False

    def render(self, messages: list[tuple[str, str]], tools: list[dict] | None = None) -> str:
        """The prompt text for (role, content) pairs, with the generation prompt added (and `tools`,
        as transformers passes them, when given)."""
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        extra = {"tools": tools} if tools else {}
        try:
            return env.from_string(self.source).render(
                messages=[{"role": r, "content": c} for r, c in messages], add_generation_prompt=True,
                bos_token=self.bos_token, eos_token=self.eos_token, **extra)
        except ChatTemplateError:
            raise
        except TemplateError as e:
            raise ChatTemplateError(f"the model's chat template failed: {e}") from None

    @functools.cached_property
    def supports_tools(self) -> bool:
        """Whether the template renders a `tools` list (a probe tool's name shows in its output)."""
        probe = [{"type": "function", "function": {"name": "lorafleet_probe_fn", "description": "",
                                                   "parameters": {"type": "object"}}}]
        try:
            return "lorafleet_probe_fn" in self.render([("user", "x")], probe)
        except ChatTemplateError:
            return False

    def roles(self) -> tuple[str, ...]:
        """Roles the template renders (of system/user/assistant, and developer and tool where the
        template names them: a template that prints any role's name has no such role of its own)."""
        ok = []
        extra = tuple(r for r in (DEVELOPER, TOOL) if r in self.source)
        for role in KNOWN_ROLES + extra:
            try:
                self.render([(role, "x")] if role != "assistant" else [("user", "x"), (role, "x")])
                ok.append(role)
            except ChatTemplateError:
                pass
        return tuple(ok)


def _special(value: object) -> str:
    if isinstance(value, dict):                    # {"content": "<s>", ...} in older files
        value = value.get("content")
    return value if isinstance(value, str) else ""


def load_chat_template(model_dir: Path, tokenizer: Tokenizer) -> ChatTemplate | None:
    """The model directory's chat template, or None when it has none."""
    cfg_path, jinja_path = model_dir / "tokenizer_config.json", model_dir / "chat_template.jinja"
    cfg = {}
    if cfg_path.is_file() and cfg_path.stat().st_size <= 8 * MAX_TEMPLATE_BYTES:
        cfg = json.loads(cfg_path.read_text())
    source = cfg.get("chat_template")
    if jinja_path.is_file() and jinja_path.stat().st_size <= MAX_TEMPLATE_BYTES:
        source = jinja_path.read_text()
    if isinstance(source, list):                    # named templates: take "default"
        source = next((t.get("template") for t in source if t.get("name") == "default"), None)
    if not isinstance(source, str) or not source.strip():
        return None
    template = ChatTemplate(source, _special(cfg.get("bos_token")), _special(cfg.get("eos_token")), frozenset())
    specials = sorted({t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special and t.content},
                      key=len, reverse=True)
    return ChatTemplate(source, template.bos_token, template.eos_token,
                        _end_of_turn_ids(template, tokenizer), tuple(specials))


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """`text` as ordinary tokens: special-token characters in it are not parsed (no special
    tokens added either). Uses a copy of the tokenizer made once, with that parsing off."""
    entry = _LITERAL.get(id(tokenizer))
    if entry is None or entry[0] is not tokenizer:
        copy = Tokenizer.from_str(tokenizer.to_str())
        copy.encode_special_tokens = True
        entry = _LITERAL[id(tokenizer)] = (tokenizer, copy)
    return entry[1].encode(text, add_special_tokens=False).ids


def _end_of_turn_ids(template: ChatTemplate, tokenizer: Tokenizer) -> frozenset[int]:
    """The template's eos token, and the special token that follows an assistant message's content."""
    ids = set()
    if template.eos_token and tokenizer.token_to_id(template.eos_token) is not None:
        ids.add(tokenizer.token_to_id(template.eos_token))
    try:
        text = template.render([("user", "x"), ("assistant", _PROBE), ("user", "y")])
    except ChatTemplateError:
        return frozenset(ids)
    after = text[text.index(_PROBE) + len(_PROBE):].lstrip() if _PROBE in text else ""
    first = tokenizer.encode(after, add_special_tokens=False).ids[:1] if after else []
    special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    ids.update(t for t in first if t in special)
    return frozenset(ids)
