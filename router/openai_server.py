"""The OpenAI-compatible HTTP front door: FastAPI on uvicorn, in the gRPC server's process and event loop.

A thin translation onto the serving core (router/service.py), as the gRPC API is: the same validation,
tokenizer, chat template, scheduler, metrics (`api="http"`), bearer token and TLS files, so the two APIs
cannot disagree. Request and response shapes are in router/openai_protocol.py. Every error is OpenAI's error
object with the status its SDK maps to a typed exception: 400 invalid field (the message names the field, its
value and the bound), 401 token, 404 model or route, 413 body size, 415 content type, 429 queue full,
503 not serving or draining, 500 only for a bug (logged).
"""

import asyncio
import base64
import contextlib
import dataclasses
import hmac
import json
import logging
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from router.openai_protocol import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
    ChatLogprobs, ChatMessage, ClassifyData, ClassifyRequest, ClassifyResponse, CompletionChoice, CompletionLogprobs,
    CompletionRequest, CompletionResponse, Delta, DetokenizeRequest, DetokenizeResponse, EmbeddingData,
    EmbeddingRequest, EmbeddingResponse, ErrorInfo, ErrorResponse, FunctionCall, ModelCard, ModelList, PoolingData,
    PoolingRequest, PoolingResponse, PoolingUsage, PromptTokensDetails, Sampling, TokenizeChatRequest,
    TokenizeCompletionRequest, TokenizeResponse, TokenLogprob, ToolCallDelta, ToolCallOut, TopLogprob, Usage,
)
from router.runner import EngineUnavailable, Event, Request
from router.scheduler import QueueFullError
from router.service import Admission, InternalError, ServingCore
from router import pooling, tool_calls
from router.validation import (RequestError, UnsupportedTask, ValidRequest, ValidTools, validate_parameters,
                               validate_pooling, validate_token_ids, validate_tools)

log = logging.getLogger(__name__)

MAX_N = 16  # choices per prompt
MAX_CHOICES = 64  # sequences one request may ask for (prompts x n)
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
ERROR_TYPES = {401: "authentication_error", 429: "rate_limit_error", 500: "server_error",
               503: "service_unavailable_error"}  # everything else a client got wrong: invalid_request_error
# The fields both bodies pass to validation under the gRPC API's names (which are also vLLM's).
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty", "seed", "stop_token_ids", "ignore_eos", "min_tokens", "skip_special_tokens",
                   "include_stop_str_in_output", "logit_bias", "cache_salt")
TEMPLATE_OWN = {"messages", "add_generation_prompt", "continue_final_message", "tools", "documents"}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CLIENT_GONE = 499  # nginx's status for a client that closed the connection first (nobody reads it)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        info = ErrorInfo(message=self.message, type=ERROR_TYPES.get(self.status, "invalid_request_error"),
                         param=self.param, code=self.code)
        return JSONResponse(ErrorResponse(error=info).model_dump(), status_code=self.status)


def _refusal(e: RequestError | QueueFullError | EngineUnavailable) -> ApiError:
    """The core's client-facing errors as HTTP errors."""
    if isinstance(e, RequestError):
        return ApiError(400, str(e), param=e.violations[0][0],
                        code="unsupported_task" if isinstance(e, UnsupportedTask) else None)
    if isinstance(e, QueueFullError):
        return ApiError(429, str(e), code="queue_full")
    return ApiError(503, str(e), code="unavailable")


def _invalid(field: str, message: str) -> RequestError:
    return RequestError([(field, message)])


def _template_call(call: dict, where: str) -> dict:
    """An assistant turn's call (OpenAI's shape) as chat templates read it: arguments as an object."""
    fn = call.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise _invalid(where, f"`{where}` must be {{'id': ..., 'type': 'function', 'function': {{'name': ..., "
                              f"'arguments': ...}}}}")
    arguments = fn.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            raise _invalid(f"{where}.function.arguments", f"`{where}.function.arguments` must be a JSON object "
                                                          f"(as text), got {arguments[:100]!r}") from None
    return {"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": arguments}}


def _call_out(call: tool_calls.ToolCall) -> ToolCallOut:
    return ToolCallOut(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))


