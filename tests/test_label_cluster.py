"""Label and a two-worker fine-tune across a two-node Ray cluster simulated on this machine, with the
shared storage root; the label job's metrics read back from each node's Prometheus endpoint."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families
from ray._raylet import Config
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from cluster import ClusterError, StorageRoot, connect
from jobs.finetune import finetune
from jobs.label import label_images
from tests.conftest import demo_spec, ground_truth_files, start_teacher

# Each process sends its metrics to its node's agent this often (Ray's default is 10 s).
METRICS_INTERVAL_ENV = {"RAY_metrics_report_interval_ms": "1000"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_nodes():
    """Head (1 CPU) + worker (2 CPUs), both with token auth on, sharing the user's default token, each
    with its own metrics export port."""
    if not (Path.home() / ".ray" / "auth_token").is_file():
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "get-auth-token", "--generate"], check=True,
                       capture_output=True)
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", *METRICS_INTERVAL_ENV)}
    os.environ.update({"RAY_AUTH_MODE": "token", **METRICS_INTERVAL_ENV})
    Config.initialize("")  # this process read RAY_AUTH_MODE when Ray was imported: read it again
    ports = [_free_port(), _free_port()]
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": True, "metrics_export_port": ports[0]})
    worker = cluster.add_node(num_cpus=2, metrics_export_port=ports[1])
    cluster.wait_for_nodes()
    connect(cluster.address)  # through our own connect, which checks the token is there
    yield SimpleNamespace(cluster=cluster, worker=worker, metrics_ports=ports)
    ray.shutdown()
    cluster.shutdown()
    for key, value in saved.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture(scope="module")
def labelled(two_nodes, demo_folder, tmp_path_factory):
    """The demo images labelled once on the two nodes into one storage root, which the fine-tune reads."""
    folder = tmp_path_factory.mktemp("cluster") / "images"
    shutil.copytree(demo_folder, folder)
    teacher = start_teacher(folder)
    context = ray.data.DataContext.get_current()
    # Ray Data hands blocks to the first actor that is up: 40 images at 10 ms could all be labelled before
    # the worker node's actor has imported its code. Have the pool wait for both, as a longer job would.
    saved_wait, context.wait_for_min_actors_s = context.wait_for_min_actors_s, 120
    try:
        spec = demo_spec(folder, teacher.base_url, **{"teacher.actors": 2, "teacher.concurrency": 4})
        storage = StorageRoot(folder.parent / "shared-store")
        result = label_images(spec, storage, progress=False)
        # The driver's images/s gauge lives only while it is being set: read it right away.
        gauge = _wait_for(lambda: _sum(scrape(two_nodes.metrics_ports[:1]), "ray_raydar_label_images_per_second"),
                          lambda v: v > 0, timeout_s=10)
    finally:
        context.wait_for_min_actors_s = saved_wait
        teacher.stop()
    return SimpleNamespace(spec=spec, storage=storage, result=result, folder=folder, requests=len(teacher.log),
                           images_per_s=gauge)


def scrape(ports: list[int]) -> dict[int, list]:
    """Every sample each node's metrics agent exports, parsed by prometheus_client."""
    out = {}
    for port in ports:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        out[port] = [s for family in text_string_to_metric_families(text) for s in family.samples]
    return out


def _sum(samples_by_port: dict[int, list], name: str, **labels) -> float:
    return sum(s.value for samples in samples_by_port.values() for s in samples
               if s.name == name and s.labels.get("dataset") == "demo_cells"
               and all(s.labels.get(k) == v for k, v in labels.items()))


def _wait_for(read, done, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while True:
        value = read()
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


@pytest.mark.slow
def test_labelling_spreads_over_two_nodes(two_nodes, labelled):
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    assert labelled.result.ok_new == len(ground_truth_files(labelled.folder)) == labelled.requests
    actors = list_actors(filters=[("class_name", "=", "MapWorker(MapBatches(LabelImages))")], detail=True,
                         raise_on_missing_output=False)
    nodes = {a.node_id for a in actors}
    assert two_nodes.worker.node_id in nodes and len(nodes) == 2, f"labelling actors ran on {nodes}"


@pytest.mark.slow
def test_label_metrics_reach_prometheus_from_both_nodes(two_nodes, labelled):
    """Images by outcome, teacher requests and latency, cache hits and failures by reason: counted in the
    labelling actors on both nodes and exported by each node's agent; images/s set by the driver."""
    ports = two_nodes.metrics_ports
    n = labelled.result.images
    samples = _wait_for(lambda: scrape(ports),
                        lambda s: _sum(s, "ray_raydar_label_images_total", outcome="ok") >= n, timeout_s=30)
    assert _sum(samples, "ray_raydar_label_images_total", outcome="ok") == n
    assert _sum(samples, "ray_raydar_teacher_requests_total", model="raydar-simulated-teacher") == labelled.requests
    assert _sum(samples, "ray_raydar_teacher_latency_seconds_count") == n
    for port in ports:  # each node's agent exports what its own actors counted
        assert _sum({port: samples[port]}, "ray_raydar_label_images_total", outcome="ok") > 0, port
    assert labelled.images_per_s > 0, "the label job's images/s gauge never reached the head node's endpoint"
    assert _sum(samples, "ray_raydar_label_cache_hits_total") == 0

    one_actor = labelled.spec.model_copy(update={"teacher": labelled.spec.teacher.model_copy(update={"actors": 1})})
    again = label_images(one_actor, labelled.storage, progress=False)  # every label from the cache
    assert again.cached == n
    unreachable = labelled.spec.model_copy(update={"teacher": labelled.spec.teacher.model_copy(
        update={"actors": 1, "base_url": "http://127.0.0.1:9/v1", "retries": 1})})
    failed = label_images(unreachable, StorageRoot(labelled.folder.parent / "unreachable"), limit=3, progress=False)
    assert failed.failed == 3
    samples = _wait_for(lambda: scrape(ports), lambda s: _sum(s, "ray_raydar_label_failures_total") >= 3
                        and _sum(s, "ray_raydar_label_cache_hits_total") >= n, timeout_s=30)
    assert _sum(samples, "ray_raydar_label_cache_hits_total") == n
    assert _sum(samples, "ray_raydar_label_images_total", outcome="cached") == n
    assert _sum(samples, "ray_raydar_label_failures_total", reason="cannot reach the teacher") == 3
    assert _sum(samples, "ray_raydar_teacher_requests_total") == labelled.requests + 3 * 2  # 1 retry each


@pytest.mark.slow
def test_two_worker_finetune_runs_one_worker_per_node(two_nodes, labelled):
    """Ray Train places one worker on each node (STRICT_SPREAD); both read the labels and write the checkpoint
    through the one storage root."""
    spec = labelled.spec.model_copy(update={"student": labelled.spec.student.model_copy(
        update={"workers": 2, "batch_size": 4, "deepspeed_stage": 2})})
    result = finetune(spec, labelled.storage, run_name="two-nodes", max_steps=2, report_every=1,
                      placement_strategy="STRICT_SPREAD")

    assert result.metrics["step"] == 2
    assert Path(result.checkpoint, "adapter", "adapter_model.safetensors").is_file()
    assert Path(result.checkpoint).is_relative_to(labelled.storage.local_path("demo_cells", "train", "two-nodes"))
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True, raise_on_missing_output=False)
    nodes = {a.node_id for a in workers}
    assert len(workers) == 2 and nodes == {two_nodes.cluster.head_node.node_id, two_nodes.worker.node_id}, nodes


def test_connecting_without_the_token_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(ClusterError, match="ray get-auth-token"):
        connect("127.0.0.1:1")
