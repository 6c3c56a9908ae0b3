"""`qwen2-cluster`: the command line. Subcommands are added as the layers below them land."""

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

DEMO_PRESET = "tiny"


def demo_checkpoint() -> Path:
    """The built-in demo model: the `tiny` random checkpoint, written once to the user's cache."""
    from shards.checkpoint import preset_config, write_random_checkpoint

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qwen2-cluster" / f"demo-{DEMO_PRESET}"
    if not (cache / "config.json").is_file():
        write_random_checkpoint(cache, preset_config(DEMO_PRESET), seed=0)
    return cache


def init_random(args) -> None:
    from shards.checkpoint import preset_config, with_architecture, write_random_checkpoint

    config = preset_config(args.preset)
    if args.config:
        config.update(json.loads(Path(args.config).read_text()))
    if args.quant_double:
        if args.quantization != "nf4":
            raise SystemExit("init-random: --quant-double goes with --quantization nf4")
        config["quantization_config"] = config.get("quantization_config", {}) | {"bnb_4bit_use_double_quant": True}
    config = with_architecture(config, args.architecture, args.num_labels)

    def progress(done, total):
        print(f"\r{done / 2**20:,.0f} / {total / 2**20:,.0f} MiB", end="", file=sys.stderr, flush=True)

    out = write_random_checkpoint(args.out, config, seed=args.seed, dtype=args.dtype,
                                  max_shard_bytes=int(args.max_shard_gib * 2**30), progress=progress,
                                  quantization=args.quantization)
    print(f"\nwrote {out}", file=sys.stderr)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The cluster flags (`serve` takes the same ones)."""
    parser.add_argument("--model", help="checkpoint directory (default: the built-in tiny demo checkpoint)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-parallel-size", type=int, default=1)
    parser.add_argument("--ray-address", help="join this Ray cluster (default: start a local one)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    parser.add_argument("--attention-backend", choices=["triton", "torch"],
                        help="paged attention: a fused Triton kernel or torch's SDPA (default: triton on cuda, "
                             "torch on cpu)")
    parser.add_argument("--quantization", choices=["bitsandbytes-nf4"],
                        help="quantize the decoder's linear weights to 4 bits as each rank loads its slice (GPTQ and "
                             "AWQ checkpoints are recognised from their config.json, no flag needed)")
    parser.add_argument("--quant-double", action="store_true",
                        help="NF4: quantize the absmax constants too (bitsandbytes' double quantization)")
    parser.add_argument("--kv-cache-memory-gib", type=float, default=0.25, help="KV cache per rank on CPU")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="share of each GPU that weights + KV cache may use")
    parser.add_argument("--cpus-per-rank", type=float, default=1.0, help="CPUs each rank reserves (and its threads)")
    parser.add_argument("--rendezvous-host", help="torch.distributed rendezvous host (default: rank 0's node)")
    parser.add_argument("--placement-timeout", type=float, default=60.0, help="seconds to wait for the ranks' resources")
    parser.add_argument("--step-timeout", type=float, default=120.0, help="seconds before a step counts as failed")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="sequences in one step at most")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens in one step at most")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="replay decode steps of up to --max-num-seqs sequences from CUDA graphs captured per "
                             "padded batch size (default: on with --device cuda)")
    parser.add_argument("--compiled-graph", action=argparse.BooleanOptionalAction, default=None,
                        help="run steps through a Ray compiled graph (default: on GPU only; on CPU its channel "
                             "polling takes a core from the ranks)")


def engine_config(args):
    from cluster.engine import EngineConfig

    return EngineConfig(
        model_dir=str(Path(args.model) if args.model else demo_checkpoint()),
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        device=args.device,
        dtype=args.dtype,
        attention_backend=args.attention_backend,
        quantization=args.quantization,
        quant_double=args.quant_double,
        block_size=args.block_size,
        kv_cache_bytes=int(args.kv_cache_memory_gib * 2**30),
        gpu_memory_utilization=args.gpu_memory_utilization,
        ray_address=args.ray_address,
        rendezvous_host=args.rendezvous_host,
        cpus_per_rank=args.cpus_per_rank,
        placement_timeout_s=args.placement_timeout,
        step_timeout_s=args.step_timeout,
        compiled_graph=args.compiled_graph,
        cuda_graphs=args.cuda_graphs,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )


async def _generate(args) -> None:
    from tokenizers import Tokenizer

    from cluster.engine import Engine
    from shards.batch import SeqPlan
    from shards.sampling import SamplingParams

    config = engine_config(args)
    tokenizer = Tokenizer.from_file(str(Path(config.model_dir) / "tokenizer.json"))
    prompt = tokenizer.encode(args.prompt).ids
    engine = Engine(config)
    if "generate" not in engine.model.tasks:
        raise ValueError(f"{engine.model.architecture} does not generate (it serves: {', '.join(engine.model.tasks)}); "
                         f"serve it and use the pooling APIs")
    await engine.start()
    try:
        blocks = -(-(len(prompt) + args.max_new_tokens) // engine.block_size)
        if blocks > engine.num_kv_blocks:
            raise ValueError(f"prompt + max_new_tokens need {blocks} KV blocks; the cache has {engine.num_kv_blocks}")
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
        table, output, began = list(range(blocks)), [], time.perf_counter()
        plan = SeqPlan(0, prompt, 0, table, sampling=params)
        for _ in range(args.max_new_tokens):
            token = (await engine.step([plan]))[0]["token_id"]
            output.append(token)
            if token in engine.eos_token_ids and not args.ignore_eos:
                break
            plan = SeqPlan(0, [token], len(prompt) + len(output) - 1, table, sampling=params,
                           output_token_ids=list(output))
        elapsed = time.perf_counter() - began
    finally:
        await engine.shutdown()
    print(tokenizer.decode(output))
    print(f"[{config.model_dir}: tp={config.tensor_parallel_size} pp={config.pipeline_parallel_size}, engine up in "
          f"{engine.startup_s:.1f}s; {len(prompt)} prompt tokens, {len(output)} generated in {elapsed:.2f}s]",
          file=sys.stderr)


def generate(args) -> None:
    """Generate from one prompt through the Ray engine (no gRPC server)."""
    asyncio.run(_generate(args))


async def _serve(args) -> None:
    import signal

    from cluster.engine import Engine
    from router.runner import Runner
    from router.server import Server, ServerConfig
    from router.service import ServingCore
    from router.tokenizer import Tokenizer
    from router.validation import Defaults, Limits

    config = engine_config(args)
    engine = Engine(config)
    engine.init_ray()  # before gRPC starts its threads (see init_ray)
    tokenizer = Tokenizer.from_pretrained(config.model_dir)
    max_len = min(args.max_model_len or engine.max_model_len, engine.max_model_len)
    scaling = engine.model.rope_scaling
    if args.rope_scaling_mode == "off" and scaling is not None:  # no scaling: only the original window works
        max_len = min(max_len, scaling.original_max_position_embeddings)
    limits = Limits(max_model_len=max_len, vocab_size=engine.vocab_size, max_new_tokens=args.max_new_tokens_limit)
    runner = Runner(engine, tokenizer, args.max_num_seqs, args.max_num_batched_tokens, args.max_waiting,
                    prefill_latency_factor=args.prefill_latency_factor, max_restarts=args.max_engine_restarts,
                    prefix_caching=args.enable_prefix_caching,
                    max_model_len=max_len)
    token = Path(args.auth_token_file).read_text().strip() if args.auth_token_file else os.environ.get("QWEN2_AUTH_TOKEN")
    if bool(args.tls_cert_file) != bool(args.tls_key_file):
        raise ValueError("--tls-cert-file and --tls-key-file go together")
    server_config = ServerConfig(host=args.host, port=args.port, max_message_bytes=args.max_message_bytes,
                                 max_concurrent_rpcs=args.max_concurrent_rpcs,
                                 tls_cert_file=args.tls_cert_file, tls_key_file=args.tls_key_file,
                                 tls_client_ca_file=args.tls_client_ca_file, auth_token=token or None,
                                 metrics_port=args.metrics_port or None, http_port=args.http_port or None)
    core = ServingCore(runner, tokenizer, Defaults.from_pretrained(config.model_dir), limits, args.rope_scaling_mode)
    server = Server(core, server_config, model_name=args.served_model_name or Path(config.model_dir).name)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after init_ray: ray.init installs handlers of its own
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    # A signal may come at any moment, the engine's start (minutes for 72B weights) included: it ends that
    # start, and the same stop() below releases whatever was placed.
    starting, stopping = asyncio.create_task(server.start()), asyncio.create_task(stop.wait())
    await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
    if starting.done():
        starting.result()  # a failed start raises here
        print(f"serving {config.model_dir} (tp={config.tensor_parallel_size} pp={config.pipeline_parallel_size}, "
              f"max_model_len={core.limits.max_model_len}) on {args.host}:{server.port}; try: qwen2-client --target "
              f"{args.host}:{server.port} generate \"Hello\"", file=sys.stderr, flush=True)
        if server.http is not None:
            scheme = "https" if args.tls_cert_file else "http"
            print(f"OpenAI-compatible API (model {server.model_name!r}) on {scheme}://{args.host}:{server.http.port}/v1",
                  file=sys.stderr, flush=True)
        await stopping
        print(f"draining (up to {args.drain_timeout:g}s) ...", file=sys.stderr, flush=True)
    else:
        print("stopping while the engine starts ...", file=sys.stderr, flush=True)
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
    await server.stop(args.drain_timeout)


def serve(args) -> None:
    """The gRPC server over the Ray engine."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve(args))


