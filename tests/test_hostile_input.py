"""Hostile input over the gRPC API: every call gets OK or INVALID_ARGUMENT, the server keeps serving. (A pooling
RPC whose task the served causal LM lacks may also get FAILED_PRECONDITION, once its input is valid.)

Requests are built from the proto descriptors, so a field added to the API is fuzzed without touching
this file. They are sent as raw bytes through a generic channel: string fields are declared `bytes` in a
shadow copy of the proto (same field numbers, same wire format), so they can carry invalid UTF-8, which
the real message classes refuse to serialize.

The one other status allowed is RESOURCE_EXHAUSTED for a message above --max-message-bytes: gRPC itself
refuses it before any handler runs, with the status its spec gives for a message over the limit.
"""

import collections

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import FieldDescriptor as F
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen2_client.proto import serving_pb2 as pb
from shards.checkpoint import preset_config, write_random_checkpoint
from tests.server_process import InProcessServer

SERVICE = pb.DESCRIPTOR.services_by_name["Generation"]
VOCAB = preset_config("tiny")["vocab_size"]
MAX_MESSAGE_BYTES, MAX_INPUT_CHARS, MAX_NEW_TOKENS = 2**20, 20_000, 16
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
UNSERVED = {"Classify", "ClassifyTokens", "ExtractiveQA"}  # the causal LM's tasks are generate and embed


def fuzz(examples: int) -> settings:
    """Reproducible in CI (derandomized, no example database) and bounded in time."""
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


GREEDY = pb.GenerateRequest(text="Hello world", parameters=pb.GenerationParameters(
    max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, ignore_eos=True))


def _shadow_pool() -> descriptor_pool.DescriptorPool:
    """serving.proto with every string field turned into bytes, under another package name."""
    proto = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(proto)
    real, shadow = proto.package, "shadow." + proto.package
    proto.name, proto.package = "shadow/" + proto.name, shadow
    proto.ClearField("service")
    for message in proto.message_type:
        for field in message.field:
            if field.type == F.TYPE_STRING:
                field.type = F.TYPE_BYTES
            if field.type_name:
                field.type_name = field.type_name.replace(f".{real}.", f".{shadow}.")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return pool


SHADOW = _shadow_pool()


def shadow_of(descriptor):
    return SHADOW.FindMessageTypeByName("shadow." + descriptor.full_name)


_UINT32 = st.one_of(st.integers(0, 40), st.sampled_from([VOCAB - 1, VOCAB, 2**31 - 1, 2**31, 2**32 - 1]),
                    st.integers(0, 2**32 - 1))
_TEXT = st.one_of(st.text(max_size=40).map(str.encode), st.binary(max_size=40),  # mostly invalid UTF-8
                  st.sampled_from(["<|im_start|>", "<|im_end|>", "<|endoftext|>", "{{ 7 * 7 }}", "\x00",
                                   "\ud7ff\ue000\U0010ffff"]).map(str.encode))
SCALARS = {
    F.TYPE_UINT32: _UINT32,
    F.TYPE_UINT64: st.one_of(_UINT32, st.integers(0, 2**64 - 1)),
    F.TYPE_FLOAT: st.one_of(st.floats(0, 2, width=32), st.floats(width=32),  # plausible, then anything
                            st.sampled_from([0.0, -0.0, 1.0, 2.0**-149, 3.4e38])),
    F.TYPE_DOUBLE: st.floats(),
    F.TYPE_BOOL: st.booleans(),
    F.TYPE_BYTES: _TEXT,
}


@st.composite
def messages(draw, descriptor, depth: int = 0):
    """A message with a random subset of its fields set to random and extreme values, nested ones too."""
    message = message_factory.GetMessageClass(descriptor)()
    for field in descriptor.fields:
        nested = field.type == F.TYPE_MESSAGE
        if not draw(st.booleans()) or (nested and depth > 3):
            continue
        if nested and field.message_type.GetOptions().map_entry:  # map<K, V>: random keys to random values
            key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            container = getattr(message, field.name)
            if value.type == F.TYPE_MESSAGE:
                for k, v in draw(st.dictionaries(SCALARS[key.type], messages(value.message_type, depth + 1),
                                                 max_size=4)).items():
                    container[k].CopyFrom(v)
            else:
                container.update(draw(st.dictionaries(SCALARS[key.type], SCALARS[value.type], max_size=20)))
            continue
        values = messages(field.message_type, depth + 1) if nested else SCALARS[field.type]
        if field.is_repeated:
            container = getattr(message, field.name)
            for item in draw(st.lists(values, max_size=4 if depth else 20)):
                if nested:
                    container.add().CopyFrom(item)
                else:
                    container.append(item)
        elif nested:
            getattr(message, field.name).CopyFrom(draw(values))
        else:
            setattr(message, field.name, draw(values))
    return message


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = write_random_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny", preset_config("tiny"), seed=5)
    s = InProcessServer(model_dir, tp=1, server_options={"max_message_bytes": MAX_MESSAGE_BYTES},
                        limits_options={"max_input_chars": MAX_INPUT_CHARS, "max_new_tokens": MAX_NEW_TOKENS},
                        max_num_seqs=8, max_num_batched_tokens=512, max_waiting=64)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target) as channel:
        yield channel


