"""Structured outputs: a request's constraint compiled to a grammar (xgrammar), and one matcher per sequence.

The router sees every token, so the matcher lives here, beside the sequence: at plan time (once its last token
is known) a constrained sequence's next-token bitmask is computed and carried by its SeqPlan; the ranks only
apply it (shards/sampling.py) and never import a grammar engine. Unconstrained sequences carry nothing.

xgrammar, over llguidance or outlines-core: it is the engine vLLM, SGLang and TensorRT-LLM default to, takes
JSON schema, regex, EBNF and grammar composition (the tool-call grammar is a concatenation), fills a batch of
masks in C++ threads, and needs no transformers tokenizer (a raw byte vocabulary is enough).
"""

import asyncio
import functools
import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import xgrammar as xgr
from xgrammar.structural_tag import GrammarFormat, StructuralTag, TagFormat, TagsWithSeparatorFormat

from router.tokenizer import Tokenizer
from router.validation import Constraint, RequestError

CACHE_ENTRIES = 256  # compiled grammars kept, least recently used dropped first
MESSAGE_CHARS = 300  # of an engine's error message, in ours
_ENGINE_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # xgrammar's "[22:12:36] /project/cpp/x.cc:94: "


def _tool_call_grammar(tools: list[dict], parallel: bool) -> xgr.Grammar:
    """Qwen's tool-call format, `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`: calls of
    `tools`, each one's arguments matching its parameter schema; one or more separated by a newline, exactly
    one unless `parallel`. Nothing but calls (xgrammar's structural tag, as vLLM builds for `required`)."""
    calls = {"anyOf": [{"type": "object", "properties": {"name": {"const": t["name"]},
                                                         "arguments": t.get("parameters") or {"type": "object"}},
                        "required": ["name", "arguments"], "additionalProperties": False} for t in tools]}
    call = str(xgr.Grammar.from_json_schema(calls, any_whitespace=False, separators=(", ", ": ")))
    tag = TagFormat(begin="<tool_call>\n", content=GrammarFormat(grammar=call), end="\n</tool_call>")
    return xgr.Grammar.from_structural_tag(StructuralTag(format=TagsWithSeparatorFormat(
        tags=[tag], separator="\n", at_least_one=True, stop_after_first=not parallel)))


def _grammar(kind: str, source: str) -> xgr.Grammar:
    """JSON is compact (no free whitespace): a model, or random weights, cannot spin in blanks until max_tokens."""
    if kind == "json_schema":
        return xgr.Grammar.from_json_schema(source, any_whitespace=False, separators=(", ", ": "))
    if kind == "json_object":
        return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False, separators=(", ", ": "))
    if kind == "regex":
        return xgr.Grammar.from_regex(source)
    if kind == "choice":
        return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in json.loads(source)))
    if kind == "grammar":
        return xgr.Grammar.from_ebnf(source)
    spec = json.loads(source)  # tool_call: {"tools": [{"name", "parameters"}], "parallel": bool}
    return _tool_call_grammar(spec["tools"], spec["parallel"])


