"""Tool calling (OpenAI's `tools`, `tool_choice`, `parallel_tool_calls`) on the domain side: the
limits, how tools reach the prompt, the constraint that forces a call, and the calls read back out of
the generated text. Both doors' wire types become `Tools` / `ToolCall` (the HTTP door today).

The prompt. A chat template that renders tools (transformers' `apply_chat_template(tools=...)`
convention: a `tools` variable of OpenAI-shaped `{"type": "function", "function": {...}}` entries;
`ChatTemplate.supports_tools` finds out by rendering a probe) gets them as such. Otherwise
(SmolLM2-135M-Instruct's template has no tools) the fallback: one system block (`system_block`),
prepended to the first system message or sent as one, lists each function with its JSON schema and
asks for a reply of `{"name": ..., "arguments": {...}}` (a JSON list of those for several calls).
History is rendered in the same form whatever the template: an assistant message's `tool_calls` as
that JSON in its content, a `tool` message as the template's `tool` role where it has one, else as a
`user` message that says which call it answers.

Forcing a call. `required` and a named function are enforced by a JSON-schema constraint
(`constraint`): the output is one call object (`name` a const, `arguments` the function's
`parameters` schema), or with `required` and `parallel_tool_calls` a non-empty JSON list of them.
`auto` is not constrained: the model chooses, and its text is read as vLLM's hermes parser does
(`parse_calls`): `<tool_call>{...}</tool_call>` blocks, or a reply that is nothing but a call object
or a list of them, with a known name and an `arguments` object; anything else is content. `none`
renders no tools and reads no calls.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from server.config import ServerConfig
from server.engine.constraints import Constraint
from server.errors import InvalidField

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")      # OpenAI's rule for a function name
CHOICES = ("auto", "none", "required", "function")
TOOL_ROLE = "tool"
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


@dataclass(frozen=True)
class Tool:
    name: str
    description: str = ""
    parameters: str = ""          # the arguments' JSON schema as JSON text ('' = any object)

    def schema(self) -> dict:
        return json.loads(self.parameters) if self.parameters else {"type": "object"}

    def openai(self) -> dict:
        """OpenAI's (and transformers' chat templates') shape of this tool."""
        fn = {"name": self.name, "description": self.description, "parameters": self.schema()}
        return {"type": "function", "function": fn}


@dataclass(frozen=True)
class Tools:
    tools: tuple[Tool, ...]
    choice: str = "auto"          # one of CHOICES; "function": `named` must be called
    named: str = ""
    parallel: bool = True

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "function")

    @property
    def active(self) -> bool:
        """Tools are in the prompt and calls are read back."""
        return bool(self.tools) and self.choice != "none"


@dataclass(frozen=True)
class ToolCall:
    id: str                       # "call_..."
    name: str
    arguments: str                # JSON text, as OpenAI sends it


def check(tools: Tools, cfg: ServerConfig, field: str = "tools", choice_field: str = "tool_choice") -> None:
    """The limits (count, total bytes), names (OpenAI's rule, distinct) and the tool_choice's name."""
    if len(tools.tools) > cfg.max_tools:
        raise InvalidField(field, f"{field} holds {len(tools.tools)} tools; this server accepts at most {cfg.max_tools}")
    size = sum(len(t.name) + len(t.description) + len(t.parameters) for t in tools.tools)
    if size > cfg.max_tools_bytes:
        raise InvalidField(field, f"{field} total {size} bytes of names, descriptions and parameters; this server "
                                  f"accepts at most {cfg.max_tools_bytes}")
    seen: set[str] = set()
    for i, t in enumerate(tools.tools):
        if not NAME.fullmatch(t.name):
            raise InvalidField(f"{field}[{i}].function.name", f"{field}[{i}].function.name must be 1-64 letters, "
                                                              "digits, underscores or dashes")
        if t.name in seen:
            raise InvalidField(f"{field}[{i}].function.name", f"{field}[{i}].function.name {t.name!r} is given twice")
        seen.add(t.name)
    if tools.forced and not tools.tools:
        raise InvalidField(choice_field, f"{choice_field}={tools.choice!r} needs {field}")
    if tools.choice == "function" and tools.named not in seen:
        raise InvalidField(choice_field, f"{choice_field} names {tools.named[:64]!r}, which is not one of {field}")


