"""The gRPC front door: validation, tokenization and streaming over the engine loop.

The server listens (health NOT_SERVING) before the engine is up, so probes and clients get a clear
answer while 72B weights load; health turns SERVING once the engine serves and back to NOT_SERVING
when it fails or drains.
"""

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from qwen2_client.proto import serving_pb2 as pb
from qwen2_client.proto import serving_pb2_grpc as pb_grpc
from router.openai_server import HttpServer
from router.runner import EngineUnavailable, Event, Request
from router.scheduler import QueueFullError
from router.service import Admission, InternalError, ServingCore
from router import pooling, tool_calls
from router.validation import (RequestError, UnsupportedTask, ValidTools, validate_parameters, validate_pooling,
                               validate_token_ids, validate_tools)
from shards.rope import SCALED

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name
FINISH = {"length": pb.FINISH_REASON_LENGTH, "stop": pb.FINISH_REASON_STOP, "eos": pb.FINISH_REASON_EOS,
          "cancelled": pb.FINISH_REASON_CANCELLED}  # and FINISH_REASON_TOOL_CALLS when parsed calls ended it


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    max_message_bytes: int = 64 * 2**20
    max_concurrent_rpcs: int | None = None
    tls_cert_file: str | None = None  # PEM certificate chain: serve TLS
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None  # PEM CA: require client certificates signed by it (mTLS)
    auth_token: str | None = None  # require `authorization: Bearer <token>` (health, reflection exempt)
    metrics_port: int | None = None  # Prometheus text on http://host:port/metrics; None: off
    http_port: int | None = None  # the OpenAI-compatible HTTP API (router/openai_server.py); None: off


# Open without a token, so probes and tooling work: the standard health and reflection services.
AUTH_EXEMPT = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
               "/grpc.reflection.v1.ServerReflection/")


class BearerTokenAuth(grpc.aio.ServerInterceptor):
    """Reject calls without the configured bearer token, compared in constant time."""

    def __init__(self, token: str):
        self.expected = f"Bearer {token}".encode()

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        self.deny = grpc.unary_unary_rpc_method_handler(deny)

    async def intercept_service(self, continuation, details):
        if details.method.startswith(AUTH_EXEMPT):
            return await continuation(details)
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(given.encode(), self.expected):
            return await continuation(details)
        return self.deny


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


async def _abort(context, code: grpc.StatusCode, message: str, violations=()):
    """End the RPC with `code`; field violations travel as a google.rpc.BadRequest detail."""
    status = status_pb2.Status(code=code.value[0], message=message)
    if violations:
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in violations
        ]))
        status.details.append(detail)
    await context.abort_with_status(rpc_status.to_status(status))


async def _internal(service, context, error: Exception):
    log.exception("request failed: %s", error)
    if not isinstance(error, InternalError):  # counted where it was raised
        service.runner.metrics.failed.labels("internal", "grpc").inc()
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__}); see the server log")


class Malformed:
    """A request that did not parse (corrupt wire format, invalid UTF-8 in a string field)."""

    def __init__(self, message_class, error: DecodeError):
        self.message = f"the request is not a valid {message_class.DESCRIPTOR.full_name}: {error}"


def _parse(message_class):
    """A request deserializer that never raises: gRPC answers a deserializer's exception with UNKNOWN,
    but bytes that are not the message are the caller's error, so the handler answers INVALID_ARGUMENT."""

    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except DecodeError as e:
            return Malformed(message_class, e)

    return parse


def add_generation_service(service: "GenerationService", server) -> None:
    """The generated add_GenerationServicer_to_server, with deserializers that let handlers refuse bad bytes."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["Generation"].methods:
        kind = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = kind(getattr(service, method.name),
                                     request_deserializer=_parse(getattr(pb, method.input_type.name)),
                                     response_serializer=getattr(pb, method.output_type.name).SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


async def _refuse_malformed(request, context):
    if isinstance(request, Malformed):
        await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, request.message)


def unary_errors(handler):
    """An unexpected exception becomes INTERNAL (not UNKNOWN), logged here, with no details leaked."""

    async def wrapper(self, request, context):
        try:
            await _refuse_malformed(request, context)
            return await handler(self, request, context)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as e:
            await _internal(self, context, e)

    return wrapper


def stream_errors(handler):
    async def wrapper(self, request, context):
        try:
            await _refuse_malformed(request, context)
            async for item in handler(self, request, context):
                yield item
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as e:
            await _internal(self, context, e)

    return wrapper


async def _refuse(context, e: RequestError | QueueFullError | EngineUnavailable):
    """The core's client-facing admission errors as gRPC statuses."""
    if isinstance(e, UnsupportedTask):
        await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(e), e.violations)
    if isinstance(e, RequestError):
        await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e), e.violations)
    if isinstance(e, QueueFullError):
        await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
    await _abort(context, grpc.StatusCode.UNAVAILABLE, str(e))


