"""The baseline (docs/performance.md): `transformers` generate() on the same checkpoint, dtype and threads, static
batches with left padding, at each tried batch size; the best one is the figure to beat.

A static batch runs until its longest request is done, so it generates past the shorter requests' ends;
only the tokens the requests asked for count, exactly as for our server.
"""

import time

import torch

from bench.workloads import Request

PAD = 151643  # <|endoftext|>: Qwen2's pad token


def load(model_dir):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.inference_mode()
def generate_batch(model, batch: list[Request]) -> torch.Tensor:
    """Left-padded static batch, greedy, EOS ignored up to the longest request's max_new_tokens."""
    width, new = max(len(r.prompt) for r in batch), max(r.max_new_tokens for r in batch)
    ids = torch.full((len(batch), width), PAD)
    mask = torch.zeros_like(ids)
    for row, r in enumerate(batch):
        ids[row, width - len(r.prompt):] = torch.tensor(r.prompt)
        mask[row, width - len(r.prompt):] = 1
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, pad_token_id=PAD)
    return out[:, width:]


def run(model_dir, requests: list[Request], batch_sizes: list[int], max_batches: int | None) -> dict:
    """Throughput at each batch size over the first `max_batches` batches of the mix (None: all of it)."""
    model = load(model_dir)
    generate_batch(model, [Request([1, 2, 3], 2)])  # first-call set-up off the clock
    rows = []
    for size in batch_sizes:
        batches = [requests[i:i + size] for i in range(0, len(requests), size)][:max_batches]
        began, generated = time.perf_counter(), 0
        for batch in batches:
            generated += generate_batch(model, batch).numel()
        wall = time.perf_counter() - began
        asked = sum(r.max_new_tokens for b in batches for r in b)
        rows.append({"batch_size": size, "requests": sum(map(len, batches)), "wall_s": wall,
                     "requested_tokens": asked, "generated_tokens": generated,
                     "expected_generated_tokens": sum(len(b) * max(r.max_new_tokens for r in b) for b in batches),
                     "tokens_per_s": asked / wall})
    return {"threads": torch.get_num_threads(), "rows": rows, "best": max(rows, key=lambda r: r["tokens_per_s"])}
