"""Qwen's tool calls in generated text: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks
(the format Qwen's chat templates ask for) parsed out of the content, as a stream of OpenAI-style deltas.

One state machine serves both the whole text and a stream (`parse` feeds it the whole text at once), so a
streamed answer's deltas add up to exactly the non-streamed one. A block becomes a call once its head is
complete: `{"name": "<one of the request's tools>", "arguments": {` (the point of no return, as in vLLM's
streaming parsers); from there its arguments are streamed as the model writes them, and they are that text
exactly (the object as written, not re-serialized). A block whose head is not that (not JSON, an unknown
name, arguments not an object, arguments before the name) stays in the content as the model wrote it, tags
and all, once it closes: `auto` tool choice never turns a model's mistake into an error.
"""

import json
import re
import uuid
from dataclasses import dataclass, field

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\{)')


@dataclass
class ToolCall:
    name: str
    arguments: str = ""  # the arguments object as the model wrote it (JSON text)
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


@dataclass(frozen=True)
class CallDelta:
    """A call's first delta has its id and name (arguments ""); the next ones carry argument fragments."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None


class ToolCallStream:
    """Text deltas in, (content delta, call deltas) out. Text that may begin a tag is held back, and a block
    until its head decides what it is, so no tag of a call ever reaches the content. `names`: the request's
    tools (None: any name); `max_calls`: calls past it (parallel_tool_calls false: 1) are dropped whole."""

    def __init__(self, names=None, max_calls: int | None = None):
        self.names = None if names is None else set(names)
        self.max_calls = max_calls
        self.calls: list[ToolCall] = []
        self.complete = 0  # how many of the calls are written whole (their arguments object closed)
        self._state = "text"  # text | head (a block opened, its head not decided) | args | tail (past the args)
        self._held = ""  # text: a possible tag start; head: the block so far; tail: what follows the arguments
        self._call: ToolCall | None = None  # the call being written; None in a dropped one
        self._depth, self._in_string, self._escape = 0, False, False

    def feed(self, delta: str) -> tuple[str, list[CallDelta]]:
        text, content, deltas = self._held + delta, [], []
        self._held = ""
        while text:
            if self._state == "text":
                start = text.find(OPEN)
                if start < 0:
                    keep = _partial_tag(text)
                    content.append(text[:len(text) - keep])
                    self._held = text[len(text) - keep:]
                    break
                content.append(text[:start])
                self._state, text = "head", text[start:]
            elif self._state == "head":
                text = self._head(text, content, deltas)
            elif self._state == "args":
                text = self._arguments(text, deltas)
            else:  # tail: whatever the model wrote after the arguments, up to the closing tag, is dropped
                end = text.find(CLOSE)
                if end < 0:
                    self._held = text[-(len(CLOSE) - 1):]
                    break
                self._state, text = "text", text[end + len(CLOSE):]
        out = "".join(content)
        if self.calls and not out.strip():  # blank lines around calls are not content
            out = ""
        return out, deltas

    def _head(self, text: str, content: list, deltas: list) -> str:
        """`text` starts with OPEN. A call once its head is complete; content once the block closes without one."""
        body = text[len(OPEN):]
        end = body.find(CLOSE)
        m = _HEAD.match(body)
        name = _name(m.group(1)) if m and (end < 0 or m.end() <= end) else None
        if name is not None and (self.names is None or name in self.names):
            self._state, self._depth, self._in_string, self._escape = "args", 0, False, False
            self._call = None
            if self.max_calls is None or len(self.calls) < self.max_calls:
                self._call = ToolCall(name)
                self.calls.append(self._call)
                deltas.append(CallDelta(len(self.calls) - 1, id=self._call.id, name=name))
            return body[m.end():]
        if end >= 0:  # closed without a call's head: the model's text, tags and all
            content.append(text[:len(OPEN) + end + len(CLOSE)])
            self._state = "text"
            return body[end + len(CLOSE):]
        self._held = text
        return ""

    def _arguments(self, text: str, deltas: list) -> str:
        """Scan the arguments object (strings and escapes respected) up to its closing brace. A `<` outside a
        string is no JSON: the object was cut off (a closing tag, say) and ends there."""
        for i, ch in enumerate(text):
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif ch == "\\":
                    self._escape = True
                elif ch == '"':
                    self._in_string = False
                continue
            if ch == "<":
                return self._end_arguments(text[:i], deltas, text[i:])
            self._in_string = ch == '"'
            self._depth += (ch in "{[") - (ch in "}]")
            if self._depth == 0:
                return self._end_arguments(text[:i + 1], deltas, text[i + 1:])
        return self._emit(text, deltas, "")

    def _end_arguments(self, fragment: str, deltas: list, rest: str) -> str:
        self._state, self.complete = "tail", len(self.calls)
        return self._emit(fragment, deltas, rest)

    def _emit(self, fragment: str, deltas: list, rest: str) -> str:
        if fragment and self._call is not None:
            self._call.arguments += fragment
            deltas.append(CallDelta(len(self.calls) - 1, arguments=fragment))
        return rest

    def finish(self) -> str:
        """At the end of the output: what is still held as content (a partial tag, a block without a call's
        head, as the model wrote it); an unfinished call stays a call, cut where the output ended."""
        held = self._held if self._state in ("text", "head") else ""
        self._held, self._state, self.complete = "", "text", len(self.calls)
        return held


def parse(text: str, names=None, max_calls: int | None = None) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a whole output: what a stream of it adds up to, the content stripped around calls."""
    stream = ToolCallStream(names, max_calls)
    content, _ = stream.feed(text)
    content += stream.finish()
    return (content.strip() if stream.calls else content), stream.calls


def _name(quoted: str) -> str | None:
    try:
        name = json.loads(f'"{quoted}"')
    except json.JSONDecodeError:
        return None
    return name or None


def _partial_tag(text: str) -> int:
    """How many trailing characters could be the start of OPEN."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-n:]):
            return n
    return 0
