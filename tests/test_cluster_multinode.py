"""Two simulated nodes (ray.cluster_utils.Cluster): each stage's TP ranks share a node, stages do not."""

import asyncio

import pytest
import ray
from ray.cluster_utils import Cluster

from cluster.engine import Engine
from tests.engine_scenarios import NEW_TOKENS, PROMPTS, engine_config, greedy, tables


@pytest.fixture(scope="module")
def two_nodes():
    """A head with no CPUs (so it holds no rank) and two nodes of 2 CPUs: one TP=2 stage fits a node."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_stages_on_separate_nodes_tp_ranks_together(two_nodes, checkpoints, expected_greedy):
    async def scenario():
        engine = Engine(engine_config(checkpoints["gqa-untied"], 2, 2))
        await engine.start()
        try:
            nodes = await asyncio.gather(*(a.node_id.remote() for a in engine.actors))
            rows = await greedy(engine.step, PROMPTS, NEW_TOKENS, tables(len(PROMPTS), 8))
            return nodes, rows
        finally:
            await engine.shutdown()

    nodes, rows = asyncio.run(scenario())
    assert nodes[0] == nodes[1] and nodes[2] == nodes[3]  # ranks 0,1 = stage 0; ranks 2,3 = stage 1
    assert nodes[0] != nodes[2]
    assert [[r["token_id"] for r in seq] for seq in rows] == [tokens for tokens, _ in expected_greedy]
