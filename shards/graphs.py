"""Decode steps replayed from CUDA graphs, one graph per padded batch size (nano-vllm's ladder).

A decode-only step of n sequences is padded to the smallest size on the ladder that holds it (`Padding`: the
extra rows write and read a spare KV block only), its inputs are copied into that size's static batch, and the
graph captured over the static batch replays this stage's whole forward: every kernel launch of every layer,
collectives included, in one call. On the last stage a second graph per size reduces the static output's rows
to greedy tokens in the LM head (VocabParallelEmbedding.greedy: some 60 small kernels launched one by one
otherwise), replayed after the first when every row of the step is plain greedy. Prefill and mixed steps, and
steps larger than the ladder, run eagerly.

Without `capture` (CPU) the same static batches run the forward eagerly: what the tests use to check that
padding and the static copies leave the real rows' results exactly as an unpadded step gives them.
"""

import torch

from shards.batch import Padding, SeqPlan, StepBatch


def batch_ladder(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_batch (and max_batch itself)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch] + list(range(16, max_batch, 16))
    return sizes + [max_batch]


class DecodeGraphs:
    def __init__(self, forward, block_size: int, table_width: int, pad_block: int, max_batch: int,
                 hidden_size: int | None, dtype: torch.dtype, device, capture: bool, greedy=None):
        """`forward(batch, hidden_in) -> hidden_out` is this stage's forward over its KV cache; `hidden_size` is
        set on stages that receive hidden states (hidden_in is then a static [size, hidden_size] buffer).
        `greedy(hidden_out)`, on the last stage: the LM head's greedy reduction of every row."""
        self.block_size, self.forward = block_size, forward
        self.sizes = batch_ladder(max_batch)
        self.graphs: dict[int, tuple] = {}
        pool = None
        for size in reversed(self.sizes):  # largest first: the smaller ones fit in its memory pool
            padding = Padding(size, table_width, pad_block)
            static = StepBatch.build([], block_size, device, padding=padding, table_width=table_width)
            hidden_in = None if hidden_size is None else torch.zeros(size, hidden_size, dtype=dtype, device=device)
            graph = out = head = None
            if capture:
                graph, out = _capture(lambda: forward(static, hidden_in), pool)
                pool = graph.pool()
                if greedy is not None:
                    head = _capture(lambda: greedy(out), pool)
            self.graphs[size] = (padding, static, hidden_in, graph, out, head)
        self.greedy = greedy

    def padding_for(self, seqs: list[SeqPlan]) -> Padding | None:
        """The padding a step's plans replay under, or None when they run eagerly."""
        if not seqs or len(seqs) > self.sizes[-1]:
            return None
        padding = self.graphs[next(s for s in self.sizes if s >= len(seqs))][0]
        return padding if padding.fits(seqs, self.block_size) else None

    def run(self, batch: StepBatch, hidden_in: torch.Tensor | None) -> torch.Tensor:
        """This stage's output for a batch built with `padding_for`'s padding: the graph's static output, valid
        until the next replay."""
        _, static, static_in, graph, out, _ = self.graphs[batch.num_tokens]
        static.copy_inputs_(batch)
        if static_in is not None:
            static_in.copy_(hidden_in)
        if graph is None:
            return self.forward(static, static_in)
        graph.replay()
        return out

    def run_greedy(self, hidden_out: torch.Tensor, rows: torch.Tensor):
        """The greedy reduction (ids, logits, log-sum-exp) of these rows of the output `run` just gave, on the
        driver rank (None elsewhere); every TP rank of the last stage calls it, as VocabParallelEmbedding.greedy."""
        head = self.graphs[hidden_out.shape[0]][5]
        if head is None:  # not captured (CPU): the same reduction over every row, eagerly
            reduced = self.greedy(hidden_out)
        else:
            head[0].replay()
            reduced = head[1]
        return None if reduced is None else tuple(t[rows] for t in reduced)


def _capture(fn, pool):
    """(graph, its static output) of fn(), after one eager run (kernels compiled, workspaces allocated outside)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out
