"""Generation extras end to end through the gRPC server (TP=1 unless the point is TP=2): logit_bias, min_tokens,
prompt_logprobs (chunked too), skip_special_tokens, include_stop_str_in_output and their validation, checked
against transformers' Qwen2ForCausalLM on the same random checkpoint."""

import json
from types import SimpleNamespace

import grpc
import pytest
import torch
from transformers import AutoTokenizer, Qwen2ForCausalLM

from qwen2_client import Client, Result
from qwen2_client.proto import serving_pb2 as pb
from qwen2_client.proto import serving_pb2_grpc as pb_grpc
from router.validation import Defaults, Limits, RequestError, validate_parameters
from shards.checkpoint import preset_config, write_random_checkpoint
from tests.server_process import InProcessServer
from tests.test_server import violations

PROMPT = "The quick brown fox jumps over the lazy dog"
CHUNK = 16  # the TP=1 server's --max-num-batched-tokens: longer prompts are prefilled in chunks
ENDOFTEXT, IM_START = 151643, 151644


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The tiny checkpoint, with an extra EOS id in generation_config.json: the 4th token of PROMPT's greedy
    continuation (a token not seen before it), so generation with EOS on stops early."""
    model_dir = write_random_checkpoint(tmp_path_factory.mktemp("extras") / "tiny", preset_config("tiny"), seed=23)
    model = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    greedy = model.generate(torch.tensor([prompt_ids]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, len(prompt_ids):].tolist()
    eos_at = next(i for i in range(3, 24) if greedy[i] not in greedy[:i] and greedy[i] != ENDOFTEXT)
    path = model_dir / "generation_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"eos_token_id": [ENDOFTEXT, greedy[eos_at]]}))
    return SimpleNamespace(dir=model_dir, model=model, tokenizer=tokenizer, prompt_ids=prompt_ids, greedy=greedy,
                           eos=greedy[eos_at], eos_at=eos_at)


@pytest.fixture(scope="module")
def server(ckpt):
    server = InProcessServer(ckpt.dir, tp=1, max_num_seqs=8, max_num_batched_tokens=CHUNK, max_waiting=16)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.GenerationStub(channel)


def request(ids, **params) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), parameters=pb.GenerationParameters(**params))


def generate(stub, ids, **params) -> pb.GenerateResponse:
    return stub.Generate(request(ids, **params))


def hf_greedy(ckpt, ids, new_tokens, **kw) -> list[int]:
    out = ckpt.model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kw)
    return out[0, len(ids):].tolist()


def long_prompt(ckpt, n: int) -> list[int]:
    ids = ckpt.tokenizer(" ".join(f"word{i} and more" for i in range(n)))["input_ids"][:n]
    assert len(ids) == n
    return ids


def assert_prompt_logprobs(ckpt, ids, rows, top_n):
    """rows (TokenLogprob messages, one per prompt token after the first) against transformers' float32
    log_softmax of the prompt's logits: the token's logprob and the top_n, to 1e-4."""
    with torch.no_grad():
        expected = ckpt.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    assert [r.token_id for r in rows] == ids[1:]
    for pos, row in enumerate(rows, start=1):
        assert row.logprob == pytest.approx(expected[pos - 1, ids[pos]].item(), abs=1e-4)
        values, top_ids = expected[pos - 1].topk(top_n)
        assert [t.token_id for t in row.top] == top_ids.tolist(), pos
        assert [t.logprob for t in row.top] == pytest.approx(values.tolist(), abs=1e-4)


# -- logit_bias ----------------------------------------------------------------------------------------


def test_logit_bias_matches_transformers_sequence_bias(stub, ckpt):
    """-100 bans the first greedy token, +0.5 lifts a prompt token; the logprobs stay the raw model's."""
    bias = {ckpt.greedy[0]: -100.0, ckpt.prompt_ids[3]: 0.5}
    assert len(bias) == 2
    expected = hf_greedy(ckpt, ckpt.prompt_ids, 12, eos_token_id=None,
                         sequence_bias={(t,): b for t, b in bias.items()})
    out = generate(stub, ckpt.prompt_ids, max_new_tokens=12, temperature=0, ignore_eos=True, logit_bias=bias)
    assert list(out.token_ids) == expected != ckpt.greedy[:12]
    assert ckpt.greedy[0] not in out.token_ids
    with torch.no_grad():
        raw = ckpt.model(torch.tensor([ckpt.prompt_ids])).logits[0, -1].log_softmax(-1)
    assert out.logprobs[0].logprob == pytest.approx(raw[expected[0]].item(), abs=1e-4)


