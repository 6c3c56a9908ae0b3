"""Qwen2's other heads against transformers' classes on the same random checkpoints (float32, 1e-4): sequence
classification, token classification, extractive QA and embeddings, at TP 1, TP 2 and PP 2 with chunked
prompts; then served end to end (gRPC, SDK, HTTP with the openai SDK and urllib), beside generation, and refused
clearly when the input or the task is wrong."""

import asyncio
import base64
import functools
import json
import re
import struct

import urllib.error
import urllib.request
import openai
import pytest
import torch
import transformers

from qwen2_client import AsyncClient, Client, UnsupportedTaskError, ValidationError
from router.pooling import join, last_non_pad
from router.validation import PoolingSpec
from shards.batch import SeqPlan
from shards.checkpoint import preset_config, with_architecture, write_random_checkpoint
from tests import ranks
from tests.multiproc import run_ranks
from tests.server_process import InProcessServer

TOLERANCE = 1e-4
PAD = 151643  # the classifiers' pad_token_id (with_architecture's default)
HEADS = {"classify": "Qwen2ForSequenceClassification", "token_classify": "Qwen2ForTokenClassification",
         "qa": "Qwen2ForQuestionAnswering"}
LABELS = {"classify": 3, "token_classify": 5, "qa": 2}


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """task -> a random checkpoint of its class (tiny shape, 3 layers: PP 2 splits them unevenly)."""
    from router import cli

    root = tmp_path_factory.mktemp("heads")
    config = preset_config("tiny") | {"num_hidden_layers": 3}
    out = {task: write_random_checkpoint(root / task, with_architecture(config, arch, LABELS[task]), seed=11)
           for task, arch in HEADS.items() if task != "token_classify"}
    out["generate"] = write_random_checkpoint(root / "generate", config, seed=11)
    # The token classifier through `qwen2-cluster init-random --architecture`, as a user writes one.
    (root / "layers.json").write_text(json.dumps({"num_hidden_layers": 3}))
    cli.main(["init-random", "--config", str(root / "layers.json"), "--architecture", HEADS["token_classify"],
              "--num-labels", str(LABELS["token_classify"]), "--seed", "11", "--out", str(root / "token_classify")])
    out["token_classify"] = root / "token_classify"
    return out


@functools.cache
def reference(model_dir, task: str, no_pad_token_id: bool = False):
    """transformers' class for `task` on the checkpoint (loaded once per module run)."""
    cls = getattr(transformers, HEADS.get(task, "Qwen2ForCausalLM"))
    config = {"pad_token_id": None} if no_pad_token_id else {}
    return cls.from_pretrained(model_dir, dtype=torch.float32, **config).eval()


def hidden(model, ids: list[int]) -> torch.Tensor:
    """transformers' last_hidden_state of the base model [tokens, hidden]."""
    with torch.no_grad():
        return model.base_model(torch.tensor([ids])).last_hidden_state[0]


def expected_embedding(model, ids, spec: PoolingSpec) -> torch.Tensor:
    h = hidden(model, ids)
    out = (h.mean(0) if spec.pooling == "mean" else h[-1])[: spec.dimensions]
    return torch.nn.functional.normalize(out, dim=-1) if spec.normalize else out


def expected(model, task: str, ids: list[int]) -> torch.Tensor:
    """What the head gives for one unpadded prompt (batch of 1), in join()'s shape."""
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    if task in ("classify", "token_classify"):
        return out.logits[0]
    return torch.stack([out.start_logits[0], out.end_logits[0]], -1)


def random_ids(lengths, seed) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 150000, (n,), generator=g).tolist() for n in lengths]


