"""The engine: the router's one interface to the model, however many ranks and nodes it spans.

`start()` places one Ray actor per rank, joins them into a torch.distributed world, loads the checkpoint
and sizes the KV cache; `step(plan)` runs one step on every rank and returns what the driver rank (TP
rank 0 of the last stage) sampled. Every rank receives the plan straight from here: through the step channel
(a TCP connection per rank to a loop on it, cluster/channel.py), or a Ray Compiled Graph (shared-memory
channels that poll; the default on GPU). Several steps may be in flight at once: with pipeline parallelism
that is what keeps the stages busy.
"""

import asyncio
import logging
import os
import time
from dataclasses import dataclass

import ray
from ray.dag import InputNode, MultiOutputNode
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.actor import CONCURRENCY_GROUPS, ShardActor
from cluster.channel import StepChannel
from cluster.placement import all_of, place_stages, release
from shards.batch import SeqPlan
from shards.config import Qwen2Config
from shards.quant import QuantConfig

log = logging.getLogger(__name__)

# Environment the ranks need to find each other; passed on to every actor when set here.
PASSED_ENV = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "NCCL_DEBUG", "NCCL_IB_DISABLE", "NCCL_P2P_DISABLE")


# While a step runs longer than this, every rank is probed this often.
PROBE_INTERVAL_S = 1.0


class EngineError(RuntimeError):
    """A step could not complete: a rank died, timed out or raised. The engine must be restarted."""


