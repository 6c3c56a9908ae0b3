"""One rank's runtime: its stage of the model, its KV cache, and one step of the pipeline.

Pure torch: the cluster layer creates one of these per rank (in a Ray actor) after joining the
torch.distributed world, then hands every rank the same step plan.
"""

import dataclasses

import torch

from shards.attention import allocate_kv_cache
from shards.batch import SeqPlan, StepBatch
from shards.config import DTYPES, Qwen2Config
from shards.loader import load_weights
from shards.model import Qwen2Stage
from shards.parallel import ParallelGroups, recv_from_prev_stage, send_to_next_stage
from shards.sampling import sample


class ShardWorker:
    def __init__(
        self,
        model_dir,
        groups: ParallelGroups,
        num_kv_blocks: int | None = None,
        block_size: int = 16,
        device="cpu",
        dtype: str | None = None,
        attention_backend: str = "torch",
        progress=None,
    ):
        config = Qwen2Config.from_pretrained(model_dir)
        if dtype is not None:
            config = dataclasses.replace(config, dtype=DTYPES[dtype])
        config.check_layout(groups.tp_size, groups.pp_size)
        self.config, self.groups, self.block_size = config, groups, block_size
        self.device = torch.device(device)
        with self.device:
            self.model = Qwen2Stage(config, groups, attention_backend)
        self.bytes_loaded = load_weights(self.model.checkpoint_targets(), model_dir, progress)
        self.kv_cache = None
        if num_kv_blocks is not None:
            self.allocate_kv_cache(num_kv_blocks)

    @property
    def kv_block_bytes(self) -> int:
        """Bytes one KV block takes on this rank: its layers x (k, v) x block_size x its KV heads x head_dim."""
        attn = self.model.layers[0].self_attn
        element = torch.empty((), dtype=self.config.dtype).element_size()
        return len(self.model.layers) * 2 * self.block_size * attn.kv_heads * attn.head_dim * element

    def allocate_kv_cache(self, num_blocks: int) -> None:
        attn = self.model.layers[0].self_attn
        self.kv_cache = None  # free the old cache first
        self.kv_cache = allocate_kv_cache(
            len(self.model.layers), num_blocks, self.block_size, attn.kv_heads, attn.head_dim,
            self.config.dtype, self.device,
        )

    @torch.inference_mode()
    def forward(self, seqs: list[SeqPlan]) -> tuple[torch.Tensor | None, StepBatch]:
        """Run this rank's stage on one step; the driver rank gets the sampled rows' logits, others None."""
        batch = StepBatch.build(seqs, self.block_size, self.device)
        hidden = None
        if not self.groups.is_first_stage:
            shape = (batch.num_tokens, self.config.hidden_size)
            hidden = recv_from_prev_stage(shape, self.config.dtype, self.device, self.groups)
        hidden = self.model(batch, self.kv_cache, hidden)
        if not self.groups.is_last_stage:
            send_to_next_stage(hidden, self.groups)
            return None, batch
        return self.model.logits(hidden, batch), batch

    def execute(self, seqs: list[SeqPlan]) -> list[dict] | None:
        """One step: forward, then sample on the driver rank. Returns one dict per sampling sequence
        ({"seq_id", "token_id", "logprob", "top"}) on the driver, None elsewhere."""
        logits, batch = self.forward(seqs)
        if logits is None or not batch.sampling_seqs:
            return None if logits is None else []
        params = [s.sampling for s in batch.sampling_seqs]
        out = sample(
            logits,
            params,
            [s.prompt_token_ids for s in batch.sampling_seqs],
            [s.output_token_ids for s in batch.sampling_seqs],
        )
        return [dict(seq_id=s.seq_id, **row) for s, row in zip(batch.sampling_seqs, out.to_lists(params))]
