"""`qwen2-cluster`: the command line. Subcommands are added as the layers below them land."""

import argparse
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
    from shards.checkpoint import preset_config, write_random_checkpoint

    config = preset_config(args.preset)
    if args.config:
        config.update(json.loads(Path(args.config).read_text()))

    def progress(done, total):
        print(f"\r{done / 2**20:,.0f} / {total / 2**20:,.0f} MiB", end="", file=sys.stderr, flush=True)

    out = write_random_checkpoint(args.out, config, seed=args.seed, dtype=args.dtype,
                                  max_shard_bytes=int(args.max_shard_gib * 2**30), progress=progress)
    print(f"\nwrote {out}", file=sys.stderr)


def generate(args) -> None:
    """Generate from one prompt in this process (TP = PP = 1), straight on the shard runtime."""
    from tokenizers import Tokenizer

    from shards.batch import SeqPlan
    from shards.parallel import ParallelGroups
    from shards.sampling import SamplingParams
    from shards.worker import ShardWorker

    model_dir = Path(args.model) if args.model else demo_checkpoint()
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    prompt = tokenizer.encode(args.prompt).ids
    block_size = 16
    blocks = -(-(len(prompt) + args.max_new_tokens) // block_size)
    worker = ShardWorker(model_dir, ParallelGroups(), num_kv_blocks=blocks, block_size=block_size, dtype=args.dtype)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    table, output, start = list(range(blocks)), [], time.perf_counter()
    plan = SeqPlan(0, prompt, 0, table, sampling=params)
    for _ in range(args.max_new_tokens):
        token = worker.execute([plan])[0]["token_id"]
        output.append(token)
        if token in worker.config.eos_token_ids and not args.ignore_eos:
            break
        plan = SeqPlan(0, [token], len(prompt) + len(output) - 1, table, sampling=params,
                       output_token_ids=list(output))
    elapsed = time.perf_counter() - start
    print(tokenizer.decode(output))
    print(f"[{model_dir}: {len(prompt)} prompt tokens, {len(output)} generated in {elapsed:.2f}s]", file=sys.stderr)


def main(argv=None) -> None:
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
    p.set_defaults(run=init_random)

    p = sub.add_parser("generate", help="generate from a prompt in this process (no cluster)")
    p.add_argument("--model", help="checkpoint directory (default: the built-in tiny demo checkpoint)")
    p.add_argument("--prompt", default="Hello world")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(run=generate)

    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        sys.exit(f"qwen2-cluster {args.command}: error: {e}")


if __name__ == "__main__":
    main()