@pytest.fixture(scope="module")
def greedy_before(channel):
    """The greedy tokens before any hostile input, to compare with after it."""
    return greedy_tokens(channel)


def call(channel, method: str, data: bytes) -> tuple[grpc.StatusCode, bytes | None, str]:
    """Send raw bytes as `method`'s request; (status, the response bytes or None, details)."""
    streaming = SERVICE.methods_by_name[method].server_streaming
    path = f"/{SERVICE.full_name}/{method}"
    try:
        if streaming:
            out = b"".join(channel.unary_stream(path)(data, timeout=60))
        else:
            out = channel.unary_unary(path)(data, timeout=60)
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        code, out, details = e.code(), None, e.details()
    return code, out, details


def greedy_tokens(channel) -> list[int]:
    code, out, details = call(channel, "Generate", GREEDY.SerializeToString())
    assert code == grpc.StatusCode.OK, details
    return list(pb.GenerateResponse.FromString(out).token_ids)


def check(code: grpc.StatusCode, details: str, method: str = "Generate") -> None:
    allowed = ALLOWED | ({grpc.StatusCode.FAILED_PRECONDITION} if method in UNSERVED else set())
    assert code in allowed, (code, details)
    assert code == grpc.StatusCode.OK or details  # a refusal says why


@pytest.mark.parametrize("method,examples", [("Generate", 200), ("GenerateStream", 150), ("Tokenize", 300),
                                             ("ModelInfo", 10), ("Embed", 100)])
def test_random_field_values(channel, greedy_before, method, examples):
    descriptor = shadow_of(SERVICE.methods_by_name[method].input_type)
    tried = collections.Counter()

    @fuzz(examples)
    @given(messages(descriptor))
    def send(message):
        code, _, details = call(channel, method, message.SerializeToString())
        check(code, details)
        tried[code.name] += 1

    send()
    print(f"\n{method}: {dict(tried)}")
    # The fuzz reaches past validation (the model ran), and requests with fields to get wrong get some wrong.
    assert tried["OK"] and (tried["INVALID_ARGUMENT"] or not descriptor.fields), tried


TINY = 2.0**-149  # the smallest positive float32 (a subnormal)


def _edges(low, high):
    return st.one_of(st.sampled_from([low, high]), st.floats(low, high, width=32))


# Every value within its documented bound, edges included: these must be served, not refused or crashed on.
VALID_PARAMETERS = st.builds(
    pb.GenerationParameters,
    max_new_tokens=st.integers(1, 4), temperature=_edges(0.0, 100.0) | st.just(TINY),
    top_k=st.sampled_from([0, 1, VOCAB]) | st.integers(0, VOCAB), top_p=_edges(TINY, 1.0),
    min_p=_edges(0.0, 1.0), repetition_penalty=_edges(TINY, 10.0), presence_penalty=_edges(-2.0, 2.0),
    frequency_penalty=_edges(-2.0, 2.0), seed=st.integers(0, 2**64 - 1), ignore_eos=st.booleans(),
    stop=st.lists(st.text(min_size=1, max_size=8), max_size=16), logprobs=st.integers(0, 20),
    stop_token_ids=st.lists(st.integers(0, VOCAB - 1), max_size=16))
VALID_INPUTS = st.one_of(
    st.builds(pb.GenerateRequest, text=st.text(min_size=1, max_size=200)),
    # Ids past the tokenizer's last one (151,646) are the checkpoint's padding rows: valid, and have no text.
    st.builds(pb.GenerateRequest, token_ids=st.builds(pb.TokenIds, ids=st.lists(
        st.sampled_from([0, 151_645, 151_646, VOCAB - 1]) | st.integers(0, VOCAB - 1), min_size=1, max_size=64))),
    st.builds(pb.GenerateRequest, chat=st.builds(pb.ChatInput, messages=st.lists(st.builds(
        pb.ChatMessage, role=st.sampled_from(["system", "user", "assistant"]) | st.text(min_size=1, max_size=8),
        content=st.text(max_size=64)), min_size=1, max_size=4))),
)


def test_extreme_valid_values_are_served(channel, greedy_before):
    """Padding-row ids, a subnormal temperature, top_p at its floor, a 2**64 - 1 seed: OK, within the asked length."""

    @fuzz(100)
    @given(VALID_INPUTS, VALID_PARAMETERS, st.sampled_from(["Generate", "GenerateStream"]))
    def send(request, parameters, method):
        request.parameters.CopyFrom(parameters)
        code, out, details = call(channel, method, request.SerializeToString())
        assert code == grpc.StatusCode.OK, (details, request)
        if method == "Generate":
            response = pb.GenerateResponse.FromString(out)
            assert 1 <= len(response.token_ids) == response.final.usage.generated_tokens <= parameters.max_new_tokens

    send()


