"""The serving core both front doors share: input size limits, chat rendering, tokenization, admission and a
request's event stream, with the request metrics counted once here.

The gRPC and HTTP APIs only translate their wire formats onto this: a rule (a limit, a default, an error
class) lives here or below, so the two can never disagree. Admission raises one of three client-facing
errors, which each API maps to its own status: RequestError (invalid field: INVALID_ARGUMENT / 400),
QueueFullError (RESOURCE_EXHAUSTED / 429), EngineUnavailable (UNAVAILABLE / 503). Anything else is a bug
(INTERNAL / 500), logged by the API that caught it.
"""

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from router.runner import EngineUnavailable, Event, Request, Runner
from router.scheduler import QueueFullError
from router.structured import Grammars
from router.tokenizer import ChatTemplateError, Tokenizer
from router.validation import (Defaults, Limits, PoolingSpec, RequestError, UnsupportedTask, ValidRequest,
                               validate_pooling_prompt, validate_token_ids)
from shards.rope import ORIGINAL, SCALED
from shards.sampling import SamplingParams

LONG_TEXT_CHARS = 50_000  # tokenized off the event loop from this length on
CHAT_MESSAGE_CHARS = 32  # what one chat message counts toward max_input_chars beyond its role and content


class InternalError(RuntimeError):
    """A bug met while admitting a request (already counted): the API logs it and answers its internal error."""


@dataclass(frozen=True)
class Admission:
    """What a request becomes once its API has read it: token ids and checked parameters."""

    prompt_ids: list[int]
    valid: ValidRequest