# -- the heads on the ranks, against transformers ------------------------------------------------------------
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])  # TP 1: served below, each head
def test_heads_match_transformers(heads, tp, pp):
    """One batch of prompts of different lengths, the first prefilled in two chunks (the second beside nothing
    else), through each checkpoint's head and both embedding poolings; a prompt with pad tokens is classified at
    its last non-pad token (the first when all are pads), as transformers does, or at its last token when the
    config has no pad_token_id."""
    prompts = random_ids([13, 5, 21], seed=1)
    prompts += [prompts[1] + [PAD, PAD], [5, PAD, 9], [PAD, PAD, PAD]]  # all pads: transformers pools row 0
    half = len(prompts[0]) // 2
    tables = ranks.block_tables(len(prompts), 8)
    # seq ids: 10 * mode + prompt; modes: every row's head outputs, the last row's hidden state, the hidden states'
    # sum, the head at the last row, the head at the last non-pad row
    modes = [("head", None), ("hidden", "last"), ("hidden_sum", None), ("head", "last"), ("head", "nonpad")]

    def plans(first: bool) -> list[SeqPlan]:
        out = []
        for m, (pooling, at) in enumerate(modes):
            for i, p in enumerate(prompts):
                position = {"last": len(p) - 1, "nonpad": last_non_pad(p, PAD), None: None}[at]
                if i == 0:  # two chunks, the second in a step of its own
                    start, end = (0, half) if first else (half, len(p))
                elif first:
                    start, end = 0, len(p)
                else:
                    continue
                out.append(SeqPlan(10 * m + i, p[start:end], start, tables[i], pooling=pooling,
                                   pool_position=position))
        return out

    tasks = list(HEADS)
    results = run_ranks(ranks.pooled_parts, tp * pp, [str(heads[t]) for t in tasks], tp, pp,
                        [plans(True), plans(False)])[(pp - 1) * tp]
    worst = {}
    for task, parts in zip(tasks, results):
        model = reference(heads[task], task)
        for i, ids in enumerate(prompts):
            diffs = {}
            # Classification at the last non-pad token (transformers skips the trailing pads by itself), or with
            # no pad_token_id at the very last token; the other heads at every token.
            ours = join(PoolingSpec(task), parts[40 + i if task == "classify" else i], len(ids))
            diffs[task] = (ours - expected(model, task, ids)).abs().max().item()
            if task == "classify":
                nopad = reference(heads[task], task, no_pad_token_id=True)
                ours = join(PoolingSpec(task), parts[30 + i], len(ids))
                diffs["classify (no pad_token_id)"] = (ours - expected(nopad, task, ids)).abs().max().item()
            for m, pooling in ((1, "last"), (2, "mean")):
                spec = PoolingSpec("embed", pooling, normalize=True)
                diffs[f"embed {pooling}"] = (join(spec, parts[10 * m + i], len(ids))
                                             - expected_embedding(model, ids, spec)).abs().max().item()
            for name, d in diffs.items():
                worst[name] = max(worst.get(name, 0.0), d)
    print(f"tp={tp} pp={pp}: max |ours - transformers| " + ", ".join(f"{k} {v:.2g}" for k, v in worst.items()))
    assert max(worst.values()) <= TOLERANCE, worst
    assert {"classify", "token_classify", "qa", "embed last", "embed mean", "classify (no pad_token_id)"} <= set(worst)


# -- served: gRPC, the SDK, HTTP ------------------------------------------------------------------------------
MAX_MODEL_LEN = 64


@pytest.fixture(scope="module")
def classifier(heads):
    """The sequence classifier at TP 1, prompts chunked by 16 tokens a step, up to 64 tokens."""
    server = InProcessServer(heads["classify"], tp=1, http=True, max_num_batched_tokens=16,
                             limits_options={"max_model_len": MAX_MODEL_LEN})
    yield server
    server.stop()