class GenerationService(pb_grpc.GenerationServicer):
    """The gRPC API: its messages translated onto the serving core."""

    def __init__(self, core: ServingCore, model_name: str):
        self.core, self.runner, self.model_name = core, core.runner, model_name

    # -- admission --------------------------------------------------------------------------------
    async def _prompt(self, request, tools: ValidTools = ValidTools()) -> list[int]:
        which = request.WhichOneof("input")
        if which is None:
            raise RequestError([("input", "one of `text`, `chat` or `token_ids` must be set")])
        if which == "token_ids":
            return validate_token_ids(request.token_ids.ids, self.core.limits.vocab_size)
        if which == "text":
            if not request.text:
                raise RequestError([("text", "`text` must not be empty")])
            self.core.check_size("text", len(request.text))
            return await self.core.encode(request.text)
        return await self.core.encode(self._render_chat(request.chat, tools))

    def _tools(self, chat) -> ValidTools:
        """The chat input's tools in OpenAI's shape, checked as the HTTP API checks them."""
        tools = []
        for i, t in enumerate(chat.tools):
            try:
                parameters = json.loads(t.parameters) if t.parameters else None
            except json.JSONDecodeError as e:
                raise RequestError([(f"chat.tools[{i}].parameters", f"`chat.tools[{i}].parameters` is not valid JSON: "
                                                                    f"{e}")]) from None
            function = {"name": t.name, "description": t.description} if t.description else {"name": t.name}
            tools.append({"type": "function", "function": function | ({"parameters": parameters}
                                                                      if parameters is not None else {})})
        which = chat.WhichOneof("tool_choice")
        choice = (None if which is None else chat.tool_choice_mode if which == "tool_choice_mode"
                  else {"type": "function", "function": {"name": chat.tool_choice_function}})
        return validate_tools(tools, choice, self.core.limits, {"tools": "chat.tools", "tool_choice": f"chat.{which}"},
                              parallel=not chat.HasField("parallel_tool_calls") or chat.parallel_tool_calls)

    def _render_chat(self, chat, tools: ValidTools | None = None) -> str:
        add = chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True
        messages = []
        for m in chat.messages:
            message = {"role": m.role, "content": m.content}
            if m.tool_call_id:
                message["tool_call_id"] = m.tool_call_id
            if m.tool_calls:
                message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.name, "arguments": _arguments(c.arguments)}} for c in m.tool_calls]
            messages.append(message)
        tools = tools or self._tools(chat)
        return self.core.render_chat(messages, add_generation_prompt=add, chat_field="chat",
                                     tools=tools.template_tools)

    async def _admit(self, request, context) -> tuple[Request, ValidTools]:
        tools = ValidTools()

        async def read() -> Admission:
            nonlocal tools
            if request.WhichOneof("input") == "chat":
                tools = self._tools(request.chat)
            prompt = await self._prompt(request, tools)
            given = {f.name: v for f, v in request.parameters.ListFields()}
            if "choice" in given:
                given["choice"] = list(given["choice"].choices)
            names = {}
            if tools.constraint is not None:
                given["tool_call"], names["tool_call"] = tools.constraint, "chat.tool_choice"
            return Admission(prompt, validate_parameters(given, len(prompt), self.core.defaults, self.core.limits,
                                                         names=names))

        try:
            return await self.core.admit(read), tools
        except (RequestError, QueueFullError, EngineUnavailable) as e:
            await _refuse(context, e)

    async def _events(self, request: Request, context):
        """The request's events. Callers iterate it under `aclosing`: a stream cancelled while its handler waits
        at a `yield` closes this generator, and so the core's, at once (which cancels the request and frees its
        blocks), rather than whenever the garbage collector reaches the abandoned generators."""
        def deadline_passed() -> bool:
            remaining = context.time_remaining()
            return remaining is not None and remaining <= 0

        async with aclosing(self.core.events(request, deadline_passed)) as events:
            async for event in events:
                if event.error is not None:
                    await _abort(context, grpc.StatusCode.UNAVAILABLE, str(event.error))
                yield event

    def _final(self, request: Request, event: Event, began: float, called: bool = False) -> pb.FinalInfo:
        seq = request.seq
        return pb.FinalInfo(
            finish_reason=pb.FINISH_REASON_TOOL_CALLS if called and event.finish_reason in ("stop", "eos")
            else FINISH[event.finish_reason],
            usage=pb.Usage(prompt_tokens=len(seq.prompt_token_ids), generated_tokens=len(seq.output_token_ids),
                           cached_tokens=seq.num_cached_tokens),
            timings=pb.Timings(queue_seconds=request.queue_seconds, time_to_first_token_seconds=request.ttft_seconds,
                               total_seconds=time.monotonic() - began),
            matched_stop=event.matched_stop or "",
            rope_variant="yarn" if seq.rope_variant == SCALED else "original",
        )

    @staticmethod
    def _logprobs(rows: list[dict | None]) -> list[pb.TokenLogprob]:
        """Rows as messages; a None row (the first prompt token's: no context) has none."""
        return [pb.TokenLogprob(token_id=r["token_id"], logprob=r["logprob"],
                                top=[pb.TopLogprob(token_id=t, logprob=lp) for t, lp in r["top"]])
                for r in rows if r is not None]

    # -- RPCs -------------------------------------------------------------------------------------
    @stream_errors
    async def GenerateStream(self, request, context):
        began = time.monotonic()
        admitted, tools = await self._admit(request, context)
        request_id = request.request_id or uuid.uuid4().hex
        parser = tool_calls.ToolCallStream(tools.names, tools.max_calls) if tools.parse else None
        async with aclosing(self._events(admitted, context)) as events:
            async for event in events:
                text, calls, deltas = event.text, [], []
                if parser is not None:  # tags never reach the text; a call as it is written, and once it is whole
                    complete = parser.complete
                    text, deltas = parser.feed(text)
                    text += parser.finish() if event.finish_reason is not None else ""
                    calls = parser.calls[complete:parser.complete]
                out = pb.GenerateStreamResponse(request_id=request_id, text=text, token_ids=event.token_ids,
                                                logprobs=self._logprobs(event.logprobs),
                                                prompt_logprobs=self._logprobs(event.prompt_logprobs or []),
                                                tool_calls=[_call(c) for c in calls],
                                                tool_call_deltas=[pb.ToolCallDelta(index=d.index, id=d.id,
                                                                                   name=d.name, arguments=d.arguments)
                                                                  for d in deltas])
                if event.finish_reason is not None:
                    out.final.CopyFrom(self._final(admitted, event, began, bool(parser and parser.calls)))
                yield out

    @unary_errors
    async def Generate(self, request, context):
        began = time.monotonic()
        admitted, tools = await self._admit(request, context)
        out = pb.GenerateResponse(request_id=request.request_id or uuid.uuid4().hex)
        text, last = [], None
        async with aclosing(self._events(admitted, context)) as events:
            async for last in events:
                text.append(last.text)
                out.token_ids.extend(last.token_ids)
                out.logprobs.extend(self._logprobs(last.logprobs))
                out.prompt_logprobs.extend(self._logprobs(last.prompt_logprobs or []))
        out.text, calls = (tool_calls.parse("".join(text), tools.names, tools.max_calls) if tools.parse
                           else ("".join(text), []))
        out.tool_calls.extend(_call(c) for c in calls)
        out.final.CopyFrom(self._final(admitted, last, began, bool(calls)))
        return out

    @unary_errors
    async def Tokenize(self, request, context):
        which = request.WhichOneof("input")
        try:
            if which == "text":
                self.core.check_size("text", len(request.text))
                rendered, ids = None, await self.core.encode(request.text)
            elif which == "chat":
                rendered = self._render_chat(request.chat)
                ids = await self.core.encode(rendered)
            else:
                raise RequestError([("input", "one of `text` or `chat` must be set")])
        except RequestError as e:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e), e.violations)
        return pb.TokenizeResponse(token_ids=ids, tokens=[self.core.tokenizer.id_to_token(i) or "" for i in ids],
                                   rendered=rendered or "")

    async def _pool(self, request, context, spec) -> list[tuple[list[int], Event]]:
        """Admit every input of a pooling request (all or none; `spec()` reads the task's options) and wait for
        their answers: (its prompt's ids, its last event) per input, in order."""

        async def read() -> list[Admission]:
            inputs = []
            for i, given in enumerate(request.inputs):
                which = given.WhichOneof("input")
                if which is None:
                    raise RequestError([(f"inputs[{i}]", f"one of `inputs[{i}].text` or `inputs[{i}].token_ids` "
                                                         f"must be set")])
                inputs.append((f"inputs[{i}].{which}" + (".ids" if which == "token_ids" else ""),
                               given.text if which == "text" else list(given.token_ids.ids)))
            return await self.core.pooling_admissions(inputs, spec(), "inputs")

        try:
            admitted = await self.core.admit_all(read, "grpc")
        except (RequestError, QueueFullError, EngineUnavailable) as e:
            await _refuse(context, e)
        out = []
        for admitted_request, event in await self.core.pooled(admitted):
            if event.error is not None:
                await _abort(context, grpc.StatusCode.UNAVAILABLE, str(event.error))
            out.append((admitted_request.seq.prompt_token_ids, event))
        return out

    def _classification(self, logits, prompt_tokens: int = 0) -> pb.Classification:
        probs = pooling.probabilities(logits)
        label = int(probs.argmax())
        return pb.Classification(label_id=label, label=self.runner.engine.model.labels[label], probs=probs.tolist(),
                                 logits=logits.tolist(), prompt_tokens=prompt_tokens)

    @unary_errors
    async def Embed(self, request, context):
        def spec():
            return validate_pooling(
                "embed", self.runner.engine.model.hidden_size, request.pooling or None,
                request.normalize if request.HasField("normalize") else None,
                request.dimensions if request.HasField("dimensions") else None)

        results = await self._pool(request, context, spec)
        return pb.EmbedResponse(
            request_id=request.request_id or uuid.uuid4().hex,
            embeddings=[pb.Embedding(values=e.pooled.tolist(), prompt_tokens=len(ids)) for ids, e in results],
            prompt_tokens=sum(len(ids) for ids, _ in results))

    @unary_errors
    async def Classify(self, request, context):
        results = await self._pool(request, context, lambda: validate_pooling("classify", 0))
        return pb.ClassifyResponse(
            request_id=request.request_id or uuid.uuid4().hex,
            results=[self._classification(e.pooled, len(ids)) for ids, e in results],
            labels=self.runner.engine.model.labels, prompt_tokens=sum(len(ids) for ids, _ in results))

    @unary_errors
    async def ClassifyTokens(self, request, context):
        results = await self._pool(request, context, lambda: validate_pooling("token_classify", 0))
        return pb.ClassifyTokensResponse(
            request_id=request.request_id or uuid.uuid4().hex,
            results=[pb.TokenClassification(token_ids=ids, tokens=[self._classification(row) for row in e.pooled])
                     for ids, e in results],
            labels=self.runner.engine.model.labels, prompt_tokens=sum(len(ids) for ids, _ in results))

    @unary_errors
    async def ExtractiveQA(self, request, context):
        max_tokens = request.max_answer_tokens if request.HasField("max_answer_tokens") else 30
        if max_tokens < 1:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "`max_answer_tokens` must be >= 1, got 0",
                         [("max_answer_tokens", "`max_answer_tokens` must be >= 1, got 0")])
        out = pb.QAResponse(request_id=request.request_id or uuid.uuid4().hex)
        for ids, e in await self._pool(request, context, lambda: validate_pooling("qa", 0)):
            start, end = e.pooled.unbind(-1)
            i, j, score = pooling.best_span(start, end, max_tokens)
            out.results.append(pb.QAResult(token_ids=ids, start_logits=start.tolist(), end_logits=end.tolist(),
                                           answer_start=i, answer_end=j, score=score,
                                           answer=self.core.tokenizer.decode(ids[i : j + 1])))
            out.prompt_tokens += len(ids)
        return out

    @unary_errors
    async def ModelInfo(self, request, context):
        engine = self.runner.engine
        c = engine.config
        return pb.ModelInfoResponse(
            model=self.model_name, max_model_len=self.core.limits.max_model_len, vocab_size=engine.vocab_size,
            eos_token_ids=engine.eos_token_ids, tensor_parallel_size=c.tensor_parallel_size,
            pipeline_parallel_size=c.pipeline_parallel_size, dtype=str(c.dtype or engine.model.dtype).replace("torch.", ""),
            device=c.device, max_new_tokens_limit=self.core.limits.max_new_tokens, num_kv_blocks=engine.num_kv_blocks,
            block_size=engine.block_size, version=_version(), quantization=engine.quantization,
            tasks=engine.model.tasks, architecture=engine.model.architecture,
            labels=engine.model.labels if set(engine.model.tasks) & {"classify", "token_classify"} else [],
        )


