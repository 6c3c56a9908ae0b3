"""The asyncio client (grpc.aio)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from typing_extensions import Unpack

from ._common import (DEFAULT_TARGET, Deadline, PemSource, call_metadata, channel_credentials,
                      channel_options)
from .build import (GenerationParams, Message, PoolingInputs, Prompt, ToolChoice, ToolSpec, build_embed_request,
                    build_generate_request, build_qa_request, build_tokenize_request, pooling_inputs)
from .errors import DeadlineError, UnavailableError, error_from_rpc
from .proto import serving_pb2 as pb
from .proto import serving_pb2_grpc as pb_grpc
from .retry import NO_RETRY, RetryPolicy
from .types import (Classification, Delta, Embedding, ModelInfo, QAResult, Result, TokenClassification,
                    TokenizeResult)


class AsyncClient:
    """The asyncio twin of `Client` (same arguments, same results and errors); create it inside a loop.

        async with AsyncClient("localhost:50051") as c:
            r = await c.generate("Hello", max_new_tokens=16)
            async for d in c.generate_stream("Hello"):
                print(d.text, end="", flush=True)
    """

    def __init__(self, target: str = DEFAULT_TARGET, *, tls: bool = False, root_certificates: PemSource = None,
                 private_key: PemSource = None, certificate_chain: PemSource = None,
                 server_name: str | None = None, token: str | None = None,
                 metadata: Sequence[tuple[str, str]] | None = None, timeout: float | None = None,
                 retry: RetryPolicy | None = None, options: Sequence[tuple[str, Any]] | None = None,
                 channel: grpc.aio.Channel | None = None):
        self.target = target
        if channel is None:
            creds = channel_credentials(tls, root_certificates, private_key, certificate_chain)
            opts = channel_options(options, server_name)
            channel = (grpc.aio.secure_channel(target, creds, opts) if creds is not None
                       else grpc.aio.insecure_channel(target, opts))
        self._channel = channel
        self._stub = pb_grpc.GenerationStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)
        self._metadata = call_metadata(token, metadata)
        self._timeout = timeout
        self.retry = retry if retry is not None else RetryPolicy()

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def generate(self, prompt: Prompt | None = None, *, text: str | None = None,
                       messages: Sequence[Message] | None = None, token_ids: Sequence[int] | None = None,
                       add_generation_prompt: bool | None = None, request_id: str | None = None,
                       tools: Sequence[ToolSpec] | None = None, tool_choice: ToolChoice | None = None,
                       parallel_tool_calls: bool | None = None,
                       timeout: float | None = None, **params: Unpack[GenerationParams]) -> Result:
        req = build_generate_request(prompt, text=text, messages=messages, token_ids=token_ids,
                                     add_generation_prompt=add_generation_prompt, request_id=request_id, tools=tools,
                                     tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls, **params)
        return Result.from_pb(await self._unary(self._stub.Generate, req, timeout))

    def generate_stream(self, prompt: Prompt | None = None, *, text: str | None = None,
                        messages: Sequence[Message] | None = None, token_ids: Sequence[int] | None = None,
                        add_generation_prompt: bool | None = None, request_id: str | None = None,
                        tools: Sequence[ToolSpec] | None = None, tool_choice: ToolChoice | None = None,
                        parallel_tool_calls: bool | None = None,
                        timeout: float | None = None, **params: Unpack[GenerationParams]) -> "AsyncDeltaStream":
        """An async iterator of Deltas (use `async for`; not awaited itself). Leaving early cancels."""
        req = build_generate_request(prompt, text=text, messages=messages, token_ids=token_ids,
                                     add_generation_prompt=add_generation_prompt, request_id=request_id, tools=tools,
                                     tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls, **params)
        deadline = Deadline(self._timeout if timeout is None else timeout)
        start = lambda: self._stub.GenerateStream(req, timeout=deadline.remaining(), metadata=self._metadata)  # noqa: E731
        return AsyncDeltaStream(start, self.retry, deadline)

    async def chat(self, messages: Sequence[Message], add_generation_prompt: bool = True, *,
                   request_id: str | None = None, timeout: float | None = None,
                   tools: Sequence[ToolSpec] | None = None, tool_choice: ToolChoice | None = None,
                   parallel_tool_calls: bool | None = None,
                   **params: Unpack[GenerationParams]) -> Result:
        return await self.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                   request_id=request_id, timeout=timeout, tools=tools, tool_choice=tool_choice,
                                   parallel_tool_calls=parallel_tool_calls, **params)

    async def tokenize(self, prompt: str | Sequence[Message] | None = None, *, text: str | None = None,
                       messages: Sequence[Message] | None = None, add_generation_prompt: bool | None = None,
                       timeout: float | None = None) -> TokenizeResult:
        req = build_tokenize_request(prompt, text=text, messages=messages,
                                     add_generation_prompt=add_generation_prompt)
        return TokenizeResult.from_pb(await self._unary(self._stub.Tokenize, req, timeout))

    # -- pooling: one result per input (a text or a list of token ids), in order ------------------------
    async def embed(self, inputs: PoolingInputs, *, pooling: str | None = None, normalize: bool | None = None,
                    dimensions: int | None = None, request_id: str | None = None,
                    timeout: float | None = None) -> list[Embedding]:
        """Embeddings: the last token's final hidden state (`pooling` "last", the default) or their "mean", the
        first `dimensions` values, L2-normalised unless `normalize` is False."""
        req = build_embed_request(inputs, pooling=pooling, normalize=normalize, dimensions=dimensions,
                                  request_id=request_id)
        return [Embedding.from_pb(e) for e in (await self._unary(self._stub.Embed, req, timeout)).embeddings]

    async def classify(self, inputs: PoolingInputs, *, request_id: str | None = None,
                       timeout: float | None = None) -> list[Classification]:
        """Sequence classification (a Qwen2ForSequenceClassification checkpoint, e.g. a reward model)."""
        req = pb.PoolingRequest(inputs=pooling_inputs(inputs), request_id=request_id or "")
        return [Classification.from_pb(c) for c in (await self._unary(self._stub.Classify, req, timeout)).results]

    async def classify_tokens(self, inputs: PoolingInputs, *, request_id: str | None = None,
                              timeout: float | None = None) -> list[TokenClassification]:
        """Token classification (a Qwen2ForTokenClassification checkpoint): a label per token."""
        req = pb.PoolingRequest(inputs=pooling_inputs(inputs), request_id=request_id or "")
        resp = await self._unary(self._stub.ClassifyTokens, req, timeout)
        return [TokenClassification.from_pb(t) for t in resp.results]

    async def extractive_qa(self, inputs: PoolingInputs, *, max_answer_tokens: int | None = None,
                            request_id: str | None = None, timeout: float | None = None) -> list[QAResult]:
        """Extractive QA (a Qwen2ForQuestionAnswering checkpoint): each input holds the question and the context."""
        req = build_qa_request(inputs, max_answer_tokens=max_answer_tokens, request_id=request_id)
        return [QAResult.from_pb(r) for r in (await self._unary(self._stub.ExtractiveQA, req, timeout)).results]

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        return ModelInfo.from_pb(await self._unary(self._stub.ModelInfo, pb.ModelInfoRequest(), timeout))

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        resp = await self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service),
                                 5.0 if timeout is None and self._timeout is None else timeout, retry=NO_RETRY)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    async def is_serving(self, service: str = "", *, timeout: float | None = None) -> bool:
        try:
            return await self.health(service, timeout=timeout) == "SERVING"
        except (UnavailableError, DeadlineError):
            return False

    async def wait_until_serving(self, timeout: float = 60.0, interval: float = 0.2) -> None:
        deadline = Deadline(timeout)
        while True:
            if await self.is_serving(timeout=max(min(deadline.remaining(), 5.0), 0.01)):
                return
            if deadline.remaining() <= interval:
                raise DeadlineError(f"DEADLINE_EXCEEDED: {self.target} not SERVING after {timeout:g} s",
                                    code=grpc.StatusCode.DEADLINE_EXCEEDED)
            await asyncio.sleep(interval)

    async def _unary(self, rpc: Callable, request, timeout: float | None, retry: RetryPolicy | None = None):
        policy = retry or self.retry
        deadline = Deadline(self._timeout if timeout is None else timeout)
        attempt = 0
        while True:
            attempt += 1
            try:
                return await rpc(request, timeout=deadline.remaining(), metadata=self._metadata)
            except grpc.RpcError as e:
                err = error_from_rpc(e)
                delay = policy.delay_after(attempt, err, deadline.remaining())
                if delay is None:
                    raise err from e
            await asyncio.sleep(delay)


class AsyncDeltaStream(AsyncIterator[Delta]):
    """The Deltas of one GenerateStream call (async); retried only until the first message arrived."""

    def __init__(self, start: Callable[[], Any], retry: RetryPolicy, deadline: Deadline):
        self._start, self._retry, self._deadline = start, retry, deadline
        self._call = None
        self._received = False
        self._attempt = 0
        self._done = False

    def __aiter__(self) -> "AsyncDeltaStream":
        return self

    async def __anext__(self) -> Delta:
        while True:
            if self._done:
                raise StopAsyncIteration
            if self._call is None:
                self._attempt += 1
                self._call = self._start()
            try:
                msg = await self._call.read()
            except grpc.RpcError as e:
                self._call = None
                err = error_from_rpc(e)
                delay = None if self._received else self._retry.delay_after(
                    self._attempt, err, self._deadline.remaining())
                if delay is None:
                    self._done = True
                    raise err from e
                await asyncio.sleep(delay)
                continue
            except asyncio.CancelledError:
                self.cancel()
                raise
            if msg is grpc.aio.EOF:
                self._done = True
                self._call = None
                raise StopAsyncIteration
            self._received = True
            return Delta.from_pb(msg)

    def cancel(self) -> None:
        self._done = True
        if self._call is not None:
            self._call.cancel()
            self._call = None

    async def aclose(self) -> None:
        self.cancel()

    async def collect(self) -> Result:
        return Result.from_deltas([d async for d in self])

    async def __aenter__(self) -> "AsyncDeltaStream":
        return self

    async def __aexit__(self, *exc) -> None:
        self.cancel()

    def __del__(self):
        try:
            self.cancel()
        except Exception:  # noqa: BLE001
            pass
