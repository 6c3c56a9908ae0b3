"""The checkpoint's own tokenizer and chat template, without transformers.

`Tokenizer.from_pretrained(model_dir)` reads the files a Qwen2 checkpoint ships
(`tokenizer.json`, `tokenizer_config.json`, optionally `chat_template.jinja` and
`generation_config.json`). Encoding and decoding go through the `tokenizers`
library; the chat template is rendered with jinja2 in the same sandboxed
environment, with the same helpers and template variables, as transformers'
`apply_chat_template(messages, tokenize=False, ...)`, so the prompt text is
identical to what the model was trained with.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

__all__ = ["ChatTemplateError", "Tokenizer"]

# The named special tokens transformers passes to every chat template (when set).
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                         "mask_token")
# Names a message's reasoning may come under; transformers fills the first two from any of them.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """The chat template could not be rendered (no template, a syntax error, or the template raised)."""


def _token_content(value) -> str | None:
    # tokenizer_config.json writes special tokens either as strings or as serialized AddedTokens.
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


# --- the jinja environment -------------------------------------------------------------------------------


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Unlike jinja's own tojson: no HTML escaping, non-ASCII kept, json.dumps' options exposed.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _DictFactory:
    """`dict(...)` inside templates, without exposing the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace(), refusing underscore-prefixed attribute names."""

    def __init__(*args, **kwargs):  # noqa: N805 - same signature trick as jinja's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore-prefixed namespace attributes, got {name!r}")


class _GenerationBlock(jinja2.ext.Extension):
    """Accept `{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker) as a no-op."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _compile(template_source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _DictFactory()
    env.globals["namespace"] = _Namespace
    return env.from_string(template_source)


# --- template data ---------------------------------------------------------------------------------------


def _plain(value):
    """Rebuild template data out of plain JSON-like types (what transformers lets templates see)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    if callable(getattr(value, "item", None)):  # numpy scalars
        try:
            return _plain(value.item())
        except Exception:  # noqa: BLE001 - fall through to the placeholder
            pass
    return f"<{type(value).__name__}>"


def _normalize_messages(messages) -> list[dict]:
    out = []
    for i, message in enumerate(_plain(list(messages))):
        if not isinstance(message, dict):
            raise ChatTemplateError(f"messages[{i}] must be a dict with 'role' and 'content', got {message!r}")
        # Keys set to None are dropped (an API's content=None should read as "absent" to the template).
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


# --- the tokenizer ---------------------------------------------------------------------------------------


class Tokenizer:
    """A checkpoint's tokenizer: byte-level BPE encode/decode, special tokens, chat template. (End-of-sequence
    ids are the model's: shards.config.Qwen2Config.eos_token_ids.)"""

    def __init__(self, tokenizer: _HFTokenizer, *, chat_template: str | None = None,
                 special_tokens: Mapping[str, str] | None = None):
        self._tok = tokenizer
        self._compiled: jinja2.Template | None = None
        self.chat_template = chat_template
        # Named special tokens (bos_token, eos_token, ...) as the chat template sees them.
        self.special_tokens = dict(special_tokens or {})
        added = tokenizer.get_added_tokens_decoder()
        self.special_ids: set[int] = {i for i, t in added.items() if t.special}
        self._added_ids = set(added)  # spelled as themselves, not in the byte-level alphabet
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template source (None when the checkpoint has none). Settable."""
        return self._chat_template

    @chat_template.setter
    def chat_template(self, template: str | None) -> None:
        self._chat_template = template
        self._compiled = None

    @classmethod
    def from_pretrained(cls, model_dir) -> "Tokenizer":
        model_dir = pathlib.Path(model_dir)
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{tokenizer_file} not found: the checkpoint has no tokenizer.json")
        tok = _HFTokenizer.from_file(str(tokenizer_file))

        config = _read_json(model_dir / "tokenizer_config.json")
        special_map = _read_json(model_dir / "special_tokens_map.json")
        special_tokens = {}
        for name in _NAMED_SPECIAL_TOKENS:
            content = _token_content(config.get(name))
            if content is None:
                content = _token_content(special_map.get(name))
            if content is not None:
                special_tokens[name] = content

        chat_template = _select_template(config.get("chat_template"))
        template_file = model_dir / "chat_template.jinja"
        if template_file.is_file():  # a separate template file takes priority, as in transformers
            chat_template = template_file.read_text(encoding="utf-8")

        return cls(tok, chat_template=chat_template, special_tokens=special_tokens)

    # --- text <-> ids ---

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings in it become their ids, nothing is added around it.

        Through encode_batch, which (unlike encode) releases the GIL: called on a thread, a long text
        does not stop the event loop."""
        return self._tok.encode_batch([text], add_special_tokens=False)[0].ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    # --- chat ---

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, *,
                            continue_final_message: bool = False, tools: list[dict] | None = None,
                            documents: list[dict] | None = None, **template_kwargs) -> str:
        """The prompt text for `messages`, rendered by the checkpoint's chat template.

        Matches transformers' `apply_chat_template(messages, tokenize=False, add_generation_prompt=...,
        continue_final_message=...)`: the latter ends the text inside the last message (a prefill the model
        continues) instead of after its end-of-turn. Extra keyword arguments become template variables
        (e.g. `enable_thinking=False`).
        """
        if continue_final_message and add_generation_prompt:
            raise ChatTemplateError("continue_final_message and add_generation_prompt cannot both be set: the "
                                    "first continues the last message, the second starts a new one")
        if not self.chat_template:
            raise ChatTemplateError("this checkpoint has no chat_template (tokenizer_config.json or "
                                    "chat_template.jinja); send plain text or token ids instead of messages")
        if self._compiled is None:
            try:
                self._compiled = _compile(self.chat_template)
            except jinja2.exceptions.TemplateError as e:
                raise ChatTemplateError(f"the checkpoint's chat template does not compile: {e}") from e
        chat = _normalize_messages(messages)
        variables = {**self.special_tokens, **_plain(template_kwargs)}
        try:
            rendered = self._compiled.render(messages=chat, tools=_plain(tools), documents=_plain(documents),
                                             add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"chat template error: {e}") from e
        except (TypeError, ValueError, AttributeError, KeyError, IndexError) as e:
            raise ChatTemplateError(f"chat template failed on these messages: {type(e).__name__}: {e}") from e
        return _continue_final(rendered, chat) if continue_final_message else rendered

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (a byte-level BPE token may hold part of a UTF-8 character)."""
        token = self._tok.id_to_token(token_id)
        if token is None:  # a padding row of the embedding past the tokenizer's vocabulary
            return b""
        if token_id in self._added_ids:
            return token.encode()
        try:
            return bytes(_BYTE_DECODER[c] for c in token)
        except KeyError:
            return token.encode()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as a printable character (what byte-level BPE tokens are spelled in)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


def _continue_final(rendered: str, chat: list[dict]) -> str:
    """Cut the rendered chat right after the last message's text, as transformers does."""
    final = chat[-1].get("content") if chat else None
    if isinstance(final, (list, tuple)):
        final = next((p["text"] for p in reversed(final) if isinstance(p, dict) and isinstance(p.get("text"), str)),
                     None)
    if not isinstance(final, str) or final.strip() not in rendered:
        raise ChatTemplateError("continue_final_message is set but the last message's text does not appear in "
                                "the rendered chat")
    at = rendered.rindex(final.strip())
    if rendered[at:at + len(final.lstrip())] == final:  # the template kept the message's trailing spacing
        return rendered[:at + len(final.lstrip())]
    return rendered[:at + len(final.strip())]


def _read_json(path: pathlib.Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _select_template(value) -> str | None:
    # Older configs may hold a list of named templates; the default one is used.
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default")
    if isinstance(value, dict):
        return value.get("default")
    return value if isinstance(value, str) else None
