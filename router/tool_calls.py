"""Qwen's tool calls in generated text: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks
(the format Qwen's chat templates ask for) parsed out of the content, whole or as a stream.

A block that does not parse (not JSON, no name, arguments not an object) stays in the content as the model
wrote it: `auto` tool choice never turns a model's mistake into an error.
"""

import json
import re
import uuid
from dataclasses import dataclass, field

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as JSON text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


def parse_block(body: str) -> ToolCall | None:
    """One block's inside as a call, or None when it is not one."""
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(call["name"], json.dumps(arguments, ensure_ascii=False))


def parse(text: str) -> tuple[str, list[ToolCall]]:
    """(content, calls): the text outside the blocks that parsed (blank lines between them dropped), and
    the calls in order."""
    calls, content, end = [], [], 0
    for m in _BLOCK.finditer(text):
        call = parse_block(m.group(1))
        if call is not None:
            content.append(text[end:m.start()])
            calls.append(call)
            end = m.end()
    content.append(text[end:])
    return ("".join(content).strip() if calls else text), calls


class ToolCallStream:
    """Text deltas in, (content delta, completed calls) out: text that may begin a tag is held back, a block
    is held whole until its closing tag, so no tag ever reaches the content of a call that parses."""

    def __init__(self):
        self._held = ""  # text not given out yet: a possible tag start, or an open block
        self.calls: list[ToolCall] = []

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        text, out, calls = self._held + delta, [], []
        while True:
            start = text.find(OPEN)
            if start < 0:
                keep = _partial_tag(text)
                out.append(text[:len(text) - keep])
                self._held = text[len(text) - keep:]
                break
            out.append(text[:start])
            end = text.find(CLOSE, start)
            if end < 0:
                self._held = text[start:]
                break
            call = parse_block(text[start + len(OPEN):end])
            if call is None:
                out.append(text[start:end + len(CLOSE)])
            else:
                calls.append(call)
            text = text[end + len(CLOSE):]
        self.calls += calls
        content = "".join(out)
        if self.calls and not content.strip():  # blank lines around calls are not content
            content = ""
        return content, calls

    def finish(self) -> str:
        """What is still held (an unclosed block, a partial tag): content, as the model wrote it."""
        held, self._held = self._held, ""
        return held


def _partial_tag(text: str) -> int:
    """How many trailing characters could be the start of OPEN."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-n:]):
            return n
    return 0
