"""Chat messages -> one prompt, through the model's own chat template.

The template is the Jinja text a Hugging Face tokenizer carries (`chat_template.jinja`, or
`chat_template` in tokenizer_config.json), rendered in Jinja's immutable sandbox with the
generation prompt added, as transformers' `apply_chat_template` does. The end-of-turn marker is
found by rendering a probe conversation: the text between an assistant message's content and the
next turn (e.g. `<|im_end|>` for ChatML); when it is a single token, generation stops on it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

MAX_TEMPLATE_BYTES = 256 * 1024
KNOWN_ROLES = ("system", "user", "assistant")
_PROBE = "\x00lorafleet-probe\x00"


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

    def render(self, messages: list[tuple[str, str]]) -> str:
        """The prompt text for (role, content) pairs, with the generation prompt added."""
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        try:
            return env.from_string(self.source).render(
                messages=[{"role": r, "content": c} for r, c in messages], add_generation_prompt=True,
                bos_token=self.bos_token, eos_token=self.eos_token)
        except ChatTemplateError:
            raise
        except TemplateError as e:
            raise ChatTemplateError(f"the model's chat template failed: {e}") from None

    def roles(self) -> tuple[str, ...]:
        """Roles the template renders (of system/user/assistant)."""
        ok = []
        for role in KNOWN_ROLES:
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
    return ChatTemplate(source, template.bos_token, template.eos_token,
                        _end_of_turn_ids(template, tokenizer))


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