@pytest.mark.parametrize("method", SERVICE.methods_by_name)
def test_random_bytes_as_the_request(channel, greedy_before, method):
    @fuzz(300)
    @given(st.binary(max_size=300))
    def send(data):
        code, _, details = call(channel, method, data)
        check(code, details, method)

    send()


@pytest.mark.parametrize("method", SERVICE.methods_by_name)
def test_empty_and_oversized_messages(channel, greedy_before, method):
    code, _, details = call(channel, method, b"")
    check(code, details, method)
    assert (code == grpc.StatusCode.OK) == (method == "ModelInfo"), details  # only ModelInfo needs no field
    # Field 1 of every request as a string or message over the limit (ModelInfoRequest: an unknown field).
    size = MAX_MESSAGE_BYTES + 1
    data = bytes([0x0A]) + _varint(size) + b"a" * size
    code, _, details = call(channel, method, data)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details, (code, details)


def _varint(n: int) -> bytes:
    """Protobuf's base-128 length prefix."""
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


TOO_LONG = f"must be at most {MAX_INPUT_CHARS} characters"
MANY_MESSAGES = pb.ChatInput(messages=[pb.ChatMessage(role="x")] * MAX_INPUT_CHARS)  # Qwen2's renders them as ""


@pytest.mark.parametrize("request_,says", [
    (pb.GenerateRequest(text="a" * (MAX_INPUT_CHARS + 1)), f"`text` {TOO_LONG}"),
    (pb.GenerateRequest(text="the " * (MAX_INPUT_CHARS // 4)), "maximum model length"),  # ~5,000 tokens
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * 5000)), "maximum model length"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[VOCAB, 2**32 - 1])), "`token_ids.ids[1]` must be >= 0 and < the vocab"),
    (pb.GenerateRequest(chat=MANY_MESSAGES), f"`chat` {TOO_LONG}"),
    (pb.TokenizeRequest(text="a" * (MAX_INPUT_CHARS + 1)), f"`text` {TOO_LONG}"),
    (pb.TokenizeRequest(chat=pb.ChatInput(messages=[pb.ChatMessage(role="user", content="a" * MAX_INPUT_CHARS)])),
     f"`chat` {TOO_LONG}"),
    (pb.TokenizeRequest(chat=MANY_MESSAGES), f"`chat` {TOO_LONG}"),
])
def test_huge_inputs_are_refused_before_the_work(channel, greedy_before, request_, says):
    """Within the message size limit, beyond the input limits: refused with the bound, before tokenizing."""
    method = "Tokenize" if isinstance(request_, pb.TokenizeRequest) else "Generate"
    code, _, details = call(channel, method, request_.SerializeToString())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and says in details, (code, details)


def test_server_still_serves_after_hostile_input(server, channel, greedy_before):
    """After hostile generations of its own (and whatever else this module sent): healthy, the same greedy
    tokens as before, no request left and every KV block free."""

    def with_parameters(request, parameters):
        request.parameters.CopyFrom(parameters)
        return request.SerializeToString()

    @fuzz(40)
    @given(st.sampled_from(["Generate", "GenerateStream"]), st.one_of(
        st.builds(with_parameters, VALID_INPUTS, VALID_PARAMETERS),
        messages(shadow_of(pb.GenerateRequest.DESCRIPTOR)).map(lambda m: m.SerializeToString()),
        st.binary(max_size=300)))
    def send(method, data):
        code, _, details = call(channel, method, data)
        check(code, details)
        tried[code.name] += 1

    tried = collections.Counter()
    send()
    assert tried["OK"] and tried["INVALID_ARGUMENT"], tried  # some ran on the model, some were refused
    with grpc.insecure_channel(server.target) as fresh:
        status = health_pb2_grpc.HealthStub(fresh).Check(health_pb2.HealthCheckRequest()).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert greedy_tokens(channel) == greedy_before and len(greedy_before) == MAX_NEW_TOKENS
    scheduler = server.runner.scheduler
    assert not server.runner.requests and scheduler.blocks.num_free == scheduler.blocks.num_total


def test_a_chat_that_renders_to_nothing_is_invalid_not_internal(channel):
    """Qwen2's template renders an unknown role as nothing: without a generation prompt, no token is left."""
    request = pb.GenerateRequest(chat=pb.ChatInput(messages=[pb.ChatMessage(role="narrator", content="x")],
                                                   add_generation_prompt=False))
    code, _, details = call(channel, "Generate", request.SerializeToString())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "prompt is empty" in details, (code, details)
