"""A two-node Ray cluster on this machine, in its own process, for the multi-node tests.

``python -m tests._two_nodes SPEC_JSON`` starts Ray's multi-node test cluster (:class:`ray.cluster_utils.Cluster`):
a head node and a worker node, each with the logical CPUs, custom resources and environment (its own
``PREFOPT_LOCAL_DIR``, ...) that the spec gives it, then prints one JSON line
``{"address": GCS address, "nodes": {name: node id}}`` and serves these lines on stdin:

* ``actors PATH``: writes ``[{"class": ..., "node": node name, "state": ...}, ...]`` (every actor the
  cluster has run, dead ones included) to ``PATH`` and answers ``ok``;
* end of input: removes both nodes (their processes end) and exits.

The cluster lives in a process of its own so that it shares no Ray state with the test process (which may
be connected to the session's local Ray), and ends when the test process closes the pipe or dies.

SPEC_JSON: ``{"temp_dir": DIR, "nodes": [{"name": "a", "num_cpus": 2, "resources": {"a": 1}, "env": {...}},
...]}``; the first node is the head; every node keeps its sessions and logs under
``DIR`` (keep it short: Ray's unix sockets live there).
"""

from __future__ import annotations

import json
import sys


def _actors(cluster, names: dict[str, str]) -> list[dict]:
    """Every actor in the cluster's GCS table: class name, the name of its node, state."""
    by_id = {node_id: name for name, node_id in names.items()}
    return [
        {
            "class": info["ActorClassName"],
            "node": by_id.get(info["Address"]["NodeID"], info["Address"]["NodeID"]),
            "state": info["State"],
        }
        for info in cluster.global_state.actor_table(None).values()
    ]


def main(spec: dict) -> None:
    import ray._private.utils
    from ray.cluster_utils import Cluster

    # Cluster publishes its address as this machine's default (what ray.init() without an address joins);
    # a test cluster must not capture other Ray drivers on the machine, the test process's own included
    ray._private.utils.write_ray_address = lambda *args, **kwargs: None
    cluster = Cluster()
    nodes = {}
    for node in spec["nodes"]:
        started = cluster.add_node(
            num_cpus=node["num_cpus"],
            resources=node.get("resources", {}),
            env_vars=node.get("env", {}),
            temp_dir=spec["temp_dir"],
            include_dashboard=False,
            dashboard_agent_listen_port=None,  # a free port: another Ray on this machine may hold the default
        )
        nodes[node["name"]] = started
    names = {name: node.node_id for name, node in nodes.items()}
    print(json.dumps({"address": cluster.address, "nodes": names}), flush=True)
    try:
        for line in sys.stdin:
            command, _, arg = line.strip().partition(" ")
            if command == "actors":
                with open(arg, "w") as f:
                    json.dump(_actors(cluster, names), f)
                print("ok", flush=True)
    finally:
        for node in reversed(list(nodes.values())):
            cluster.remove_node(node)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
