"""One rank's runtime: its stage of the model, its KV cache, and one step of the pipeline.

Pure torch: the cluster layer creates one of these per rank (in a Ray actor) after joining the
torch.distributed world, then hands every rank the same step plan.
"""

import dataclasses
import time

import torch

from shards.attention import allocate_kv_cache
from shards.batch import HostStaging, KeptSequences, SeqPlan, StepBatch
from shards.config import DTYPES, Qwen2Config
from shards.graphs import DecodeGraphs
from shards.loader import load_weights
from shards.model import Qwen2Stage
from shards.parallel import ParallelGroups, recv_from_prev_stage, send_to_next_stage
from shards.quant import QuantConfig
from shards.sampling import SamplingParams, TokenLogprobs, plain_greedy, sample

PROMPT_LOGPROB_ROWS = 256  # 256 rows of a 152K vocabulary: 156 MB of float32 logits


class StepClock:
    """Marks and the seconds between them: CUDA events on a GPU (the wall clock there would time only the
    enqueueing of kernels), the wall clock elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1e3


@torch.no_grad()
def fill_random(model: torch.nn.Module, std: float = 0.02) -> int:
    """Random weights in place (norm weights 1, the rest normal(0, std)); returns the bytes filled."""
    total = 0
    for name, param in model.named_parameters():
        if param.dtype.is_floating_point:
            param.fill_(1.0) if name.endswith("norm.weight") else param.normal_(0.0, std)
        total += param.numel() * param.element_size()
    return total


class ShardWorker:
    def __init__(
        self,
        model_dir,
        groups: ParallelGroups,
        num_kv_blocks: int | None = None,
        block_size: int = 16,
        device="cpu",
        dtype: str | None = None,
        attention_backend: str | None = None,  # None: triton on CUDA, torch elsewhere
        progress=None,
        quantization: str | None = None,
        quant_double: bool = False,
        config: Qwen2Config | None = None,
        cuda_graphs: bool = False,
        max_graph_batch: int = 256,
    ):
        """`model_dir` None: no checkpoint, random weights (normal, std 0.02; norms 1) made on the device for
        `config`, which is how the GPU benchmark builds a 7B-shaped model without one on disk."""
        config = config if model_dir is None else Qwen2Config.from_pretrained(model_dir)
        if dtype is not None:
            config = dataclasses.replace(config, dtype=DTYPES[dtype])
        config.check_layout(groups.tp_size, groups.pp_size)
        self.config, self.groups, self.block_size = config, groups, block_size
        self.device = torch.device(device)
        # A pre-quantized checkpoint's quantization_config, or load-time NF4 (`quantization`).
        self.quant = QuantConfig.resolve(config.raw, quantization, quant_double)
        with self.device:
            self.model = Qwen2Stage(config, groups, attention_backend, self.quant)
        if model_dir is None:
            self.bytes_loaded = fill_random(self.model)
        else:
            self.bytes_loaded = load_weights(self.model.checkpoint_targets(), model_dir, progress)
        self.kv_cache = None
        self.staging = HostStaging(self.device)
        # Decode steps of up to max_graph_batch sequences replay CUDA graphs (shards/graphs.py), captured when the
        # cache is allocated; use_cuda_graphs turns replay off and on (the GPU benchmark compares both).
        self.cuda_graphs, self.max_graph_batch, self.graphs = cuda_graphs, max_graph_batch, None
        self.use_cuda_graphs = cuda_graphs
        self.kept = KeptSequences()  # what earlier plans sent, for the continuing ones
        self.clock = StepClock(self.device)
        self.last_step_s = 0.0  # seconds its last step took on this rank (device time on a GPU)
        self.last_sample_s = 0.0  # of which the driver spent sampling
        if num_kv_blocks is not None:
            self.allocate_kv_cache(num_kv_blocks)

    @property
    def kv_block_bytes(self) -> int:
        """Bytes one KV block takes on this rank: its layers x (k, v) x block_size x its KV heads x head_dim."""
        attn = self.model.layers[0].self_attn
        element = torch.empty((), dtype=self.config.dtype).element_size()
        return len(self.model.layers) * 2 * self.block_size * attn.kv_heads * attn.head_dim * element

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """A cache of num_blocks blocks for the scheduler's sequences, plus one spare (block num_blocks) that
        padded rows write to; then the decode graphs over it, if asked."""
        attn = self.model.layers[0].self_attn
        self.kv_cache = self.graphs = None  # free the old cache first
        self.kv_cache = allocate_kv_cache(
            len(self.model.layers), num_blocks + 1, self.block_size, attn.kv_heads, attn.head_dim,
            self.config.dtype, self.device,
        )
        if self.cuda_graphs:
            table_width = min(num_blocks, -(-self.config.max_model_len // self.block_size))
            receives = None if self.groups.is_first_stage else self.config.hidden_size
            greedy = None if self.model.lm_head is None else self.model.greedy
            self.graphs = DecodeGraphs(self._stage, self.block_size, table_width, num_blocks, self.max_graph_batch,
                                       receives, self.config.dtype, self.device, capture=self.device.type == "cuda",
                                       greedy=greedy)

    def measure_step_memory(self, num_tokens: int, num_seqs: int) -> int:
        """Bytes the largest step the scheduler may build needs beyond the weights (activations, logits,
        sampling), measured on a GPU by running it: num_tokens prompt tokens over num_seqs sequences, each
        sampled, on a cache just large enough, freed after. The KV cache is sized to leave this free. 0 on CPU,
        whose cache has a fixed budget. Every rank must call it together (the step has collectives)."""
        if self.device.type != "cuda":
            return 0
        num_seqs = max(1, min(num_seqs, num_tokens))
        lengths = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
        blocks = [-(-n // self.block_size) for n in lengths]
        attn = self.model.layers[0].self_attn
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self.kv_cache = allocate_kv_cache(len(self.model.layers), sum(blocks), self.block_size, attn.kv_heads,
                                          attn.head_dim, self.config.dtype, self.device)
        cache_bytes = self.kv_cache.numel() * self.kv_cache.element_size()
        greedy = SamplingParams(temperature=0.0)
        first = [sum(blocks[:i]) for i in range(num_seqs)]
        plans = [SeqPlan(i, [0] * n, 0, list(range(first[i], first[i] + blocks[i])), sampling=greedy)
                 for i, n in enumerate(lengths)]
        self.execute(plans, forget=range(num_seqs))
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before - cache_bytes
        self.kv_cache, self.kept = None, KeptSequences()
        torch.cuda.empty_cache()
        return peak

    def _stage(self, batch: StepBatch, hidden: torch.Tensor | None) -> torch.Tensor:
        return self.model(batch, self.kv_cache, hidden)

    def _hidden(self, seqs: list[SeqPlan], forget=()) -> tuple[torch.Tensor | None, StepBatch, bool]:
        """This rank's stage over one step: the final hidden states on the last stage, None elsewhere, and
        whether the step ran over a decode graph's static batch (padded). `forget`: ids of sequences whose kept
        plans end before this step (see KeptSequences)."""
        plans = self.kept.resolve(seqs, forget)
        graphs = self.graphs if self.use_cuda_graphs else None
        padding = graphs and graphs.padding_for(plans)
        batch = StepBatch.build(plans, self.block_size, self.device, self.staging, padding,
                                tables=self.kept.tables(plans))
        hidden = None
        if not self.groups.is_first_stage:
            shape = (batch.num_tokens, self.config.hidden_size)
            hidden = recv_from_prev_stage(shape, self.config.dtype, self.device, self.groups)
        hidden = graphs.run(batch, hidden) if padding else self._stage(batch, hidden)
        if not self.groups.is_last_stage:
            send_to_next_stage(hidden, self.groups)
            return None, batch, bool(padding)
        return hidden, batch, bool(padding)

    @torch.inference_mode()
    def forward(self, seqs: list[SeqPlan]) -> tuple[torch.Tensor | None, StepBatch]:
        """Run this rank's stage on one step; the driver rank gets the sampled rows' logits, others None."""
        hidden, batch, _ = self._hidden(seqs)
        return (None if hidden is None else self.model.logits(hidden[batch.sample_rows])), batch

    @torch.inference_mode()
    def execute(self, seqs: list[SeqPlan], forget=()) -> list[dict] | None:
        """One step: forward, then sample on the driver rank. Returns, on the driver, one dict per sequence
        that samples, scores its prompt or pools: {"seq_id"}, with "token_id", "logprob", "top" if it samples,
        "prompt_logprobs" (a row per prompt_targets) if it scores, "pooled" (see _pool) if it pools; None
        elsewhere."""
        began = self.clock.mark()
        try:
            return self._execute(seqs, forget)
        finally:
            self.last_step_s = self.clock.seconds(began, self.clock.mark())

    def _execute(self, seqs, forget):
        hidden, batch, padded = self._hidden(seqs, forget)
        if hidden is None:
            return None
        params = [s.sampling for s in batch.sampling_seqs]
        # Plain greedy rows are reduced inside the LM head (no logits made); the plans decide it, so every TP rank
        # of the last stage agrees, and each takes part in the head's collective, whether it samples or not.
        greedy = bool(params) and plain_greedy(params, [s.token_mask for s in batch.sampling_seqs])
        if self.model.lm_head is None:
            head = None
        elif greedy and padded:  # the decode graph's static rows, reduced by its greedy head
            head = self.graphs.run_greedy(hidden, batch.sample_rows)
        else:
            head = (self.model.greedy if greedy else self.model.logits)(hidden[batch.sample_rows])
        prompt = self._prompt_logprobs(hidden, batch)
        if not self.groups.is_driver:
            return None
        out, sampling = {}, self.clock.mark()
        if batch.sampling_seqs:
            sampled = TokenLogprobs.argmax(*head) if greedy else sample(
                head, params, [s.prompt_token_ids for s in batch.sampling_seqs],
                [s.output_token_ids for s in batch.sampling_seqs], [s.token_mask for s in batch.sampling_seqs],
                [self.kept.seen(s.seq_id) for s in batch.sampling_seqs], overwrite=True)
            rows = sampled.to_lists([p.logprobs for p in params])
            out = {s.seq_id: dict(seq_id=s.seq_id, **row) for s, row in zip(batch.sampling_seqs, rows)}
        self.last_sample_s = self.clock.seconds(sampling, self.clock.mark())
        for seq_id, rows in prompt.items():
            out.setdefault(seq_id, {"seq_id": seq_id})["prompt_logprobs"] = rows
        for seq, first in batch.pooled:
            out.setdefault(seq.seq_id, {"seq_id": seq.seq_id})["pooled"] = self._pool(hidden, seq, first)
        return list(out.values())

    def _pool(self, hidden: torch.Tensor, seq: SeqPlan, first: int) -> torch.Tensor:
        """This chunk's part of a pooling sequence's output, float32 on the CPU (the router joins the chunks):
        rows [n, width] (n = 0 or 1 with pool_position), or for "hidden_sum" the sum of its rows [width]."""
        rows = hidden[first : first + len(seq.token_ids)]
        if seq.pool_position is not None:
            i = seq.pool_position - seq.start
            rows = rows[i : i + 1] if 0 <= i < len(rows) else rows[:0]
        if seq.pooling == "hidden_sum":
            return rows.float().sum(0).cpu()
        return (self.model.pool_head(rows) if seq.pooling == "head" else rows.float()).cpu()

    def _prompt_logprobs(self, hidden: torch.Tensor, batch: StepBatch) -> dict[int, list[dict]]:
        """seq_id -> the logprob (and top-n) of each of its prompt_targets, on the driver ({} elsewhere).
        Full-vocabulary logits are made PROMPT_LOGPROB_ROWS rows at a time, so a long chunk's stay small."""
        if not batch.prompt_scored:
            return {}
        targets = [s.prompt_targets for s, _ in batch.prompt_scored]
        rows = [first + i for (_, first), ts in zip(batch.prompt_scored, targets) for i in range(len(ts))]
        flat = [t for ts in targets for t in ts]
        num_top = [s.prompt_logprobs for (s, _), ts in zip(batch.prompt_scored, targets) for _ in ts]
        out = []
        for i in range(0, len(rows), PROMPT_LOGPROB_ROWS):
            part = slice(i, i + PROMPT_LOGPROB_ROWS)
            logits = self.model.logits(hidden[torch.tensor(rows[part], device=self.device)])  # a collective
            if logits is not None:
                lp = TokenLogprobs.of(logits, torch.tensor(flat[part], device=self.device), max(num_top[part]))
                out += lp.to_lists(num_top[part])
        if not self.groups.is_driver:
            return {}
        rows_of = iter(out)
        return {s.seq_id: [next(rows_of) for _ in ts] for (s, _), ts in zip(batch.prompt_scored, targets)}