def build_parser() -> argparse.ArgumentParser:
    """The whole command line (the Helm chart's tests parse its rendered args with it)."""
    parser = argparse.ArgumentParser(prog="qwen2-cluster", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init-random", help="write a random-weight Qwen2 checkpoint in Hugging Face layout")
    p.add_argument("--preset", default=DEMO_PRESET, help="tiny, bench-cpu, qwen2-0.5b, qwen2-1.5b, qwen2-7b, "
                   "qwen2-72b, qwen2-7b-instruct-yarn, qwen2-72b-instruct-yarn")
    p.add_argument("--config", help="JSON file of config.json fields that override the preset's")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-shard-gib", type=float, default=2.0)
    p.add_argument("--quantization", choices=["gptq-int4", "gptq-int8", "awq", "nf4"],
                   help="write the decoder's linear weights pre-quantized in that on-disk format (nf4: as "
                        "transformers saves a bitsandbytes load_in_4bit model)")
    p.add_argument("--quant-double", action="store_true",
                   help="nf4: double quantization (bnb_4bit_use_double_quant)")
    p.add_argument("--architecture", default="Qwen2ForCausalLM",
                   help="the transformers class to write: Qwen2ForCausalLM, Qwen2ForSequenceClassification, "
                        "Qwen2ForTokenClassification, Qwen2ForQuestionAnswering or Qwen2Model (no head: embeddings)")
    p.add_argument("--num-labels", type=int, default=2, help="the classification heads' outputs")
    p.set_defaults(run=init_random)

    p = sub.add_parser("generate", help="generate from a prompt through the Ray engine (no gRPC server)")
    add_engine_args(p)
    p.add_argument("--prompt", default="Hello world")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--ignore-eos", action="store_true")
    p.set_defaults(run=generate)

    p = sub.add_parser("serve", help="serve the gRPC API over a Ray cluster of model shards")
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--metrics-port", type=int, default=9090, help="Prometheus /metrics on --host (0: off)")
    p.add_argument("--http-port", type=int, default=8000,
                   help="the OpenAI-compatible HTTP API on --host, beside gRPC (0: off)")
    p.add_argument("--served-model-name", help="the model's name in both APIs (default: the checkpoint directory's "
                   "name); HTTP requests naming another get 404 model_not_found")
    p.add_argument("--max-model-len", type=int, help="cap the model's maximum length (prompt + generated)")
    p.add_argument("--prefill-latency-factor", type=float, default=1.5,
                   help="steps that prefill long prompts beside decodes aim at this many decode steps (0: fixed "
                        "budget); the p99 lands about a quarter above it")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV of prompt prefixes already computed (shared system prompts, chat turns)")
    p.add_argument("--max-engine-restarts", type=int, default=3,
                   help="engine failures in a row it is rebuilt after, before requests end UNAVAILABLE")
    p.add_argument("--max-waiting", type=int, default=256, help="queued requests before RESOURCE_EXHAUSTED")
    p.add_argument("--max-new-tokens-limit", type=int, default=4096, help="the most max_new_tokens a request may ask")
    p.add_argument("--max-message-bytes", type=int, default=64 * 2**20,
                   help="largest gRPC message, either way, and largest HTTP request body (413 past it)")
    p.add_argument("--max-concurrent-rpcs", type=int, help="RPCs served at once (default: unbounded)")
    p.add_argument("--rope-scaling-mode", choices=["per-request", "static", "off"], default="per-request")
    p.add_argument("--tls-cert-file", help="PEM certificate chain: serve gRPC and HTTP over TLS")
    p.add_argument("--tls-key-file", help="PEM private key of --tls-cert-file")
    p.add_argument("--tls-client-ca-file", help="PEM CA bundle: require client certificates it signed (mTLS)")
    p.add_argument("--auth-token-file", help="require `authorization: Bearer <token>` (or set QWEN2_AUTH_TOKEN); "
                   "health and reflection stay open")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds admitted requests get on SIGTERM")
    p.set_defaults(run=serve)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, ModuleNotFoundError, RuntimeError) as e:
        sys.exit(f"qwen2-cluster {args.command}: error: {e}")


if __name__ == "__main__":
    main()