def test_skip_special_tokens(stub, ckpt):
    """+100 on <|im_start|> makes greedy pick it; the text shows it only with skip_special_tokens off."""
    common = dict(max_new_tokens=3, temperature=0, ignore_eos=True, logit_bias={IM_START: 100.0})
    skipped = generate(stub, ckpt.prompt_ids, **common)
    kept = generate(stub, ckpt.prompt_ids, skip_special_tokens=False, **common)
    assert list(skipped.token_ids) == list(kept.token_ids) == [IM_START] * 3
    assert skipped.text == ckpt.tokenizer.decode([IM_START] * 3, skip_special_tokens=True) == ""
    assert kept.text == ckpt.tokenizer.decode([IM_START] * 3, skip_special_tokens=False) == "<|im_start|>" * 3


# -- stopping ------------------------------------------------------------------------------------------


def test_min_tokens_defers_eos_like_transformers_min_new_tokens(stub, ckpt):
    eos = [ENDOFTEXT, ckpt.eos]
    early = generate(stub, ckpt.prompt_ids, max_new_tokens=24, temperature=0)
    assert list(early.token_ids) == hf_greedy(ckpt, ckpt.prompt_ids, 24, eos_token_id=eos)
    assert len(early.token_ids) == ckpt.eos_at + 1 and early.final.finish_reason == pb.FINISH_REASON_EOS

    min_tokens = ckpt.eos_at + 4
    late = generate(stub, ckpt.prompt_ids, max_new_tokens=24, temperature=0, min_tokens=min_tokens)
    assert list(late.token_ids) == hf_greedy(ckpt, ckpt.prompt_ids, 24, eos_token_id=eos, min_new_tokens=min_tokens)
    assert len(late.token_ids) >= min_tokens and ckpt.eos not in late.token_ids[:min_tokens]

    # With ignore_eos the model's EOS ids are free; a stop token id is deferred the same way.
    stopped = generate(stub, ckpt.prompt_ids, max_new_tokens=24, temperature=0, ignore_eos=True,
                       stop_token_ids=[ckpt.eos], min_tokens=min_tokens)
    assert list(stopped.token_ids) == hf_greedy(ckpt, ckpt.prompt_ids, 24, eos_token_id=[ckpt.eos],
                                                min_new_tokens=min_tokens)


def test_include_stop_str_in_output(stub, ckpt):
    text = ckpt.tokenizer.decode(ckpt.greedy[:16])
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cut = text.index(stop)
    common = dict(max_new_tokens=16, temperature=0, ignore_eos=True, stop=[stop])
    assert generate(stub, ckpt.prompt_ids, **common).text == text[:cut]
    out = generate(stub, ckpt.prompt_ids, include_stop_str_in_output=True, **common)
    assert out.text == text[:cut + len(stop)] and out.final.matched_stop == stop
    # A stop token's text is kept too (here a special one, shown with skip_special_tokens off).
    out = generate(stub, ckpt.prompt_ids, max_new_tokens=16, temperature=0, ignore_eos=True,
                   stop_token_ids=[IM_START], logit_bias={IM_START: 100.0}, include_stop_str_in_output=True,
                   skip_special_tokens=False)
    assert out.text == "<|im_start|>" and out.final.finish_reason == pb.FINISH_REASON_STOP


# -- prompt logprobs -----------------------------------------------------------------------------------


def test_prompt_logprobs_match_transformers_whole_and_chunked(stub, ckpt):
    chunked = long_prompt(ckpt, 3 * CHUNK + 5)
    for ids in (ckpt.prompt_ids, chunked):
        out = generate(stub, ids, max_new_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=3)
        assert_prompt_logprobs(ckpt, ids, out.prompt_logprobs, 3)
        assert list(out.token_ids) == hf_greedy(ckpt, ids, 4, eos_token_id=None)


def test_prompt_logprobs_on_the_first_stream_message_only(stub, ckpt):
    ids = long_prompt(ckpt, CHUNK + 3)
    messages = list(stub.GenerateStream(request(ids, max_new_tokens=3, temperature=0, ignore_eos=True,
                                                prompt_logprobs=0)))
    assert len(messages) == 3
    assert_prompt_logprobs(ckpt, ids, messages[0].prompt_logprobs, 0)
    assert not messages[1].prompt_logprobs and not messages[2].prompt_logprobs
    assert not generate(stub, ids, max_new_tokens=2).prompt_logprobs  # not asked: none


