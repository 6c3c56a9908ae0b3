"""The gRPC server end to end: real server, real Ray engine at TP=2, real Qwen tokenizer, raw stubs."""

import concurrent.futures
import time

import grpc
import pytest
import torch
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from google.rpc import error_details_pb2
from transformers import AutoTokenizer, Qwen2ForCausalLM

from qwen2_client.proto import serving_pb2 as pb
from qwen2_client.proto import serving_pb2_grpc as pb_grpc
from shards.checkpoint import preset_config, write_random_checkpoint
from tests.server_process import InProcessServer

MULTIBYTE_PROMPTS = ["Hello world", "你好，世界！今天天气怎么样？", "emoji 🙂🚀👍🏽 and ü", "def f(x):\n    return x * 2"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny", preset_config("tiny"), seed=11)


@pytest.fixture(scope="module")
def server(model_dir):
    s = InProcessServer(model_dir, tp=2, max_num_seqs=16, max_num_batched_tokens=256, max_waiting=64)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.GenerationStub(channel)


def params(**kw) -> pb.GenerationParameters:
    return pb.GenerationParameters(**kw)


def violations(error: grpc.RpcError) -> list[tuple[str, str]]:
    status = rpc_status.from_call(error)
    out = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            out += [(v.field, v.description) for v in bad.field_violations]
    return out


def stream_text(stub, request) -> tuple[str, list[int], pb.FinalInfo]:
    text, ids, final = "", [], None
    for msg in stub.GenerateStream(request):
        text += msg.text
        ids += msg.token_ids
        if msg.HasField("final"):
            final = msg.final
    return text, ids, final


def test_greedy_tokens_equal_transformers(stub, model_dir):
    model = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for prompt in MULTIBYTE_PROMPTS[:2]:
        ids = tokenizer(prompt)["input_ids"]
        expected = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, len(ids):].tolist()
        by_text = stub.Generate(pb.GenerateRequest(text=prompt, parameters=params(max_new_tokens=16,
                                                                                  temperature=0, ignore_eos=True)))
        by_ids = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids),
                                                  parameters=params(max_new_tokens=16, temperature=0, ignore_eos=True)))
        assert list(by_text.token_ids) == expected == list(by_ids.token_ids)
        assert by_text.final.finish_reason == pb.FINISH_REASON_LENGTH
        assert by_text.final.usage.prompt_tokens == len(ids) and by_text.final.usage.generated_tokens == 16


@pytest.mark.parametrize("prompt", MULTIBYTE_PROMPTS)
def test_stream_deltas_concatenate_to_the_unary_text(stub, model_dir, prompt):
    request = pb.GenerateRequest(text=prompt, parameters=params(max_new_tokens=40, temperature=0, ignore_eos=True))
    unary = stub.Generate(request)
    text, ids, final = stream_text(stub, request)
    assert ids == list(unary.token_ids) and text == unary.text
    assert text == AutoTokenizer.from_pretrained(model_dir).decode(ids, skip_special_tokens=True)


def test_concurrent_streams_and_seeded_reproducibility(stub):
    def run(i, seed):
        request = pb.GenerateRequest(text=f"story {i}", parameters=params(
            max_new_tokens=12, temperature=0.5 + (i % 4) * 0.3, top_p=0.9, top_k=50 * (i % 3),
            seed=seed, ignore_eos=True))
        return stream_text(stub, request)[1]

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        first = list(pool.map(run, range(32), range(100, 132)))
        # The same requests again, alongside different neighbours (shifted seeds for the others).
        second = list(pool.map(run, range(32), [100 + i if i % 2 else 999 + i for i in range(32)]))
    assert all(len(tokens) == 12 for tokens in first + second)
    for i in range(1, 32, 2):
        assert first[i] == second[i]
    assert len({tuple(t) for t in first}) > 16  # seeds and temperatures differ, so do the samples


