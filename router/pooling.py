"""Pooling requests (sequence classification, token classification, extractive QA, embeddings) as prefill-only
sequences: which rows the last stage returns for each chunk of the prompt (shards/worker.py ShardWorker._pool),
and how the router joins the chunks into the answer once the whole prompt is computed.

Each follows transformers: sequence classification scores the last token that is not pad_token_id
(GenericForSequenceClassification), token classification and QA every token; embeddings are the final norm's
hidden states (Qwen2Model's last_hidden_state) at the last token or averaged over all of them.
"""

import torch
import torch.nn.functional as F

from router.validation import PoolingSpec


def last_non_pad(prompt_ids: list[int], pad_token_id: int | None) -> int:
    """transformers' pooled row: the rightmost token that is not pad_token_id (row 0 when all are); the last
    token when the config sets no pad_token_id."""
    if pad_token_id is None:
        return len(prompt_ids) - 1
    return max((i for i, t in enumerate(prompt_ids) if t != pad_token_id), default=0)


def plan(spec: PoolingSpec, prompt_ids: list[int], pad_token_id: int | None) -> tuple[str, int | None]:
    """(SeqPlan.pooling, SeqPlan.pool_position) of this request's chunks."""
    if spec.task == "classify":
        return "head", last_non_pad(prompt_ids, pad_token_id)
    if spec.task in ("token_classify", "qa"):
        return "head", None
    if spec.pooling == "mean":
        return "hidden_sum", None
    return "hidden", len(prompt_ids) - 1


def join(spec: PoolingSpec, chunks: list[torch.Tensor], prompt_len: int) -> torch.Tensor:
    """The answer from the chunks' parts (in prompt order), float32: classify [labels], token_classify
    [tokens, labels], qa [tokens, 2] (start, end), embed [dimensions]."""
    if spec.task != "embed":
        out = torch.cat(chunks)
        return out[0] if spec.task == "classify" else out
    out = torch.stack(chunks).sum(0) / prompt_len if spec.pooling == "mean" else torch.cat(chunks)[0]
    out = out[: spec.dimensions]
    return F.normalize(out, dim=-1) if spec.normalize else out


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """A classifier's label probabilities (softmax over the last dimension, as vLLM's /classify reports them)."""
    return logits.softmax(-1)


def best_span(start: torch.Tensor, end: torch.Tensor, max_tokens: int) -> tuple[int, int, float]:
    """The span [i, j] (j >= i, at most max_tokens tokens) with the highest start[i] + end[j], and that score:
    what transformers' question-answering pipeline picks, over the whole input."""
    best = (0, 0, float("-inf"))
    for width in range(min(max_tokens, len(start))):
        scores = start[: len(start) - width] + end[width:]
        i = int(scores.argmax())
        if scores[i] > best[2]:
            best = (i, i + width, float(scores[i]))
    return best
