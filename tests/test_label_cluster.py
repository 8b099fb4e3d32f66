"""Labelling across a two-node Ray cluster simulated on this machine, with the shared storage root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray
from ray._raylet import Config
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from cluster import ClusterError, StorageRoot, connect
from jobs.label import label_images
from tests.conftest import demo_spec, ground_truth_files


@pytest.fixture(scope="module")
def two_nodes():
    """Head (1 CPU) + worker (2 CPUs), both with token auth on, sharing the user's default token."""
    if not (Path.home() / ".ray" / "auth_token").is_file():
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "get-auth-token", "--generate"], check=True,
                       capture_output=True)
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "token"
    Config.initialize("")  # this process read RAY_AUTH_MODE when Ray was imported: read it again
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True})
    worker = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    connect(cluster.address)  # through our own connect, which checks the token is there
    yield cluster, worker
    ray.shutdown()
    cluster.shutdown()
    if saved is None:
        os.environ.pop("RAY_AUTH_MODE", None)


def test_labelling_spreads_over_two_nodes(tmp_path, two_nodes, image_folder, teacher):
    cluster, worker = two_nodes
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    spec = demo_spec(image_folder, teacher.base_url, **{"teacher.actors": 2, "teacher.concurrency": 4})
    storage = StorageRoot(tmp_path / "shared-store")
    result = label_images(spec, storage, progress=False)

    assert result.ok_new == len(ground_truth_files(image_folder)) == len(teacher.log)
    actors = list_actors(filters=[("class_name", "=", "MapWorker(MapBatches(LabelImages))")], detail=True,
                         raise_on_missing_output=False)
    nodes = {a.node_id for a in actors}
    assert worker.node_id in nodes and len(nodes) == 2, f"labelling actors ran on {nodes}"


def test_connecting_without_the_token_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(ClusterError, match="ray get-auth-token"):
        connect("127.0.0.1:1")