def post(server, path: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(server.http_url + path, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_classification_and_embeddings_served(heads, classifier):
    """Prompts of different lengths in one request, one chunked over three steps and one ending in pad tokens,
    through gRPC and HTTP, each equal to transformers alone."""
    model = reference(heads["classify"], "classify")
    prompts = random_ids([7, 40], seed=5)
    prompts.append(prompts[0][:4] + [PAD, PAD])
    with Client(classifier.target) as c:
        info = c.model_info()
        assert info.tasks == ["classify", "embed"] and info.architecture == HEADS["classify"]
        assert info.labels == ["LABEL_0", "LABEL_1", "LABEL_2"]
        results = c.classify(prompts)
        text = c.classify("A text, tokenized by the server.")[0]
        embeddings = {(p, n, d): c.embed(prompts, pooling=p, normalize=n, dimensions=d)
                      for p, n, d in (("last", True, None), ("mean", True, None), ("mean", False, 16))}
    worst = 0.0
    for ids, r in zip(prompts, results):
        ref = expected(model, "classify", ids)
        worst = max(worst, (torch.tensor(r.logits) - ref).abs().max().item())
        assert r.label == f"LABEL_{int(ref.argmax())}" and r.prompt_tokens == len(ids)
        assert torch.allclose(torch.tensor(r.probs), ref.softmax(-1), atol=TOLERANCE)
        for (p, n, d), out in embeddings.items():
            ref = expected_embedding(model, ids, PoolingSpec("embed", p, n, d))
            worst = max(worst, (torch.tensor(out[prompts.index(ids)].values) - ref).abs().max().item())
    print(f"served classify/embed, tp=1, chunks of 16: max |ours - transformers| {worst:.2g}")
    assert worst <= TOLERANCE
    assert len(embeddings[("mean", False, 16)][0].values) == 16
    assert text.label in info.labels

    # HTTP: the openai SDK's embeddings (base64 by default, floats when asked), vLLM's /classify and /pooling.
    with openai.OpenAI(base_url=classifier.http_url + "/v1", api_key="unused", max_retries=0) as oai:
        b64 = oai.embeddings.create(model="test", input=prompts)
        floats = oai.embeddings.create(model="test", input=prompts[1], encoding_format="float", dimensions=8)
    assert b64.usage.prompt_tokens == sum(map(len, prompts))
    assert torch.allclose(torch.tensor(b64.data[1].embedding), torch.tensor(embeddings[("last", True, None)][1].values),
                          atol=1e-6)
    ref = expected_embedding(model, prompts[1], PoolingSpec("embed", "last", True, 8))
    assert (torch.tensor(floats.data[0].embedding) - ref).abs().max() <= TOLERANCE
    status, body = post(classifier, "/v1/embeddings", {"input": prompts[0], "encoding_format": "base64"})
    values = struct.unpack("<64f", base64.b64decode(body["data"][0]["embedding"]))
    assert status == 200 and torch.allclose(torch.tensor(values), torch.tensor(embeddings[("last", True, None)][0].values))
    status, body = post(classifier, "/classify", {"model": "test", "input": [prompts[0], prompts[2]]})
    assert status == 200 and [d["label"] for d in body["data"]] == [results[0].label, results[2].label]
    assert body["data"][0]["num_classes"] == 3 and body["usage"]["prompt_tokens"] == len(prompts[0]) + 6
    assert torch.allclose(torch.tensor(body["data"][1]["probs"]), torch.tensor(results[2].probs), atol=1e-6)
    status, body = post(classifier, "/pooling", {"input": prompts[1]})  # the checkpoint's head by default
    assert status == 200 and torch.allclose(torch.tensor(body["data"][0]["data"]), torch.tensor(results[1].logits),
                                            atol=1e-6)
    status, body = post(classifier, "/pooling", {"input": "some text", "task": "embed", "pooling": "mean"})
    assert status == 200 and len(body["data"][0]["data"]) == 64
    with urllib.request.urlopen(classifier.http_url + "/v1/models", timeout=10) as r:
        assert json.loads(r.read())["data"][0]["tasks"] == ["classify", "embed"]
    metrics = classifier.runner.metrics
    assert metrics.pooling.labels("classify", "grpc")._value.get() == 4
    assert metrics.pooling.labels("classify", "http")._value.get() == 3


def test_bad_pooling_requests_are_refused_clearly(classifier):
    long = "word " * (MAX_MODEL_LEN + 10)
    with Client(classifier.target) as c:
        for call, match in ((lambda: c.classify(""), r"inputs\[0\]\.text.*must not be empty"),
                            (lambda: c.classify(long), rf"must have at most the maximum model length {MAX_MODEL_LEN}"),
                            (lambda: c.classify([[5, 10**7]]), r"inputs\[0\]\.token_ids\.ids\[1\].*vocabulary size"),
                            (lambda: c.embed("x", dimensions=65), r"`dimensions` must be >= 1 and <= the hidden size 64"),
                            (lambda: c.embed("x", pooling="max"), r"`pooling` must be 'last' or 'mean'"),
                            (lambda: c.classify([]), r"`inputs` must not be empty")):
            with pytest.raises(ValidationError, match=match) as e:
                call()
            assert not isinstance(e.value, UnsupportedTaskError)
        for call in (lambda: c.generate("Hi", max_new_tokens=2), lambda: c.classify_tokens("Hi"),
                     lambda: c.extractive_qa("Hi")):
            with pytest.raises(UnsupportedTaskError, match=r"does not serve `\w+` requests; it serves: classify, embed"):
                call()
    for path, body, param in (("/v1/embeddings", {"input": ""}, "input"),
                              ("/v1/embeddings", {"input": ["ok", long]}, "input[1]"),
                              ("/classify", {"input": []}, "input"),
                              ("/pooling", {"input": "x", "task": "qa"}, "task"),
                              ("/pooling", {"input": "x", "task": "nope"}, "task"),
                              ("/v1/completions", {"model": "test", "prompt": "Hi", "max_tokens": 2}, "task")):
        status, answer = post(classifier, path, body)
        assert status == 400 and answer["error"]["param"] == param, (path, answer)


@pytest.fixture(scope="module")
def causal_pp2(heads):
    server = InProcessServer(heads["generate"], tp=1, engine_options={"pp": 2},
                             max_num_batched_tokens=32)
    yield server
    server.stop()


def test_pooling_beside_generation_gets_what_it_gets_alone(heads, causal_pp2):
    """A causal LM at PP 2 serves embeddings (its hidden states before the LM head) beside generations in the
    same steps; each gets what it gets alone, and classification is refused."""
    import concurrent.futures

    prompts = random_ids([9, 30], seed=8)
    model = reference(heads["generate"], "generate")
    with Client(causal_pp2.target) as c:
        assert c.model_info().tasks == ["generate", "embed"]
        alone_tokens = [c.generate(p, max_new_tokens=12, temperature=0, ignore_eos=True).token_ids for p in prompts]
        alone_embeds = [c.embed(p, pooling="mean")[0].values for p in prompts]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            gens = [pool.submit(c.generate, p, max_new_tokens=12, temperature=0, ignore_eos=True) for p in prompts]
            embeds = [pool.submit(c.embed, p, pooling="mean") for p in prompts]
            mixed_tokens = [g.result().token_ids for g in gens]
            mixed_embeds = [e.result()[0].values for e in embeds]
        with pytest.raises(UnsupportedTaskError, match="Qwen2ForCausalLM"):
            c.classify("Hi")
    assert mixed_tokens == alone_tokens
    worst = 0.0
    for ids, alone, mixed in zip(prompts, alone_embeds, mixed_embeds):
        ref = expected_embedding(model, ids, PoolingSpec("embed", "mean"))
        worst = max(worst, (torch.tensor(alone) - ref).abs().max().item(), (torch.tensor(mixed) - ref).abs().max().item())
    print(f"served embed beside generation, pp=2: max |ours - transformers| {worst:.2g}")
    assert worst <= TOLERANCE


def test_token_classification_served(heads):
    """The token classifier at TP 1, prompts chunked by 8 tokens a step: a label per token through the SDK, and
    the per-token logits through /pooling, as transformers gives them."""
    # A quarter CPU: the module's other servers (1.5 of the 2 CPUs) still hold theirs.
    server = InProcessServer(heads["token_classify"], tp=1, http=True, max_num_batched_tokens=8,
                             engine_options={"cpus_per_rank": 0.25})
    try:
        prompts = random_ids([5, 19], seed=10)
        with Client(server.target) as c:
            results = c.classify_tokens(prompts)

        async def via_async_client():
            async with AsyncClient(server.target) as c:
                return await c.classify_tokens(prompts[0])

        async_result = asyncio.run(via_async_client())[0]
        status, body = post(server, "/pooling", {"input": prompts[1]})  # the checkpoint's head by default
    finally:
        server.stop()
    model = reference(heads["token_classify"], "token_classify")
    worst = 0.0
    for ids, r in zip(prompts, results):
        ref = expected(model, "token_classify", ids)
        ours = torch.tensor([t.logits for t in r.tokens])
        worst = max(worst, (ours - ref).abs().max().item())
        assert r.token_ids == ids and [t.label for t in r.tokens] == [f"LABEL_{i}" for i in ref.argmax(-1).tolist()]
    assert status == 200 and torch.allclose(torch.tensor(body["data"][0]["data"]), ours, atol=1e-6)
    assert async_result.token_ids == results[0].token_ids
    assert torch.allclose(torch.tensor([t.logits for t in async_result.tokens]),
                          torch.tensor([t.logits for t in results[0].tokens]), atol=1e-6)
    print(f"served token_classify, tp=1, chunks of 8: max |ours - transformers| {worst:.2g}")
    assert worst <= TOLERANCE


def test_extractive_qa_served_and_the_cli(heads, capsys):
    """The QA head at TP 1 through the SDK and `qwen2-client qa`: every token's start/end logits as transformers
    gives them, and the best span of at most max_answer_tokens tokens."""
    from qwen2_client import cli

    server = InProcessServer(heads["qa"], tp=1, engine_options={"cpus_per_rank": 0.25})
    try:
        prompts = random_ids([12, 25], seed=9)
        with Client(server.target) as c:
            results = c.extractive_qa(prompts, max_answer_tokens=4)
        model = reference(heads["qa"], "qa")
        worst = 0.0
        for ids, r in zip(prompts, results):
            ref = expected(model, "qa", ids)
            ours = torch.tensor([r.start_logits, r.end_logits]).T
            worst = max(worst, (ours - ref).abs().max().item())
            spans = [(i, j) for i in range(len(ids)) for j in range(i, min(i + 4, len(ids)))]
            best = max(spans, key=lambda s: ref[s[0], 0] + ref[s[1], 1])
            assert (r.answer_start, r.answer_end) == best and r.token_ids == ids
        with capsys.disabled():
            print(f"served qa, tp=1: max |ours - transformers| {worst:.2g}")
        assert worst <= TOLERANCE
        ids = ",".join(map(str, prompts[0]))
        capsys.readouterr()
        assert cli.main(["--target", server.target, "qa", "--token-ids", ids, "--max-answer-tokens", "4",
                         "--json"]) == 0
        assert json.loads(capsys.readouterr().out)[0]["answer_start"] == results[0].answer_start
        assert cli.main(["--target", server.target, "classify-tokens", "Hello"]) == cli.EXIT_INVALID
        assert re.search(r"FAILED_PRECONDITION: task: .*serves: qa, embed", capsys.readouterr().err)
    finally:
        server.stop()


# -- the scheduler's part (no model) --------------------------------------------------------------------------
def test_pooling_sequences_neither_take_nor_give_cached_blocks_and_restart_their_parts():
    """A pooling sequence computes its whole prompt even when a generation cached it, leaves nothing cached
    itself, and a recompute (preemption, recovery) starts its parts over."""
    from router.scheduler import BlockManager, Scheduler, Sequence
    from shards.sampling import SamplingParams

    def step(sched, make_result):
        plans = sched.schedule()
        return plans, sched.complete(plans, [make_result(p) for p in plans])

    def result(plan):
        if plan.pooling is not None:
            return {"seq_id": plan.seq_id, "pooled": torch.tensor([[float(plan.start)]])}
        return {"seq_id": plan.seq_id, "token_id": 1} if plan.samples else {"seq_id": plan.seq_id}

    prompt = list(range(100, 112))  # 3 full blocks of 4

    def scheduler():
        return Scheduler(BlockManager(16, 4, prefix_caching=True), max_num_seqs=4, max_num_batched_tokens=8,
                         max_waiting=8)

    def run(sched, seq):
        sched.add(seq)
        plans = []
        while True:
            step_plans, done = step(sched, result)
            plans += step_plans
            if done:
                sched.finish(seq.seq_id)
                return plans

    def generation(seq_id):
        return Sequence(seq_id, prompt, SamplingParams())

    def pooling(seq_id):
        return Sequence(seq_id, prompt, SamplingParams(), samples=False, pooling="hidden_sum")

    # Takes none: after a generation cached the prompt, a pooling sequence still starts at 0; a generation hits.
    sched = scheduler()
    run(sched, generation(0))
    assert [p.start for p in run(sched, pooling(1))] == [0, 8]
    run(sched, generation(2))
    assert sched.prefix_hit_tokens == 8  # 2 of its 3 full blocks (never its last token)
    # Gives none: after a pooling sequence, a generation finds nothing cached.
    sched = scheduler()
    run(sched, pooling(0))
    run(sched, generation(1))
    assert sched.prefix_hit_tokens == 0
    # A recompute (preemption, recovery) starts its parts over.
    seq = pooling(3)
    sched.add(seq)
    step(sched, result)
    sched.requeue_all()
    while not step(sched, result)[1]:
        pass
    assert [p.item() for p in seq.pooled] == [0.0, 8.0]  # the first run's chunk is gone