def _arguments(text: str) -> dict:
    """A history call's arguments as chat templates read them (an object)."""
    try:
        arguments = json.loads(text or "{}")
    except json.JSONDecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        raise RequestError([("chat.messages.tool_calls.arguments", f"a tool call's `arguments` must be a JSON object, "
                                                                   f"got {text[:100]!r}")])
    return arguments


def _call(call: tool_calls.ToolCall) -> pb.ToolCall:
    return pb.ToolCall(id=call.id, name=call.name, arguments=call.arguments)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qwen2-cluster")
    except PackageNotFoundError:
        return "unknown"


class Server:
    """gRPC server (+ the OpenAI HTTP API beside it) + engine: `start()` listens at once, serves when the engine
    is up; `stop()` drains both."""

    def __init__(self, core: ServingCore, config: ServerConfig, model_name: str):
        self.core, self.runner, self.config, self.model_name = core, core.runner, config, model_name
        options = [("grpc.max_send_message_length", config.max_message_bytes),
                   ("grpc.max_receive_message_length", config.max_message_bytes),
                   # The SDK pings every 30 s (keepalive). gRPC servers by default answer pings more often
                   # than every 5 min without data with GOAWAY "too_many_pings", which cut off a unary
                   # request waiting minutes for a long prefill.
                   ("grpc.http2.min_ping_interval_without_data_ms", 10_000)]
        interceptors = [BearerTokenAuth(config.auth_token)] if config.auth_token else []
        self.grpc = grpc.aio.server(options=options, maximum_concurrent_rpcs=config.max_concurrent_rpcs,
                                    interceptors=interceptors)
        add_generation_service(GenerationService(core, model_name), self.grpc)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection([SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], self.grpc)
        address = f"{config.host}:{config.port}"
        if config.tls_cert_file:
            credentials = grpc.ssl_server_credentials(
                [(_read(config.tls_key_file), _read(config.tls_cert_file))],
                root_certificates=_read(config.tls_client_ca_file),
                require_client_auth=config.tls_client_ca_file is not None,
            )
            self.port = self.grpc.add_secure_port(address, credentials)
        else:
            self.port = self.grpc.add_insecure_port(address)
        self.http = None if config.http_port is None else HttpServer(
            core, model_name, _version(), config.host, config.http_port, auth_token=config.auth_token,
            max_body_bytes=config.max_message_bytes, tls_cert_file=config.tls_cert_file,
            tls_key_file=config.tls_key_file, tls_client_ca_file=config.tls_client_ca_file)
        self._watch: asyncio.Task | None = None

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE):
            await self.health.set(name, status)

    async def start(self) -> None:
        metrics, engine = self.runner.metrics, self.runner.engine
        await self._set_health(False)
        if self.config.metrics_port is not None:
            metrics.serve(self.config.host, self.config.metrics_port)
        c = engine.config
        metrics.set_model(self.model_name, c.tensor_parallel_size, c.pipeline_parallel_size,
                          str(c.dtype or engine.model.dtype).replace("torch.", ""), c.device, _version(),
                          engine.quantization)
        await self.grpc.start()
        log.info("gRPC listening on %s:%d (NOT_SERVING until the engine is up)", self.config.host, self.port)
        if self.http is not None:
            await self.http.start()
            log.info("OpenAI-compatible HTTP API on %s:%d (/health 503 until the engine is up)", self.config.host,
                     self.http.port)
        await self.runner.start()
        await self._set_health(True)
        self._watch = asyncio.create_task(self._watch_engine())

    async def _watch_engine(self) -> None:
        """Health follows the runner: NOT_SERVING while the engine is rebuilt or after it failed for good."""
        serving = True
        while True:
            await asyncio.sleep(0.1)
            if self.runner.serving != serving:
                serving = self.runner.serving
                await self._set_health(serving)

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Stop admitting (NOT_SERVING), let admitted requests finish within the timeout, then stop."""
        await self._set_health(False)
        self.runner.ready = False
        deadline = time.monotonic() + drain_timeout_s
        while not self.runner.idle and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._watch:
            self._watch.cancel()
        await self.runner.shutdown()  # ends what the drain left: those streams end UNAVAILABLE / 503
        if self.http is not None:
            await self.http.stop()
        await self.grpc.stop(grace=1.0)