def test_zero_new_tokens_returns_only_the_prompt_logprobs(stub, ckpt):
    """OpenAI's echo with max_tokens 0: the request ends after its prefill."""
    ids = long_prompt(ckpt, 2 * CHUNK + 1)
    out = generate(stub, ids, max_new_tokens=0, prompt_logprobs=2)
    assert list(out.token_ids) == [] and out.text == "" and out.final.finish_reason == pb.FINISH_REASON_LENGTH
    assert out.final.usage.prompt_tokens == len(ids) and out.final.usage.generated_tokens == 0
    assert_prompt_logprobs(ckpt, ids, out.prompt_logprobs, 2)
    [message] = stub.GenerateStream(request(ids, max_new_tokens=0, prompt_logprobs=2))
    assert message.prompt_logprobs == out.prompt_logprobs and message.final.finish_reason == pb.FINISH_REASON_LENGTH


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_prompt_logprobs_parallel_chunked_beyond_one_lm_head_slice(ckpt, tp, pp):
    """TP=2: the vocabulary is gathered on TP rank 0; PP=2: the last stage scores. A 400-token prompt at
    --max-num-batched-tokens 320 is two chunks, the first scored in two slices of logits (PROMPT_LOGPROB_ROWS)."""
    server = InProcessServer(ckpt.dir, tp=tp, engine_options={"pp": pp}, max_num_seqs=4, max_num_batched_tokens=320,
                             max_waiting=8)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GenerationStub(channel)
            ids = long_prompt(ckpt, 400)
            out = generate(stub, ids, max_new_tokens=2, temperature=0, ignore_eos=True, prompt_logprobs=4)
            assert_prompt_logprobs(ckpt, ids, out.prompt_logprobs, 4)
            assert list(out.token_ids) == hf_greedy(ckpt, ids, 2, eos_token_id=None)
    finally:
        server.stop()


def test_sdk_sends_and_reads_the_extras(server, ckpt):
    ids = long_prompt(ckpt, CHUNK + 2)
    with Client(server.target) as client:
        whole = client.generate(token_ids=ids, max_new_tokens=0, prompt_logprobs=1)
        assert [lp.token_id for lp in whole.prompt_logprobs] == ids[1:] and whole.finish_reason == "length"
        assert all(len(lp.top) == 1 for lp in whole.prompt_logprobs)
        streamed = Result.from_deltas(client.generate_stream(token_ids=ids, max_new_tokens=2, prompt_logprobs=1,
                                                             temperature=0, ignore_eos=True))
        assert [lp.token_id for lp in streamed.prompt_logprobs] == ids[1:] and len(streamed.token_ids) == 2
        assert [lp.logprob for lp in streamed.prompt_logprobs] == pytest.approx(
            [lp.logprob for lp in whole.prompt_logprobs], abs=1e-5)
        special = client.generate(token_ids=ids, max_new_tokens=2, temperature=0, ignore_eos=True, min_tokens=2,
                                  logit_bias={IM_START: 100}, skip_special_tokens=False)
        assert special.text == "<|im_start|>" * 2


# -- validation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("params,field,words", [
    (dict(logit_bias={10**7: 1.0}), "parameters.logit_bias[10000000]", ["10000000", "151936"]),
    (dict(logit_bias={5: 101.0}), "parameters.logit_bias[5]", ["101", "100"]),
    (dict(logit_bias={i: 1.0 for i in range(301)}), "parameters.logit_bias", ["301", "300"]),
    (dict(max_new_tokens=4, min_tokens=5), "parameters.min_tokens", ["5", "`max_new_tokens` (4)"]),
    (dict(prompt_logprobs=21), "parameters.prompt_logprobs", ["21", "20"]),
    (dict(max_new_tokens=0), "parameters.max_new_tokens", ["0", "prompt_logprobs"]),
])
def test_invalid_extras_are_named(stub, params, field, words):
    with pytest.raises(grpc.RpcError) as e:
        generate(stub, [1, 2, 3], **params)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = dict(violations(e.value))
    assert field in found, found
    assert all(w in found[field] for w in words), found[field]


def test_validation_takes_the_http_spelling():
    """The OpenAI API passes JSON: logit_bias keys are strings, and its own field names."""
    limits = Limits(max_model_len=64, vocab_size=1000)
    names = {"max_new_tokens": "max_tokens"}
    valid = validate_parameters({"logit_bias": {"5": -100, 7: 2.5}, "max_new_tokens": 0, "prompt_logprobs": 1},
                                10, Defaults(), limits, prefix="", names=names)
    assert valid.sampling.logit_bias == ((5, -100.0), (7, 2.5)) and valid.max_new_tokens == 0
    with pytest.raises(RequestError) as e:
        validate_parameters({"logit_bias": {"x": 1}, "max_new_tokens": 3, "min_tokens": 4}, 10, Defaults(), limits,
                            prefix="", names=names)
    assert dict(e.value.violations) == {
        "logit_bias[x]": "`logit_bias` keys must be token ids >= 0 and < the vocabulary size 1000, got 'x'",
        "min_tokens": "`min_tokens` must be >= 0 and <= `max_tokens` (3), got 4",
    }