class ServingCore:
    def __init__(self, runner: Runner, tokenizer: Tokenizer, defaults: Defaults, limits: Limits,
                 rope_scaling_mode: str = "per-request", grammar_timeout_s: float = 10.0):
        self.runner, self.tokenizer, self.defaults, self._limits = runner, tokenizer, defaults, limits
        self.rope_scaling_mode = rope_scaling_mode  # "per-request", "static" (YaRN for all) or "off"
        engine = runner.engine
        self.grammars = Grammars(tokenizer, engine.vocab_size, engine.eos_token_ids, grammar_timeout_s)

    @property
    def limits(self) -> Limits:
        """The served limits; max_model_len never above the runner's (the KV capacity, once the engine is up)."""
        if self._limits.max_model_len > self.runner.max_model_len:
            self._limits = dataclasses.replace(self._limits, max_model_len=self.runner.max_model_len)
        return self._limits

    @property
    def metrics(self):
        return self.runner.metrics

    # -- input --------------------------------------------------------------------------------------
    def check_size(self, field: str, chars: int) -> None:
        """Before tokenizing or rendering: the work they take grows with the input."""
        if chars > self.limits.max_input_chars:
            raise RequestError([(field, f"`{field}` must be at most {self.limits.max_input_chars} characters, "
                                        f"got {chars}")])

    async def encode(self, text: str) -> list[int]:
        """Long texts are tokenized on a thread: the Rust tokenizer lets the event loop stream meanwhile
        (4M characters take seconds)."""
        if len(text) < LONG_TEXT_CHARS:
            return self.tokenizer.encode(text)
        return await asyncio.to_thread(self.tokenizer.encode, text)

    def render_chat(self, messages: list[dict], field: str = "chat.messages", add_generation_prompt: bool = True,
                    continue_final_message: bool = False, template_kwargs: dict | None = None,
                    chat_field: str | None = None, tools: list[dict] | None = None) -> str:
        """The rendered chat, within max_input_chars both before rendering and after. `messages` are the
        template's dicts (role, content, tool_calls, ...); `field` is where they sit in the API's request,
        `chat_field` what the size and template errors name (default: `field`); `template_kwargs` are extra
        template variables (not the ones the call itself sets); `tools` (OpenAI's shape) go to the template,
        which renders them as the model was trained to read them."""
        if not messages:
            raise RequestError([(field, f"`{field}` must not be empty")])
        for i, m in enumerate(messages):
            if not m.get("role"):
                raise RequestError([(f"{field}[{i}].role", f"`{field}[{i}].role` must not be empty")])
        # A message counts CHAT_MESSAGE_CHARS beyond its text: rendering one costs about as much as tokenizing
        # that many characters, and a template may drop it (Qwen2's renders an unknown role as nothing).
        chat_field = chat_field or field
        size = sum(len(m["role"]) + len(str(m.get("content") or "")) + len(json.dumps(m.get("tool_calls") or ""))
                   + CHAT_MESSAGE_CHARS for m in messages) + len(json.dumps(tools or ""))
        self.check_size(chat_field, size)
        try:
            rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                          continue_final_message=continue_final_message,
                                                          tools=tools, **(template_kwargs or {}))
        except ChatTemplateError as e:
            raise RequestError([(chat_field, str(e))]) from None
        self.check_size(chat_field, len(rendered))
        return rendered

    def rope_variant(self, total_len: int) -> int:
        """YaRN only for requests that need it (prompt + max_new_tokens past the original window)."""
        scaling = self.runner.engine.model.rope_scaling
        if scaling is None or self.rope_scaling_mode == "off":
            return ORIGINAL
        if self.rope_scaling_mode == "static" or total_len > scaling.original_max_position_embeddings:
            return SCALED
        return ORIGINAL

    # -- tasks and pooling ---------------------------------------------------------------------------------
    @property
    def tasks(self) -> tuple[str, ...]:
        """What the served checkpoint's class serves: generate, embed, classify, token_classify, qa."""
        return self.runner.engine.model.tasks

    def check_task(self, task: str) -> None:
        if task not in self.tasks:
            model = self.runner.engine.model.architecture
            raise UnsupportedTask([("task", f"the served model ({model}) does not serve `{task}` requests; it "
                                            f"serves: {', '.join(self.tasks)}")])

    async def pooling_admissions(self, inputs: list[tuple[str, str | list[int]]], spec: PoolingSpec,
                                 field: str) -> list[Admission]:
        """A pooling request's inputs, (where it sits in the request, text or token ids) each, as admissions:
        tokenized and within the limits, each computed as one prefill-only sequence. `field` names the list."""
        if not inputs:
            raise RequestError([(field, f"`{field}` must not be empty")])
        if len(inputs) > self.limits.max_pooling_inputs:
            raise RequestError([(field, f"`{field}` must hold at most {self.limits.max_pooling_inputs} inputs, got "
                                        f"{len(inputs)}")])
        valid = ValidRequest(max_new_tokens=0, sampling=SamplingParams(), pooling=spec)
        out = []
        for where, given in inputs:
            if isinstance(given, str):
                if not given:
                    raise RequestError([(where, f"`{where}` must not be empty")])
                self.check_size(where, len(given))
                ids = await self.encode(given)
            else:
                ids = validate_token_ids(given, self.limits.vocab_size, where)
            validate_pooling_prompt(len(ids), self.limits, where)
            out.append(Admission(ids, valid))
        return out

    async def pooled(self, requests: list[Request]) -> list[tuple[Request, Event]]:
        """Each admitted pooling request with its last event (its answer, or its error)."""

        async def last(request: Request) -> tuple[Request, Event]:
            async for event in self.events(request):
                pass
            return request, event

        return list(await asyncio.gather(*(last(r) for r in requests)))

    # -- admission and streaming ------------------------------------------------------------------------
    async def admit(self, read: Callable[[], Awaitable[Admission]], api: str = "grpc") -> Request:
        """Read one request (`read` tokenizes and validates) and hand it to the scheduler."""

        async def read_one() -> list[Admission]:
            return [await read()]

        return (await self.admit_all(read_one, api))[0]

    async def admit_all(self, read: Callable[[], Awaitable[list[Admission]]], api: str) -> list[Request]:
        """Read a request that asks for several sequences (n choices, several prompts) and hand them all to the
        scheduler at once, so they are scheduled together: all of them or none. Each sequence counts as a
        request received (so ratios of failed or finished to received stay within 1), and every refusal by its
        kind; `api` (grpc, http) labels them. An unexpected exception is counted `internal` and raised as
        InternalError for the API to log and answer as its internal error (never as the client's fault)."""
        metrics = self.metrics
        metrics.received.labels(api).inc()
        submitted: list[Request] = []
        count = 1
        try:
            admissions = await read()
            count = len(admissions)
            metrics.received.labels(api).inc(count - 1)
            for admission in admissions:  # all checked before any is queued
                self.check_task("generate" if admission.valid.pooling is None else admission.valid.pooling.task)
            # Compiled before anything is queued (a bad constraint refuses the whole request); n choices share one.
            grammars = [admission.valid.constraint and await self.grammars.compile(admission.valid.constraint)
                        for admission in admissions]
            for admission, grammar in zip(admissions, grammars):
                valid = admission.valid
                submitted.append(self.runner.submit(
                    admission.prompt_ids, valid, self.rope_variant(len(admission.prompt_ids) + valid.max_new_tokens),
                    api=api, matcher=grammar and self.grammars.matcher(grammar)))
            return submitted
        except asyncio.CancelledError:
            for request in submitted:
                self.runner.cancel(request)
            raise
        except Exception as e:
            kind = ("validation" if isinstance(e, RequestError) else "overloaded" if isinstance(e, QueueFullError)
                    else "unavailable" if isinstance(e, EngineUnavailable) else "internal")
            for request in submitted:  # those already queued go with the rest
                self.runner.cancel(request, kind)
            metrics.failed.labels(kind, api).inc(count - len(submitted))
            if kind == "internal":
                raise InternalError(f"admission failed: {type(e).__name__}: {e}") from e
            raise

    async def events(self, request: Request, deadline_passed: Callable[[], bool] = lambda: False
                     ) -> AsyncIterator[Event]:
        """The request's events until its last one (an error event is the last too). If the caller stops
        reading first (client gone, deadline), the request is cancelled and its KV blocks freed at once."""
        try:
            while True:
                event: Event = await request.events.get()
                yield event
                if event.finish_reason is not None or event.error is not None:
                    return
        finally:
            self.runner.cancel(request, "deadline" if deadline_passed() else "cancelled")
