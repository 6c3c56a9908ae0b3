"""Incremental detokenization for streaming, with stop strings.

Byte-level BPE tokens are byte strings: a Chinese character or an emoji can be
split across two or three tokens, and decoding a prefix of the sequence then
ends in U+FFFD. Re-decoding the whole output on every token would cost O(length)
per token, so only a small window is decoded (the prefix-offset / read-offset
technique):

    ids[prefix_offset:read_offset]   already emitted; decoded again as context
    ids[read_offset:]                not emitted yet

Each token, the window `ids[prefix_offset:]` is decoded; what it adds past the
context's text is emitted unless it ends in U+FFFD (the tail may be a partial
UTF-8 character), in which case it is held until more tokens arrive. After an
emission the window slides: prefix_offset <- read_offset <- len(ids).

A U+FFFD at the end is not always a partial character (a stray continuation
byte, or a token whose text really is U+FFFD). To keep the held window from
growing in that case, a split before the newest token is accepted when decoding
the two sides separately gives the same text as decoding them together and the
newest token has text of its own: the bytes after the split then terminated any
incomplete sequence, so text up to the split can no longer change. Tokens with
no text (skipped special tokens) let the read offset pass when nothing is
partial, and a long run of them drops the context, so the window stays a few
tokens long whatever the output length.

Stop strings are matched on the emitted text stream: any tail that could be the
beginning of a stop string is held back, and when a stop string completes only
the text before it is emitted (through it with include_stop_str_in_output). If
several could match, the one that completes first in the text wins (ties: the one
starting first). With min_tokens, stop strings are looked for only from the
min_tokens-th token on (vLLM's rule): earlier text is emitted as is.
"""

from __future__ import annotations

from router.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer"]

_REPLACEMENT = "\ufffd"
# Text-less tokens (skipped special tokens) tolerated in the window before its context is dropped.
_MAX_EMPTY_RUN = 16


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, stop=(), skip_special_tokens: bool = True,
                 include_stop_str_in_output: bool = False, min_tokens: int = 0):
        stop = [stop] if isinstance(stop, str) else list(stop or ())
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError("stop strings must be non-empty strings")
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stop = tuple(dict.fromkeys(stop))  # de-duplicated, order kept
        self._max_stop = max((len(s) for s in self._stop), default=0)
        self._include_stop = include_stop_str_in_output
        self._min_tokens = min_tokens

        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._prefix_text = ""  # decode(ids[prefix_offset:read_offset])
        self._pending = ""  # decoded, but held back because it could begin a stop string
        self._chunks: list[str] = []
        self._text: str | None = ""
        self._finished = False
        self.stopped = False
        self.matched_stop: str | None = None

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        if self._text is None:
            self._text = "".join(self._chunks)
            self._chunks = [self._text]
        return self._text

    @property
    def token_ids(self) -> list[int]:
        return self._ids

    def add(self, token_id: int) -> str:
        """Append one token; return the text that is now safe to emit ("" when nothing is)."""
        if self.stopped or self._finished:
            return ""
        self._ids.append(int(token_id))
        return self._emit(self._decode_step(), final=False)

    def finish(self) -> str:
        """The sequence ended (not by a stop string): return whatever is still held back."""
        if self.stopped or self._finished:
            return ""
        self._finished = True
        n = len(self._ids)
        delta = ""
        if self._read_offset < n:
            window = self._decode(self._prefix_offset, n)
            delta = window[len(self._prefix_text):] if window.startswith(self._prefix_text) else window
            self._prefix_offset, self._read_offset, self._prefix_text = self._read_offset, n, delta
        return self._emit(delta, final=True)

    # --- UTF-8-safe decoding over a small window ---

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip_special)

    def _decode_step(self) -> str:
        n = len(self._ids)
        prefix_text = self._prefix_text
        window = self._decode(self._prefix_offset, n)
        new_read = n
        if window.endswith(_REPLACEMENT):
            # Possibly a partial character. Accept a split before the newest token if it is final.
            k = n - 1
            if k <= self._read_offset:
                return ""
            head = self._decode(self._prefix_offset, k)
            tail = self._decode(k, n)
            if not tail or head + tail != window:
                return ""
            window, new_read = head, k
        if window == prefix_text:
            # No new text (e.g. a skipped special token) and nothing partial: let the read offset pass
            # it, and drop the context if a long run of such tokens would make the window grow.
            self._read_offset = new_read
            if new_read - self._prefix_offset > _MAX_EMPTY_RUN:
                self._prefix_offset, self._prefix_text = new_read, ""
            return ""
        if len(window) < len(prefix_text) or not window.startswith(prefix_text):
            return ""  # the context decodes differently in the longer window: wait for more tokens
        delta = window[len(prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, new_read
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        return delta

    # --- stop strings ---

    def _emit(self, delta: str, *, final: bool) -> str:
        if not self._stop or len(self._ids) < self._min_tokens:
            return self._append(delta)
        buf = self._pending + delta
        if not buf:
            return ""
        match = self._first_stop(buf)
        if match is not None:
            start, stop = match
            self.stopped = True
            self.matched_stop = stop
            self._pending = ""
            return self._append(buf[:start + len(stop) if self._include_stop else start])
        keep = 0 if final else self._stop_prefix_len(buf)
        self._pending = buf[len(buf) - keep:] if keep else ""
        return self._append(buf[:len(buf) - keep])

    def _first_stop(self, buf: str):
        best = None  # (end, start, stop)
        for stop in self._stop:
            i = buf.find(stop)
            if i >= 0:
                cand = (i + len(stop), i, stop)
                if best is None or cand[:2] < best[:2]:
                    best = cand
        return None if best is None else (best[1], best[2])

    def _stop_prefix_len(self, buf: str) -> int:
        """Length of the longest tail of `buf` that is a proper prefix of some stop string."""
        for length in range(min(len(buf), self._max_stop - 1), 0, -1):
            tail = buf[-length:]
            if any(s.startswith(tail) for s in self._stop):
                return length
        return 0

    def _append(self, delta: str) -> str:
        if delta:
            self._chunks.append(delta)
            self._text = None
        return delta