@dataclass(eq=False)
class Choice:
    """One sequence of a response: what its events brought so far."""

    index: int
    request: Request
    prompt_ids: list[int]
    echo: str | None = None  # the prompt's text, when echoed
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    prompt_logprobs: list[dict | None] | None = None
    finish_reason: str | None = None


class OpenAIApi:
    """The routes' logic over the serving core."""

    def __init__(self, core: ServingCore, model_name: str, fingerprint: str):
        self.core, self.runner, self.model_name, self.fingerprint = core, core.runner, model_name, fingerprint
        self.created = int(time.time())

    # -- reading a request ------------------------------------------------------------------------------
    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`",
                           param="model", code="model_not_found")

    @staticmethod
    def _given(body: Sampling, max_tokens: int | None, logprobs: int | None, names: dict) -> dict:
        """The fields the client set, under the gRPC names validate_parameters reads (`names` gets the HTTP
        names of the constraint's fields)."""
        given = {name: getattr(body, name) for name in SAMPLING_FIELDS if getattr(body, name) is not None}
        given |= OpenAIApi._constraint(body, names)
        if given.get("top_k") == -1:  # vLLM's spelling of "off"
            given["top_k"] = 0
        if body.stop is not None:
            given["stop"] = [body.stop] if isinstance(body.stop, str) else body.stop
        if max_tokens is not None:
            given["max_new_tokens"] = max_tokens
        if logprobs is not None:
            given["logprobs"] = logprobs
        return given

    @staticmethod
    def _constraint(body: Sampling, names: dict) -> dict:
        """OpenAI's response_format and vLLM's structured_outputs, under the gRPC names of the constraints."""
        rf, so = body.response_format, body.structured_outputs
        if rf is not None and rf.type != "text":
            if so is not None:
                raise _invalid("structured_outputs", "set `response_format` or `structured_outputs`, not both")
            if rf.type == "json_object":
                names["json_object"] = "response_format"
                return {"json_object": True}
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise _invalid("response_format.json_schema", "`response_format.json_schema.schema` is required "
                               "with `type`: 'json_schema'")
            names["json_schema"] = "response_format.json_schema.schema"
            return {"json_schema": rf.json_schema.schema_}
        if so is None:
            return {}
        names |= {"json_schema": "structured_outputs.json", "json_object": "structured_outputs.json_object",
                  "regex": "structured_outputs.regex", "choice": "structured_outputs.choice",
                  "grammar": "structured_outputs.grammar"}
        given = {"json_schema": so.json_, "json_object": so.json_object, "regex": so.regex, "choice": so.choice,
                 "grammar": so.grammar}
        return {k: v for k, v in given.items() if v is not None}

    def _choices(self, body: Sampling, prompts: list[list[int]], given: dict, names: dict) -> list[Admission]:
        """n admissions per prompt; with a seed, choice i samples with seed + i (so each is reproducible)."""
        if not 1 <= body.n <= MAX_N:
            raise _invalid("n", f"`n` must be >= 1 and <= {MAX_N}, got {body.n}")
        if len(prompts) * body.n > MAX_CHOICES:
            raise _invalid("n", f"prompts x `n` must be <= {MAX_CHOICES}, got {len(prompts)} x {body.n}")
        out = []
        for ids in prompts:
            valid = validate_parameters(given, len(ids), self.core.defaults, self.core.limits, prefix="", names=names)
            out += [Admission(ids, self._nth(valid, i)) for i in range(body.n)]
        return out

    @staticmethod
    def _nth(valid: ValidRequest, i: int) -> ValidRequest:
        if i == 0 or valid.sampling.seed is None:
            return valid
        sampling = dataclasses.replace(valid.sampling, seed=(valid.sampling.seed + i) % 2**64)
        return dataclasses.replace(valid, sampling=sampling)

    async def _completion_prompts(self, body: CompletionRequest) -> tuple[list[list[int]], list[str | None]]:
        """Token ids of each prompt, and its text (what echo returns)."""
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise _invalid("prompt", "`prompt` must not be empty")
        if len(prompt) > MAX_CHOICES:
            raise _invalid("prompt", f"`prompt` may hold at most {MAX_CHOICES} prompts, got {len(prompt)}")
        ids, texts = [], []
        for i, p in enumerate(prompt):
            name = "prompt" if len(prompt) == 1 else f"prompt[{i}]"
            if isinstance(p, str):
                if not p:
                    raise _invalid(name, f"`{name}` must not be empty")
                self.core.check_size(name, len(p))
                ids.append(await self.core.encode(p))
                texts.append(p)
            else:
                ids.append(validate_token_ids(p, self.core.limits.vocab_size, name))
                texts.append(None)
        return ids, texts

    def _render(self, messages: list[ChatMessage], add_generation_prompt: bool, continue_final_message: bool,
                template_kwargs: dict | None, fields_set: set[str], tools: list[dict] | None = None) -> str:
        chat = []
        for i, m in enumerate(messages):
            content = m.content
            if isinstance(content, list):
                for j, part in enumerate(content):
                    if part.type != "text" or part.text is None:
                        raise _invalid(f"messages[{i}].content[{j}]", f"`messages[{i}].content[{j}].type` must be "
                                       f"'text' with a `text` (images, audio and files are not supported), got "
                                       f"{part.type!r}")
                content = "\n".join(part.text for part in content)
            message = {k: v for k, v in (("role", m.role), ("content", content), ("name", m.name),
                                         ("tool_call_id", m.tool_call_id)) if v is not None}
            if m.tool_calls:
                message["tool_calls"] = [_template_call(call, f"messages[{i}].tool_calls[{j}]")
                                         for j, call in enumerate(m.tool_calls)]
                message.setdefault("content", "")  # templates test the content of a turn that only calls
            chat.append(message)
        own = TEMPLATE_OWN & set(template_kwargs or ())
        if own:
            raise _invalid("chat_template_kwargs", f"`chat_template_kwargs` must not set {sorted(own)}: the request "
                           "sets them itself")
        if continue_final_message and "add_generation_prompt" not in fields_set:
            add_generation_prompt = False  # continuing a message is not starting the next one
        return self.core.render_chat(chat, "messages", add_generation_prompt, continue_final_message,
                                     template_kwargs, tools=tools)

    # -- admission and events ---------------------------------------------------------------------------
    async def _admit(self, read: Callable) -> list[Request]:
        try:
            return await self.core.admit_all(read, api="http")
        except (RequestError, QueueFullError, EngineUnavailable) as e:
            raise _refusal(e) from None

    async def _events(self, choices: list[Choice]) -> AsyncIterator[tuple[Choice, Event]]:
        """The choices' events as they come. Leaving early (the client went away) cancels every choice at once
        (the core frees their KV blocks)."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(choice: Choice):
            async for event in self.core.events(choice.request):
                queue.put_nowait((choice, event))

        tasks = [asyncio.create_task(pump(c)) for c in choices]
        try:
            left = len(choices)
            while left:
                choice, event = await queue.get()
                if event.error is not None:
                    raise ApiError(503, str(event.error), code="unavailable")
                self._apply(choice, event)
                if event.finish_reason is not None:
                    left -= 1
                yield choice, event
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    @staticmethod
    def _apply(choice: Choice, event: Event) -> None:
        choice.text.append(event.text)
        choice.token_ids += event.token_ids
        choice.logprobs += event.logprobs
        if event.prompt_logprobs is not None:
            choice.prompt_logprobs = event.prompt_logprobs
        if event.finish_reason is not None:
            choice.finish_reason = FINISH.get(event.finish_reason, "stop")

    @staticmethod
    async def _until_disconnect(http: HttpRequest, work) -> bool:
        """Await `work` unless the client disconnects first: then it is cancelled, and its sequences with it
        (False). A non-streamed request waits minutes for a long generation: a client that gave up frees its
        KV blocks as a streaming one does."""
        task = asyncio.ensure_future(work)

        async def disconnected():
            while (await http.receive())["type"] != "http.disconnect":
                pass

        watch = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait([task, watch], return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return False
        await task  # its error, if any
        return True

    @staticmethod
    def _usage(choices: list[Choice], prompts: list[list[int]]) -> Usage:
        prompt = sum(len(p) for p in prompts)  # each prompt once, however many choices it has
        completion = sum(len(c.token_ids) for c in choices)
        # A prompt's cached tokens as its first choice found them (its other choices share what it computes).
        n = len(choices) // len(prompts)
        cached = sum(c.request.seq.num_cached_tokens for c in choices[::n])
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))

    # -- logprobs ---------------------------------------------------------------------------------------
    def _token(self, token_id: int) -> tuple[str, list[int]]:
        data = self.core.tokenizer.token_bytes(token_id)
        return data.decode("utf-8", errors="replace"), list(data)

    def _completion_logprobs(self, rows: list[dict | None], token_ids: list[int], offset: int) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for token_id, row in zip(token_ids, rows):
            text = self._token(token_id)[0]
            out.tokens.append(text)
            out.token_logprobs.append(None if row is None else row["logprob"])
            out.top_logprobs.append(None if row is None else {self._token(t)[0]: lp for t, lp in row["top"]})
            out.text_offset.append(offset)
            offset += len(text)
        return out

    def _chat_logprobs(self, rows: list[dict]) -> ChatLogprobs:
        content = []
        for row in rows:
            text, data = self._token(row["token_id"])
            top = [TopLogprob(token=t, logprob=lp, bytes=b) for t, b, lp in
                   ((*self._token(i), lp) for i, lp in row["top"])]
            content.append(TokenLogprob(token=text, logprob=row["logprob"], bytes=data, top_logprobs=top))
        return ChatLogprobs(content=content)

    # -- /v1/completions --------------------------------------------------------------------------------
    async def completions(self, body: CompletionRequest, http: HttpRequest):
        self._check_model(body.model)
        names = {"max_new_tokens": "max_tokens", "prompt_logprobs": "echo"}
        prompts: list[list[int]] = []
        texts: list[str | None] = []

        async def read() -> list[Admission]:
            nonlocal prompts, texts
            if body.suffix:
                raise _invalid("suffix", "`suffix` is not supported: Qwen2 has no fill-in-the-middle mode")
            if body.best_of is not None and body.best_of != body.n:
                raise _invalid("best_of", f"`best_of` must equal `n` ({body.n}): candidates are not ranked "
                               f"server-side, got {body.best_of}")
            given = self._given(body, body.max_tokens, body.logprobs, names)
            if body.echo and (body.logprobs is not None or body.max_tokens == 0):
                given["prompt_logprobs"] = body.logprobs or 0
            prompts, texts = await self._completion_prompts(body)
            return self._choices(body, prompts, given, names)

        requests = await self._admit(read)
        choices = [Choice(i, r, prompts[i // body.n]) for i, r in enumerate(requests)]
        for c in choices:
            if body.echo:
                text = texts[c.index // body.n]
                c.echo = text if text is not None else self.core.tokenizer.decode(c.prompt_ids)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def logprobs(c: Choice, rows: list[dict], token_ids: list[int], offset: int) -> CompletionLogprobs | None:
            if body.logprobs is None:
                return None
            if c.echo is not None and c.prompt_logprobs is not None:
                head = self._completion_logprobs(c.prompt_logprobs, c.prompt_ids, 0)
                tail = self._completion_logprobs(rows, token_ids, len(c.echo))
                return CompletionLogprobs(**{k: getattr(head, k) + getattr(tail, k) for k in CompletionLogprobs.model_fields})
            return self._completion_logprobs(rows, token_ids, offset)

        if not body.stream:
            if not await self._until_disconnect(http, self._drain(choices)):
                return Response(status_code=CLIENT_GONE)
            out = [CompletionChoice(index=c.index, text=(c.echo or "") + "".join(c.text),
                                    logprobs=logprobs(c, c.logprobs, c.token_ids, 0), finish_reason=c.finish_reason)
                   for c in choices]
            return CompletionResponse(id=rid, created=created, model=self.model_name,
                                      system_fingerprint=self.fingerprint, choices=out, usage=self._usage(choices, prompts))

        def chunk(choices_, usage=None) -> str:
            return CompletionResponse(id=rid, created=created, model=self.model_name, system_fingerprint=self.fingerprint,
                                      choices=choices_, usage=usage).model_dump_json()

        async def stream():
            offsets = {c.index: 0 for c in choices}
            echoed: set[int] = set()
            async with contextlib.aclosing(self._events(choices)) as events:
                async for c, event in events:
                    text, rows, ids = event.text, event.logprobs, event.token_ids
                    lp = None
                    if c.echo is not None and c.index not in echoed:
                        echoed.add(c.index)
                        lp = logprobs(c, rows, ids, 0)
                        text = c.echo + text
                    elif body.logprobs is not None:
                        lp = self._completion_logprobs(rows, ids, offsets[c.index])
                    offsets[c.index] += len(text)
                    finish = c.finish_reason if event.finish_reason is not None else None
                    if text or finish or lp is not None and lp.tokens:
                        yield chunk([CompletionChoice(index=c.index, text=text, logprobs=lp, finish_reason=finish)])
            if body.stream_options and body.stream_options.include_usage:
                yield chunk([], self._usage(choices, prompts))

        return self._sse(stream())

    async def _drain(self, choices: list[Choice]) -> None:
        async for _ in self._events(choices):
            pass

    def _sse(self, chunks: AsyncIterator[str]) -> StreamingResponse:
        async def frames():
            try:
                async with contextlib.aclosing(chunks):  # a client gone mid-stream cancels its choices now, not at GC
                    async for data in chunks:
                        yield f"data: {data}\n\n"
            except ApiError as e:  # the engine failed mid-stream: the status line is sent already
                yield f"data: {e.response().body.decode()}\n\n"
            except Exception as e:
                log.exception("stream failed: %s", e)
                self.core.metrics.failed.labels("internal", "http").inc()
                yield f"data: {ApiError(500, f'internal error ({type(e).__name__}); see the server log').response().body.decode()}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(frames(), media_type="text/event-stream", headers=SSE_HEADERS)

    # -- /v1/chat/completions ---------------------------------------------------------------------------
    async def chat(self, body: ChatCompletionRequest, http: HttpRequest):
        self._check_model(body.model)
        max_field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        names = {"max_new_tokens": max_field, "logprobs": "top_logprobs"}
        prompts: list[list[int]] = []

        tools = ValidTools()

        async def read() -> list[Admission]:
            nonlocal prompts, tools
            self._refuse_functions(body)
            if body.top_logprobs is not None and not body.logprobs:
                raise _invalid("top_logprobs", "`top_logprobs` needs `logprobs`: true")
            tools = validate_tools(body.tools, body.tool_choice, self.core.limits,
                                   parallel=body.parallel_tool_calls is not False)
            rendered = self._render(body.messages, body.add_generation_prompt, body.continue_final_message,
                                    body.chat_template_kwargs, body.model_fields_set, tools.template_tools)
            prompts = [await self.core.encode(rendered)]
            given = self._given(body, getattr(body, max_field), (body.top_logprobs or 0) if body.logprobs else None,
                                names)
            if tools.constraint is not None:
                given["tool_call"], names["tool_call"] = tools.constraint, "tool_choice"
            return self._choices(body, prompts, given, names)

        choices = [Choice(i, r, prompts[0]) for i, r in enumerate(await self._admit(read))]
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not body.stream:
            if not await self._until_disconnect(http, self._drain(choices)):
                return Response(status_code=CLIENT_GONE)
            out = []
            for c in choices:
                content, calls = (tool_calls.parse("".join(c.text), tools.names, tools.max_calls) if tools.parse
                                  else ("".join(c.text), []))
                out.append(ChatChoice(
                    index=c.index, logprobs=self._chat_logprobs(c.logprobs) if body.logprobs else None,
                    message=AssistantMessage(content=content or (None if calls else ""),
                                             tool_calls=[_call_out(call) for call in calls]),
                    finish_reason="tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason))
            return ChatCompletionResponse(id=rid, created=created, model=self.model_name,
                                          system_fingerprint=self.fingerprint, choices=out,
                                          usage=self._usage(choices, prompts))

        def chunk(choices_, usage=None) -> str:
            return ChatCompletionChunk(id=rid, created=created, model=self.model_name, system_fingerprint=self.fingerprint,
                                       choices=choices_, usage=usage).model_dump_json()

        async def stream():
            parsers = ({c.index: tool_calls.ToolCallStream(tools.names, tools.max_calls) for c in choices}
                       if tools.parse else {})
            for c in choices:  # the first chunk of each choice carries the role
                yield chunk([ChatChunkChoice(index=c.index, delta=Delta(role="assistant", content=""))])
            async with contextlib.aclosing(self._events(choices)) as events:
                async for c, event in events:
                    lp = self._chat_logprobs(event.logprobs) if body.logprobs else None
                    finish = c.finish_reason if event.finish_reason is not None else None
                    text, parser = event.text, parsers.get(c.index)
                    if parser is not None:  # tags never reach the content; a call: its name, then argument fragments
                        text, deltas = parser.feed(text)
                        text += parser.finish() if finish else ""
                        if finish == "stop" and parser.calls:
                            finish = "tool_calls"
                        if deltas:
                            yield chunk([ChatChunkChoice(index=c.index, delta=Delta(tool_calls=[
                                ToolCallDelta(index=d.index, id=d.id, type="function" if d.id else None,
                                              function=FunctionCall(name=d.name, arguments=d.arguments))
                                for d in deltas]))])
                    if text or finish or lp is not None and lp.content:
                        yield chunk([ChatChunkChoice(index=c.index, delta=Delta(content=text or None), logprobs=lp,
                                                     finish_reason=finish)])
            if body.stream_options and body.stream_options.include_usage:
                yield chunk([], self._usage(choices, prompts))

        return self._sse(stream())

    @staticmethod
    def _refuse_functions(body: ChatCompletionRequest) -> None:
        """The legacy spelling of tools: an error, never ignored."""
        for name in ("functions", "function_call"):
            if getattr(body, name) is not None:
                raise _invalid(name, f"`{name}` is not supported: use `tools` and `tool_choice`")

    # -- tokenizer and metadata -------------------------------------------------------------------------
    async def tokenize(self, body: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
        self._check_model(body.model)
        try:
            if isinstance(body, TokenizeChatRequest):
                tools = validate_tools(body.tools, None, self.core.limits).template_tools
                text = self._render(body.messages, body.add_generation_prompt, body.continue_final_message,
                                    body.chat_template_kwargs, body.model_fields_set, tools)
            else:
                text = body.prompt
                self.core.check_size("prompt", len(text))
            ids = await self.core.encode(text)
        except RequestError as e:
            raise _refusal(e) from None
        strs = [self.core.tokenizer.id_to_token(i) or "" for i in ids] if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.core.limits.max_model_len, tokens=ids,
                                token_strs=strs)

    async def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        self._check_model(body.model)
        if len(body.tokens) > self.core.limits.max_input_chars:
            raise ApiError(400, f"`tokens` must be at most {self.core.limits.max_input_chars} ids, got "
                                f"{len(body.tokens)}", param="tokens")
        try:
            ids = validate_token_ids(body.tokens, self.core.limits.vocab_size, "tokens") if body.tokens else []
        except RequestError as e:
            raise _refusal(e) from None
        return DetokenizeResponse(prompt=self.core.tokenizer.decode(ids, skip_special_tokens=False))

    # -- pooling ----------------------------------------------------------------------------------------
    async def _pool(self, body, spec, http: HttpRequest) -> list[tuple[Request, Event]] | None:
        """Admit every input (all or none; `spec()` reads the task's options) and wait for their answers; None
        when the client went away first (its sequences are cancelled)."""
        self._check_model(body.model)
        given = body.input
        if isinstance(given, str) or (given and all(isinstance(x, int) for x in given)):
            inputs = [("input", given)]
        else:
            inputs = [(f"input[{i}]", x) for i, x in enumerate(given)]

        async def read() -> list[Admission]:
            return await self.core.pooling_admissions(inputs, spec(), "input")

        requests, results = await self._admit(read), []

        async def wait():
            results.extend(await self.core.pooled(requests))

        if not await self._until_disconnect(http, wait()):
            return None
        for _, event in results:
            if event.error is not None:
                raise ApiError(503, str(event.error), code="unavailable")
        return results

    @staticmethod
    def _pooling_usage(results: list[tuple[Request, Event]]) -> PoolingUsage:
        tokens = sum(len(request.seq.prompt_token_ids) for request, _ in results)
        return PoolingUsage(prompt_tokens=tokens, total_tokens=tokens)

    def _spec(self, task: str, body: EmbeddingRequest | PoolingRequest):
        """The pooling task's options (the embedding ones, which the other tasks ignore), checked."""
        return validate_pooling(task, self.core.runner.engine.model.hidden_size, body.pooling, body.normalize,
                                body.dimensions)

    async def embeddings(self, body: EmbeddingRequest, http: HttpRequest) -> EmbeddingResponse | Response:
        results = await self._pool(body, lambda: self._spec("embed", body), http)
        if results is None:
            return Response(status_code=CLIENT_GONE)

        def encode(values):
            if body.encoding_format == "base64":
                return base64.b64encode(values.numpy().astype("<f4").tobytes()).decode()
            return values.tolist()

        return EmbeddingResponse(data=[EmbeddingData(index=i, embedding=encode(e.pooled))
                                       for i, (_, e) in enumerate(results)],
                                 model=self.model_name, usage=self._pooling_usage(results))

    async def classify(self, body: ClassifyRequest, http: HttpRequest) -> ClassifyResponse | Response:
        results = await self._pool(body, lambda: validate_pooling("classify", 0), http)
        if results is None:
            return Response(status_code=CLIENT_GONE)
        labels, data = self.core.runner.engine.model.labels, []
        for i, (_, event) in enumerate(results):
            probs = pooling.probabilities(event.pooled)
            data.append(ClassifyData(index=i, label=labels[int(probs.argmax())], probs=probs.tolist(),
                                     num_classes=len(labels)))
        return ClassifyResponse(id=f"classify-{uuid.uuid4().hex}", created=int(time.time()), model=self.model_name,
                                data=data, usage=self._pooling_usage(results))

    async def pooling(self, body: PoolingRequest, http: HttpRequest) -> PoolingResponse | Response:
        heads = [t for t in self.core.tasks if t in ("classify", "token_classify", "qa")]
        task = body.task or (heads[0] if heads else "embed")
        results = await self._pool(body, lambda: self._spec(task, body), http)
        if results is None:
            return Response(status_code=CLIENT_GONE)
        return PoolingResponse(id=f"pool-{uuid.uuid4().hex}", created=int(time.time()), model=self.model_name,
                               data=[PoolingData(index=i, data=e.pooled.tolist()) for i, (_, e) in enumerate(results)],
                               usage=self._pooling_usage(results))

    def models(self) -> ModelList:
        return ModelList(data=[self.model_card()])

    def model_card(self) -> ModelCard:
        return ModelCard(id=self.model_name, created=self.created, max_model_len=self.core.limits.max_model_len,
                         quantization=self.core.runner.engine.quantization, tasks=list(self.core.tasks))


# -- the ASGI app ---------------------------------------------------------------------------------------------
def _param(loc: tuple) -> str:
    """pydantic's error location as the field's path in the body: ("body", "messages", 0, "content") ->
    messages[0].content (union member tags such as `list[str]` left out)."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier() and part.islower() and part not in ("str", "int", "float", "bool", "list", "dict"):
            out += f".{part}" if out else part
    return out


def _validation_error(e: RequestValidationError, content_type: str) -> ApiError:
    errors = e.errors()
    if any(err["type"] == "json_invalid" for err in errors):
        err = next(err for err in errors if err["type"] == "json_invalid")
        return ApiError(400, f"the body is not valid JSON: {err.get('ctx', {}).get('error', '')} at character "
                             f"{err['loc'][-1]}", code="invalid_json")
    if errors and errors[0]["loc"] == ("body",):  # not a JSON object at all
        if "json" not in content_type:
            return ApiError(415, f"the body must be JSON (Content-Type: application/json), got Content-Type "
                                 f"{content_type or 'none'!r}", code="unsupported_media_type")
        return ApiError(400, f"the body must be a JSON object: {errors[0]['msg']}")
    seen, messages = set(), []
    for err in errors:
        param = _param(err["loc"])
        if param in seen:  # a union reports each member's complaint: the first is enough
            continue
        seen.add(param)
        if err["type"] == "extra_forbidden":
            messages.append(f"`{param}` is not a field of this request (unsupported fields are refused, not ignored)")
        elif err["type"] == "missing":
            messages.append(f"`{param}` is required")
        else:
            value = repr(err.get("input"))
            messages.append(f"`{param}`: {err['msg']}, got {value[:100] + '...' if len(value) > 100 else value}")
    return ApiError(400, "; ".join(messages[:5]), param=_param(errors[0]["loc"]) if errors else None)


class Gate:
    """Before any route reads a body: the bearer token (compared in constant time; /health is open) and the body
    size (413 at once when Content-Length says it is too large, or as soon as a chunked body's bytes pass the
    limit, never reading more than the limit into memory)."""

    def __init__(self, app, auth_token: str | None, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.expected = f"Bearer {auth_token}".encode() if auth_token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected is not None and scope["path"] != "/health":
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                error = ApiError(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                                 code="invalid_api_key")
                return await error.response()(scope, receive, send)
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body_bytes:
            return await self._too_large().response()(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body_bytes:
                raise HTTPException(413)  # answered by the app's handler below
            return message

        await self.app(scope, limited, send)

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the body is larger than {self.max_body_bytes} bytes", code="request_too_large")


def build_app(api: OpenAIApi, version: str, auth_token: str | None, max_body_bytes: int) -> Gate:
    """The routes behind the Gate, with OpenAI's error object for every error."""
    app = FastAPI(title="qwen2-cluster OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    runner = api.runner

    @app.exception_handler(ApiError)
    async def api_error(http, e: ApiError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(http, e: RequestValidationError):
        return _validation_error(e, http.headers.get("content-type", "")).response()

    @app.exception_handler(HTTPException)
    async def http_error(http, e: HTTPException):
        code = {404: "unknown_url", 405: "method_not_allowed", 413: "request_too_large"}.get(e.status_code)
        message = {404: f"no route {http.method} {http.url.path}",
                   413: f"the body is larger than {max_body_bytes} bytes"}.get(e.status_code, str(e.detail))
        return ApiError(e.status_code, message, code=code).response()

    @app.exception_handler(Exception)
    async def internal(http, e: Exception):
        log.exception("request failed: %s", e)
        if not isinstance(e, InternalError):  # counted where it was raised
            runner.metrics.failed.labels("internal", "http").inc()
        return ApiError(500, f"internal error ({type(e).__name__}); see the server log").response()

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, http: HttpRequest):
        return await api.completions(body, http)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatCompletionRequest, http: HttpRequest):
        return await api.chat(body, http)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return api.models()

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> ModelCard:
        api._check_model(model)
        return api.model_card()

    @app.post("/v1/embeddings", response_model=None)
    async def embeddings(body: EmbeddingRequest, http: HttpRequest):
        return await api.embeddings(body, http)

    @app.post("/classify", response_model=None)
    async def classify(body: ClassifyRequest, http: HttpRequest):
        return await api.classify(body, http)

    @app.post("/pooling", response_model=None)
    async def pool(body: PoolingRequest, http: HttpRequest):
        return await api.pooling(body, http)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeChatRequest | TokenizeCompletionRequest) -> TokenizeResponse:
        return await api.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        return await api.detokenize(body)

    @app.get("/health")
    async def health():
        if runner.serving:
            return {"status": "serving"}
        return ApiError(503, "not serving (the engine is starting, failed or being rebuilt, or the server drains)",
                        code="unavailable").response()

    @app.get("/version")
    async def get_version():
        return {"version": version}

    return Gate(app, auth_token, max_body_bytes)


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handlers: `serve` owns SIGTERM, which drains gRPC and HTTP together."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpServer:
    """The OpenAI API served by uvicorn on the running event loop: `start()` listens, `stop()` closes."""

    def __init__(self, core: ServingCore, model_name: str, version: str, host: str, port: int,
                 auth_token: str | None = None, max_body_bytes: int = 64 * 2**20, tls_cert_file: str | None = None,
                 tls_key_file: str | None = None, tls_client_ca_file: str | None = None):
        c = core.runner.engine.config
        fingerprint = f"qwen2-cluster-{version}-tp{c.tensor_parallel_size}-pp{c.pipeline_parallel_size}"
        app = build_app(OpenAIApi(core, model_name, fingerprint), version, auth_token, max_body_bytes)
        self.host = host
        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", access_log=False, lifespan="off",
            timeout_graceful_shutdown=5, ssl_certfile=tls_cert_file, ssl_keyfile=tls_key_file,
            ssl_ca_certs=tls_client_ca_file,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls_client_ca_file else ssl.CERT_NONE)
        self.server = _Uvicorn(config)
        self.port = port
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        # Bound here, so a taken port raises OSError to the caller (uvicorn's own bind would sys.exit).
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.create_server((self.host, self.port), family=family)
        self.port = sock.getsockname()[1]
        self._task = asyncio.create_task(self.server.serve(sockets=[sock]))
        while not self.server.started:
            if self._task.done():
                sock.close()
                self._task.result()  # why it stopped
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._task is not None:
            self.server.should_exit = True
            await asyncio.gather(self._task, return_exceptions=True)