def test_stop_strings_stop_ids_and_limits(stub, model_dir):
    base = stub.Generate(pb.GenerateRequest(text="Hello world", parameters=params(
        max_new_tokens=30, temperature=0, ignore_eos=True)))
    assert len(base.token_ids) == 30
    # A stop string taken from the middle of the greedy output cuts the text right before it.
    assert len(base.text) >= 6, base.text  # 30 tokens of the real vocabulary: there is a middle to take
    stop = base.text[len(base.text) // 2 : len(base.text) // 2 + 3]
    cut = stub.Generate(pb.GenerateRequest(text="Hello world", parameters=params(
        max_new_tokens=30, temperature=0, ignore_eos=True, stop=[stop])))
    assert cut.final.finish_reason == pb.FINISH_REASON_STOP and cut.final.matched_stop == stop
    assert cut.text == base.text[: base.text.index(stop)] and len(cut.token_ids) < len(base.token_ids)
    # A stop token id ends the generation at its first occurrence.
    stop_id = base.token_ids[5]
    by_id = stub.Generate(pb.GenerateRequest(text="Hello world", parameters=params(
        max_new_tokens=30, temperature=0, ignore_eos=True, stop_token_ids=[stop_id])))
    assert list(by_id.token_ids) == list(base.token_ids[: list(base.token_ids).index(stop_id) + 1])
    assert by_id.final.finish_reason == pb.FINISH_REASON_STOP


def test_chat_template_matches_transformers(stub, model_dir):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi 你好"}]
    expected = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(messages, tokenize=False,
                                                                            add_generation_prompt=True)
    chat = pb.ChatInput(messages=[pb.ChatMessage(**m) for m in messages])
    response = stub.Tokenize(pb.TokenizeRequest(chat=chat))
    assert response.rendered == expected
    assert list(response.token_ids) == AutoTokenizer.from_pretrained(model_dir)(expected)["input_ids"]
    out = stub.Generate(pb.GenerateRequest(chat=chat, parameters=params(max_new_tokens=4, ignore_eos=True)))
    assert out.final.usage.prompt_tokens == len(response.token_ids)


def test_cancelled_stream_frees_every_block(stub, server):
    blocks = server.runner.scheduler.blocks
    stream = stub.GenerateStream(pb.GenerateRequest(text="a long one", parameters=params(
        max_new_tokens=400, ignore_eos=True)))
    next(stream)
    assert blocks.num_free < blocks.num_total
    stream.cancel()
    deadline = time.monotonic() + 10
    while blocks.num_free != blocks.num_total and time.monotonic() < deadline:
        time.sleep(0.05)
    assert blocks.num_free == blocks.num_total
    assert not server.runner.requests


def test_streams_go_on_while_a_long_text_is_tokenized(stub):
    """Tokenizing a long text takes seconds; it runs off the event loop, so other streams keep going."""
    stream = stub.GenerateStream(pb.GenerateRequest(text="go", parameters=params(max_new_tokens=512, ignore_eos=True)))
    next(stream)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        tokenized = pool.submit(stub.Tokenize, pb.TokenizeRequest(text="hello world, this is a test. " * 60_000))
        during = 0
        for _ in stream:
            during += 1
            if tokenized.done():
                break
        else:
            pytest.fail("the stream ended before the text was tokenized: make the stream longer")
        stream.cancel()
        assert len(tokenized.result().token_ids) > 60_000
    assert during >= 5, f"only {during} tokens streamed while 1.7M characters were tokenized"


@pytest.mark.parametrize("request_kw,field", [
    (dict(text="hi", parameters=params(top_p=1.5)), "parameters.top_p"),
    (dict(text="hi", parameters=params(temperature=-1)), "parameters.temperature"),
    (dict(text="hi", parameters=params(max_new_tokens=0)), "parameters.max_new_tokens"),
    (dict(text="hi", parameters=params(max_new_tokens=100_000)), "parameters.max_new_tokens"),
    (dict(text="hi", parameters=params(top_k=10**7)), "parameters.top_k"),
    (dict(text="hi", parameters=params(logprobs=1000)), "parameters.logprobs"),
    (dict(text="hi", parameters=params(stop=[""])), "parameters.stop[0]"),
    (dict(text="hi", parameters=params(stop_token_ids=[10**7])), "parameters.stop_token_ids[0]"),
    (dict(text=""), "text"),
    (dict(), "input"),
    (dict(token_ids=pb.TokenIds(ids=[])), "token_ids.ids"),
    (dict(token_ids=pb.TokenIds(ids=[1, 10**7])), "token_ids.ids[1]"),
    (dict(chat=pb.ChatInput()), "chat.messages"),
])
def test_invalid_fields_are_named(stub, request_kw, field):
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(pb.GenerateRequest(**request_kw))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in [f for f, _ in violations(e.value)], (e.value.details(), violations(e.value))
    assert stub.Generate(pb.GenerateRequest(text="still serving", parameters=params(max_new_tokens=2))).token_ids


def test_model_info_and_reflection(stub, server):
    info = stub.ModelInfo(pb.ModelInfoRequest())
    assert info.tensor_parallel_size == 2 and info.vocab_size == 151936 and info.max_model_len == 4096
    assert info.num_kv_blocks == server.runner.scheduler.blocks.num_total
    with grpc.insecure_channel(server.target) as channel:
        responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = [s.name for s in next(responses).list_services_response.service]
    assert "qwen2.serving.v1.Generation" in names and "grpc.health.v1.Health" in names


def test_full_queue_is_refused_at_once(model_dir):
    server = InProcessServer(model_dir, tp=1, max_num_seqs=1, max_num_batched_tokens=64, max_waiting=1)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GenerationStub(channel)
            request = pb.GenerateRequest(text="hold", parameters=params(max_new_tokens=512, ignore_eos=True))
            grpc.channel_ready_future(channel).result(timeout=30)
            # The first must be running before the second arrives: sent together, both can sit in the waiting
            # queue at once and the second is refused.
            held = [stub.GenerateStream(request, wait_for_ready=True)]
            next(held[0])
            held.append(stub.GenerateStream(request, wait_for_ready=True))  # waits behind the running one
            deadline = time.monotonic() + 30
            while len(server.runner.requests) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert len(server.runner.requests) == 2, [h.done() and (h.code(), h.details()) for h in held]
            codes = []
            for _ in range(3):
                try:
                    stub.Generate(request, timeout=30)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as e:
                    codes.append(e.code())
                    assert "max_waiting=1" in e.details()
            assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
            for s in held:
                s.cancel()
    finally:
        server.stop()
