"""Attribution over a Ray cluster of two simulated nodes (``ray.cluster_utils.Cluster``), in its own
module: it starts and stops its own cluster, which must not meet test_ray's local instance."""

from __future__ import annotations

import pytest
import tiny_models
from tiny_models import tiny_task

from circuitfinder.engine.graph import EdgeGraph

ray = pytest.importorskip("ray")


def test_attribution_on_a_cluster_of_two_simulated_nodes():
    """Two Ray nodes on this machine (``ray.cluster_utils.Cluster``), one worker on each."""
    from ray import cloudpickle
    from ray.cluster_utils import Cluster

    from circuitfinder.methods.attribution import eap_ig
    from circuitfinder.methods.pool import ray_scores

    cloudpickle.register_pickle_by_value(tiny_models)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        adapter, task = tiny_models.load_tiny_gpt2(), tiny_task()
        want = eap_ig(adapter, EdgeGraph(adapter.shape), task, batch_size=2, steps=2)
        got = ray_scores(tiny_models.load_tiny_gpt2, eap_ig, task, 2, 2, steps=2)
        assert (got - want).abs().max().item() <= 1e-6 * max(1.0, want.abs().max().item())
    finally:
        ray.shutdown()
        cluster.shutdown()