class Grammars:
    """Compiles constraints (cached by source, bounded by a timeout) and makes matchers for the vocabulary."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: list[int], timeout_s: float = 10.0):
        self.tokenizer, self.vocab_size, self.eos_token_ids = tokenizer, vocab_size, list(eos_token_ids)
        self.timeout_s = timeout_s
        self._compiler: xgr.GrammarCompiler | None = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], xgr.CompiledGrammar] = OrderedDict()
        self._pending: dict[tuple[str, str], asyncio.Future] = {}
        # Two threads: one pathological grammar past its timeout keeps compiling, the other still serves.
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="grammar")

    def _get_compiler(self) -> xgr.GrammarCompiler:
        """Built on first use (a second for a 152K vocabulary): servers without constrained requests skip it.
        Special tokens are spelled empty, so no grammar can emit them as text."""
        with self._lock:
            if self._compiler is None:
                tok = self.tokenizer
                vocab = [b"" if i in tok.special_ids else tok.token_bytes(i) for i in range(self.vocab_size)]
                info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=self.vocab_size,
                                         stop_token_ids=self.eos_token_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._compiler

    def _compile_now(self, kind: str, source: str) -> xgr.CompiledGrammar:
        return self._get_compiler().compile_grammar(_grammar(kind, source))

    async def compile(self, c: Constraint) -> xgr.CompiledGrammar:
        """The compiled grammar, from the cache or compiled on a thread; RequestError naming c.field when it
        does not compile or takes longer than timeout_s."""
        if c.key in self._cache:
            self._cache.move_to_end(c.key)
            return self._cache[c.key]
        pending = self._pending.get(c.key)
        if pending is None:  # identical constraints arriving together compile once
            pending = asyncio.get_running_loop().run_in_executor(self._pool, self._compile_now, c.kind, c.source)
            self._pending[c.key] = pending
            pending.add_done_callback(lambda _: self._pending.pop(c.key, None))
        try:
            compiled = await asyncio.wait_for(asyncio.shield(pending), self.timeout_s)
        except asyncio.TimeoutError:
            raise RequestError([(c.field, f"`{c.field}` took longer than {self.timeout_s:g} s to compile; "
                                          "simplify it")]) from None
        except (RuntimeError, ValueError, TypeError) as e:  # xgrammar's parse and conversion errors
            message = _ENGINE_PREFIX.sub("", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
            raise RequestError([(c.field, f"`{c.field}` does not compile: {message[:MESSAGE_CHARS]}")]) from None
        self._cache[c.key] = compiled
        if len(self._cache) > CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return compiled

    def matcher(self, compiled: xgr.CompiledGrammar) -> "Matcher":
        return Matcher(compiled, self.vocab_size)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class Matcher:
    """One sequence's grammar state. It follows the sequence's output tokens (sync), so a preempted or recovered
    sequence, recomputed from its tokens, needs nothing special: the state is a function of the tokens."""

    def __init__(self, compiled: xgr.CompiledGrammar, vocab_size: int):
        self._m = xgr.GrammarMatcher(compiled)
        self.vocab_size = vocab_size
        # min_tokens of a constrained request is kept here, in its mask (not by the sampler's ban, which would
        # leave no token at all where the grammar allows only its end): while fewer than min_tokens tokens were
        # generated, the ids that end a sequence are taken out of the mask, unless the grammar allows nothing
        # else. The grammar's end wins, as in vLLM (PR 54218). Set by the runner, which knows the ids.
        self.min_tokens, self.stop_token_ids = 0, ()
        self.accepted = 0  # output tokens fed so far
        self.rejected = False

    def sync(self, output_token_ids: list[int]) -> None:
        """Feed the tokens not fed yet. A token the grammar refuses (never, with its mask applied) marks it."""
        for token in output_token_ids[self.accepted:]:
            if self.rejected or self._m.is_terminated() or not self._m.accept_token(token):
                self.rejected = True
            self.accepted += 1

    @property
    def terminated(self) -> bool:
        return self._m.is_terminated()


def fill_masks(matchers: list[Matcher]) -> list[bytes]:
    """Each matcher's next-token bitmask, packed as xgrammar packs it (int32 words, bit i of word w allows id
    32w + i), filled for the whole batch at once."""
    bitmask = xgr.allocate_token_bitmask(len(matchers), matchers[0].vocab_size)
    if len(matchers) == 1:
        matchers[0]._m.fill_next_token_bitmask(bitmask, 0)
    else:
        _batch().batch_fill_next_token_bitmask([m._m for m in matchers], bitmask)
    words = bitmask.numpy().view(np.uint32)
    for row, m in zip(words, matchers):
        if m.accepted < m.min_tokens and m.stop_token_ids:
            kept = row.copy()
            ids = np.array(m.stop_token_ids)
            np.bitwise_and.at(row, ids >> 5, ~(np.uint32(1) << (ids & 31).astype(np.uint32)))
            if not row.any():  # only an end is allowed: the grammar wins over min_tokens
                row[:] = kept
    return [row.tobytes() for row in words]


@functools.cache
def _batch() -> xgr.BatchGrammarMatcher:
    return xgr.BatchGrammarMatcher()
