"""`python -m bench.plan_bytes`: bytes of one decode step's message to every rank, as sent and as it would be whole.

The router's real scheduler plans `--batch` sequences (prompts of `--prompt-tokens`, Qwen2-Instruct's repetition
penalty 1.05 by default) through their prompts and `--steps` decode steps; each step's message (plans and the ids
to forget) is pickled as Ray pickles a call's arguments. "Whole" is the same plans resolved as a rank resolves them
(full block tables, parameters, prompt and outputs): what each plan carried before plans continued (issue 17).
No model runs: the sampled tokens are made up.
"""

import argparse
import copy
import dataclasses
import json
import pickle
import statistics

from router.scheduler import BlockManager, Scheduler, Sequence
from shards.batch import KeptSequences
from shards.sampling import SamplingParams


def measure(batch: int, prompt_tokens: int, steps: int, repetition_penalty: float, block_size: int = 16) -> dict:
    blocks = batch * -(-(prompt_tokens + steps + 1) // block_size)
    sched = Scheduler(BlockManager(blocks, block_size), batch, batch * prompt_tokens, batch)
    for i in range(batch):
        params = SamplingParams(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=repetition_penalty, seed=i)
        sched.add(Sequence(i, [(i * 7919 + j * 104729) % 151_000 for j in range(prompt_tokens)], params))
    kept, sent, whole = KeptSequences(), [], []
    for step in range(steps + 1):
        plans, forget = sched.schedule(), sched.pop_forgotten()
        resolved = kept.resolve(copy.deepcopy(plans), forget)
        if step:  # decode steps only (step 0 is the prompts')
            sent.append(len(pickle.dumps((plans, forget), protocol=5)))
            whole.append(len(pickle.dumps(
                [dataclasses.replace(p, continues=False, keeps_sampling=False) for p in resolved], protocol=5)))
        sched.complete(plans, [{"seq_id": p.seq_id, "token_id": (p.seq_id + step * 31) % 151_000} for p in plans])
    return {"batch": batch, "prompt_tokens": prompt_tokens, "decode_steps": steps,
            "repetition_penalty": repetition_penalty, "sent_bytes_per_step": statistics.mean(sent),
            "whole_bytes_per_step": statistics.mean(whole)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.plan_bytes", description=__doc__)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--repetition-penalty", type=float, default=1.05)
    args = p.parse_args(argv)
    r = measure(args.batch, args.prompt_tokens, args.steps, args.repetition_penalty)
    print(json.dumps(r, indent=2))
    return r


if __name__ == "__main__":
    main()