def system_block(tools: Tools) -> str:
    """The fallback prompt: the functions and the reply format."""
    lines = ["You can call these functions. Each is given as JSON: its name, what it does, and the JSON schema "
             "of its arguments."]
    lines += [json.dumps(t.openai()["function"]) for t in tools.tools]
    if tools.choice == "function":
        lines.append(f'Call the function {tools.named}: reply with only {{"name": "{tools.named}", '
                     '"arguments": {...}}, the arguments following its schema.')
    else:
        how = "reply with only" if tools.forced else "to call one, reply with only"
        lines.append(f'To answer, {how} a JSON object {{"name": <function name>, "arguments": {{...}}}}, the '
                     "arguments following the function's schema" + (
                         "; for several calls, a JSON list of such objects." if tools.parallel else "."))
        if not tools.forced:
            lines.append("Otherwise reply in plain text.")
    return "\n".join(lines)


def calls_as_text(calls: list[tuple[str, str]]) -> str:
    """An assistant message's (name, arguments JSON text) calls as the fallback's reply text."""
    def one(name: str, arguments: str) -> str:
        try:
            args = json.loads(arguments) if arguments else {}
        except ValueError:
            args = arguments                       # kept as the string it was
        return json.dumps({"name": name, "arguments": args})
    return one(*calls[0]) if len(calls) == 1 else "[" + ", ".join(one(n, a) for n, a in calls) + "]"


def tool_result(content: str) -> str:
    """A `tool` message's content where the template has no tool role (sent as a user message)."""
    return f"Result of the function call:\n{content}"


def with_system_block(messages: list[tuple[str, str]], tools: Tools, system_role: str | None) -> list[tuple[str, str]]:
    """The fallback: the system block joined to the first system message, or sent as one first."""
    block = system_block(tools)
    if system_role is None:                  # a template without a system role: the first message carries it
        role, content = messages[0]
        return [(role, f"{block}\n\n{content}")] + messages[1:]
    if messages and messages[0][0] == system_role:
        return [(system_role, f"{messages[0][1]}\n\n{block}")] + messages[1:]
    return [(system_role, block)] + messages


def constraint(tools: Tools) -> Constraint | None:
    """The JSON-schema constraint that forces a call (`required`, a named function), else None."""
    if not tools.forced:
        return None
    chosen = [t for t in tools.tools if tools.choice == "required" or t.name == tools.named]
    objs = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.schema()},
             "required": ["name", "arguments"], "additionalProperties": False} for t in chosen]
    one = objs[0] if len(objs) == 1 else {"anyOf": objs}
    schema = {"type": "array", "items": one, "minItems": 1} if tools.choice == "required" and tools.parallel else one
    return Constraint("json_schema", json.dumps(schema))


def parse_calls(text: str, tools: Tools) -> tuple[str, list[ToolCall]]:
    """(content left, calls) from a generated reply (hermes-style; the module docstring): no calls
    when the reply holds none that names a known function with an object of arguments."""
    names = {t.name for t in tools.tools}
    blocks = _HERMES.findall(text)
    if blocks:
        found = [c for b in blocks for c in _calls(b, names)]
        if found and len(found) >= len(blocks):
            return _HERMES.sub("", text).strip(), found
        return text, []
    found = _calls(text.strip(), names)
    return ("", found) if found else (text, [])


def _calls(doc: str, names: set[str]) -> list[ToolCall]:
    try:
        value = json.loads(doc)
    except ValueError:
        return []
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if not (isinstance(item, dict) and item.get("name") in names and isinstance(item.get("arguments", {}), dict)):
            return []
        out.append(ToolCall(f"call_{uuid.uuid4().hex[:24]}", item["name"], json.dumps(item.get("arguments", {}))))
    return out