@dataclass
class EngineConfig:
    model_dir: str
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    device: str = "cpu"  # "cpu" (gloo, one CPU bundle per rank) or "cuda" (nccl, one GPU per rank)
    dtype: str | None = None  # default: the checkpoint's
    attention_backend: str | None = None  # "triton" or "torch" (shards.attention); None: triton on CUDA, else torch
    quantization: str | None = None  # load-time quantization ("bitsandbytes-nf4"); GPTQ/AWQ come from config.json
    quant_double: bool = False  # NF4: quantize the absmax constants too (bitsandbytes' double quantization)
    block_size: int = 16
    kv_cache_bytes: int = 256 * 2**20  # per rank, on CPU
    gpu_memory_utilization: float = 0.9  # on GPU: the share of device memory weights + KV cache may use
    max_num_blocks: int | None = None  # cap on the KV blocks, whatever the budget allows
    ray_address: str | None = None  # join this cluster; None starts a local one (or reuses ray.init's)
    rendezvous_host: str | None = None  # torch.distributed rendezvous host; None: rank 0's node address
    cpus_per_rank: float = 1.0
    placement_timeout_s: float = 60.0
    step_timeout_s: float = 120.0
    # How long a liveness probe waits for every rank. During a step an unanswered probe only warns: a rank is
    # declared dead when its actor is, or when the step passes step_timeout_s.
    probe_timeout_s: float = 30.0
    # Ray compiled graph for the step instead of the step channel; None: on GPU only. On CPU its channel
    # polling keeps a core busy that the ranks need (offline on 2 cores: 125 -> 145 tokens/s without).
    compiled_graph: bool | None = None
    max_inflight_steps: int | None = None  # default: max(2, pipeline_parallel_size)
    # Decode steps replay CUDA graphs captured per padded batch size up to max_num_seqs; None: on GPU (needs it).
    cuda_graphs: bool | None = None
    # The scheduler's limits per step: the graphs' largest batch, and the step whose memory the GPU cache leaves.
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.model = Qwen2Config.from_pretrained(config.model_dir)
        self.model.check_layout(config.tensor_parallel_size, config.pipeline_parallel_size)
        if config.cuda_graphs and config.device != "cuda":
            raise ValueError("CUDA graphs need --device cuda (use --no-cuda-graphs)")
        # Checked here, before any rank starts: a bad --quantization is a clear error at once.
        self.quant = QuantConfig.resolve(self.model.raw, config.quantization, config.quant_double)
        self.actors, self.placement, self.dag, self.channel = [], [], None, None
        self.num_kv_blocks = 0
        self.healthy = False
        self.started_ray = False
        self.startup_s = None
        self.last_rank_seconds: list[float] = []  # time each rank spent inside the last completed step
        self.last_sample_seconds = 0.0  # of the driver's, the time it spent sampling
        self._submit = asyncio.Lock()

    # -- model facts the router needs --------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def max_model_len(self) -> int:
        return self.model.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    @property
    def quantization(self) -> str:
        """What the linear weights are held as: "none", or the format's name (gptq-int4, awq, bitsandbytes-nf4)."""
        return self.quant.name if self.quant else "none"

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.model.eos_token_ids

    @property
    def driver(self) -> int:
        """Index of the rank whose result is the step's: TP rank 0 of the last stage."""
        return (self.config.pipeline_parallel_size - 1) * self.config.tensor_parallel_size

    # -- life cycle -------------------------------------------------------------------------------
    def init_ray(self) -> None:
        """Join (or start) the Ray cluster. Call it before this process starts any gRPC server: starting a
        local cluster forks, and a fork beside gRPC's threads left the raylet hung about 1 start in 6."""
        if ray.is_initialized():
            return
        c = self.config
        # A local CPU cluster we start ourselves gets room for every rank: asking for TP x PP ranks on
        # one box is asking to share its cores.
        local_cpu = c.ray_address is None and c.device == "cpu"
        ranks = c.tensor_parallel_size * c.pipeline_parallel_size
        cpus = max(os.cpu_count() or 1, ranks * c.cpus_per_rank) if local_cpu else None
        # Ray runs workers at niceness 15; here the workers are the ranks, and the router beside them must
        # not take their cores (offline on 2 cores: 90 -> 125 tokens/s at niceness 0).
        system = {"worker_niceness": 0} if c.ray_address is None and not os.environ.get("RAY_ADDRESS") else None
        ray.init(address=c.ray_address, num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                 _system_config=system)
        self.started_ray = True

    async def start(self) -> None:
        """Place, start and load every rank, size the KV cache, compile the step graph."""
        c, began = self.config, time.perf_counter()
        tp, pp = c.tensor_parallel_size, c.pipeline_parallel_size
        self.init_ray()
        try:
            self.placement = await place_stages(tp, pp, c.device, c.cpus_per_rank, c.placement_timeout_s)
            env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
            remote = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(ShardActor)
            for rank in range(tp * pp):
                strategy = PlacementGroupSchedulingStrategy(
                    placement_group=self.placement[rank // tp], placement_group_bundle_index=rank % tp
                )
                self.actors.append(remote.options(
                    num_cpus=c.cpus_per_rank, num_gpus=1 if c.device == "cuda" else 0,
                    scheduling_strategy=strategy, runtime_env={"env_vars": env} if env else None,
                ).remote(rank, tp, pp, c.device, int(c.cpus_per_rank)))
            init_method = await self.actors[0].rendezvous_address.remote(c.rendezvous_host)
            worker_args = dict(model_dir=c.model_dir, dtype=c.dtype, block_size=c.block_size,
                               attention_backend=c.attention_backend, quantization=c.quantization,
                               quant_double=c.quant_double, max_graph_batch=c.max_num_seqs,
                               cuda_graphs=c.device == "cuda" if c.cuda_graphs is None else c.cuda_graphs)
            max_step = (c.max_num_batched_tokens, c.max_num_seqs)
            loaded = await asyncio.gather(*(a.load.remote(init_method, c.step_timeout_s, worker_args, max_step)
                                            for a in self.actors))
            self.num_kv_blocks = min(self._blocks_for(info) for info in loaded)
            if self.num_kv_blocks < 1:
                raise EngineError(f"no room for a KV block of {loaded[0]['kv_block_bytes']} bytes: raise the KV budget")
            await asyncio.gather(*(a.allocate_kv_cache.remote(self.num_kv_blocks) for a in self.actors))
            if c.compiled_graph if c.compiled_graph is not None else c.device == "cuda":
                with InputNode() as step:
                    graph = MultiOutputNode([a.execute.bind(step[0], step[1]) for a in self.actors])
                self.dag = graph.experimental_compile(
                    enable_asyncio=True, _max_inflight_executions=c.max_inflight_steps or max(2, pp)
                )
            else:
                await self._open_channel()
        except BaseException:
            await self.shutdown()
            raise
        self.healthy = True
        self.startup_s = time.perf_counter() - began
        log.info("engine up in %.1fs: tp=%d pp=%d, %d KV blocks of %d tokens", self.startup_s, tp, pp,
                 self.num_kv_blocks, c.block_size)

    async def _open_channel(self) -> None:
        """Every rank's step loop, connected. The router listens on loopback when the ranks meet there, else on
        this node's address (the ranks may be on other nodes)."""
        host = self.config.rendezvous_host
        host = host if host in ("127.0.0.1", "localhost", "::1") else ray.util.get_node_ip_address()
        self.channel = StepChannel(len(self.actors))
        address = await self.channel.open(host)
        for actor in self.actors:  # each runs until the channel closes
            actor.serve_steps.remote(address, self.channel.token)
        try:
            await self.channel.connected(self.config.placement_timeout_s)
        except asyncio.TimeoutError:
            raise EngineError(f"ranks did not connect to the step channel at {address[0]}:{address[1]} within "
                              f"{self.config.placement_timeout_s:g}s") from None

    def _blocks_for(self, info: dict) -> int:
        c = self.config
        if info["free_bytes"] is None:
            budget = c.kv_cache_bytes
        else:  # weights are loaded: what is left of the allowed share of the device, beside the largest step
            used = info["total_bytes"] - info["free_bytes"]
            budget = int(info["total_bytes"] * c.gpu_memory_utilization) - used - info["step_bytes"]
        blocks = budget // info["kv_block_bytes"]
        return min(blocks, c.max_num_blocks) if c.max_num_blocks else blocks

    async def shutdown(self, stop_ray: bool = True) -> None:
        """Stop every rank and free its placement; safe to call twice and after a failure.

        `stop_ray=False` keeps a Ray cluster this engine started, for a restart."""
        failed, self.healthy = not self.healthy, False
        if failed:  # a survivor may be stuck in a collective with the dead rank, and teardown would wait on it
            self._kill_actors()
        if self.channel is not None:
            await self.channel.close()
            self.channel = None
        if self.dag is not None:
            # After a failure a dead rank makes Ray log the teardown's tracebacks; the error was already raised.
            dag_log = logging.getLogger("ray.dag.compiled_dag_node")
            level = dag_log.level
            dag_log.setLevel(logging.CRITICAL if failed else level)
            try:
                self.dag.teardown()
            except Exception as e:  # the actors are killed below anyway
                log.warning("compiled graph teardown: %s", e)
            finally:
                dag_log.setLevel(level)
            self.dag = None
        self._kill_actors()
        release(self.placement)
        self.placement = []
        if self.started_ray and stop_ray:
            ray.shutdown()
            self.started_ray = False

    def _kill_actors(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    async def restart(self) -> None:
        """New actors, a new process group, weights reloaded; the Ray cluster stays up."""
        await self.shutdown(stop_ray=False)
        started_ray, self.started_ray = self.started_ray, False  # so that a failed start leaves Ray up
        try:
            await self.start()
        finally:
            self.started_ray = started_ray

    async def probe(self, during_step: bool = False) -> None:
        """EngineError if a rank died (a plain call each; ranks answer it on a thread beside the step). During
        a step a probe that times out alone is no verdict: the step's own timeout is."""
        try:
            await asyncio.wait_for(all_of(a.node_id.remote() for a in self.actors), self.config.probe_timeout_s)
        except asyncio.TimeoutError:
            if during_step:
                log.warning("a rank left a liveness probe unanswered for %gs during a step; waiting for the step "
                            "(step_timeout_s=%g)", self.config.probe_timeout_s, self.config.step_timeout_s)
                return
            self.healthy = False
            raise EngineError(f"rank probe unanswered after {self.config.probe_timeout_s:g}s") from None
        except Exception as e:
            self.healthy = False
            raise EngineError(f"rank probe failed: {type(e).__name__}: {e}") from e

    # -- the step ---------------------------------------------------------------------------------
    async def step(self, seqs: list[SeqPlan], forget: list[int] = ()) -> list[dict]:
        """Run one step on every rank; returns one dict per sampling sequence (see ShardWorker.execute).
        `forget`: ids of sequences whose plans the ranks keep and may drop before this step's.

        Calls may overlap: steps run on every rank in the order they were submitted."""
        if not self.healthy:
            raise EngineError("engine is not running (failed or shut down): restart it")
        try:
            async with self._submit:
                if self.dag is not None:
                    pending = await self.dag.execute_async(seqs, forget)
                else:
                    pending = self.channel.submit((seqs, forget))
            results = await asyncio.wait_for(self._gather_probing(pending), self.config.step_timeout_s)
        except asyncio.TimeoutError:
            self.healthy = False
            raise EngineError(f"step did not complete within step_timeout_s={self.config.step_timeout_s:g}") from None
        except Exception as e:
            self.healthy = False
            raise EngineError(f"step failed: {type(e).__name__}: {e}") from e
        self.last_rank_seconds = [seconds for _, seconds, _ in results]
        self.last_sample_seconds = results[self.driver][2]
        return results[self.driver][0]

    async def _gather_probing(self, pending) -> list:
        """The ranks' results; a step that runs long probes the ranks meanwhile, because the survivors of a
        dead rank wait in a collective until its timeout before the step itself would fail."""
        gather = asyncio.ensure_future(self._gather(pending))
        try:
            while not (await asyncio.wait([gather], timeout=PROBE_INTERVAL_S))[0]:
                await self.probe(during_step=True)
            return gather.result()
        finally:
            gather.cancel()  # on a failed probe or the step timeout; a no-op once done

    @staticmethod
    async def _gather(pending) -> list:
        results = [await p for p in pending]
        for r in results:  # a graph torn down under a dead rank hands its channel error back as a value
            if isinstance(r, Exception):
                raise r
        return results
