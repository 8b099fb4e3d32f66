"""Two raydar runs on one machine, each on its own embedded Ray: neither run's Ray processes, nor Ray's
own helpers in them, find the other's Ray (Ray Train's placement-group cleaner looks Ray up by
`$RAY_ADDRESS`, else by the GCS processes on the machine)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# One run: start the embedded Ray, wait until the other run's Ray is up too, train once on Ray Train, and
# keep this Ray up until the other run has trained as well.
RUN = """
import os, sys, time
from pathlib import Path

import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from cluster import connect
from cluster.connect import dashboard_url

me, other, storage = sys.argv[1], sys.argv[2], sys.argv[3]


def wait_for(path):
    deadline = time.monotonic() + 240
    while not Path(path).exists():
        assert time.monotonic() < deadline, f"no {path}"
        time.sleep(0.2)


def train_once(config):
    from ray import train

    time.sleep(3)  # long enough for Ray Train's placement-group cleaner to ask after the controller
    train.report({"step": 1})


address = connect(num_cpus=1)
print("driver RAY_ADDRESS:", os.environ.get("RAY_ADDRESS"), flush=True)
print("worker RAY_ADDRESS:", ray.get(ray.remote(lambda: os.environ.get("RAY_ADDRESS")).remote()), flush=True)
print("address:", address, flush=True)
print("dashboard:", dashboard_url(), flush=True)
Path(me + ".up").touch()
wait_for(other + ".up")
TorchTrainer(train_once, scaling_config=ScalingConfig(num_workers=1),
             run_config=RunConfig(storage_path=storage, name="tiny")).fit()
print("trained", flush=True)
Path(me + ".trained").touch()
wait_for(other + ".trained")
ray.shutdown()
"""


def test_two_embedded_rays_at_once_each_find_their_own(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    runs = {}
    deadline = time.monotonic() + 300
    for me, other in (("a", "b"), ("b", "a")):
        log = (tmp_path / f"{me}.log").open("w")
        process = subprocess.Popen(
            [sys.executable, "-c", RUN, str(tmp_path / me), str(tmp_path / other), str(tmp_path / f"store-{me}")],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        runs[me] = (process, log)
        # One Ray starts at a time: two starting at once on 2 busy cores can outwait the raylet's patience.
        while not (tmp_path / f"{me}.up").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    outputs = {}
    for me, (process, log) in runs.items():
        try:
            process.wait(timeout=400)
        finally:
            process.kill()
            log.close()
        outputs[me] = (process.returncode, Path(log.name).read_text())

    addresses, dashboards = set(), set()
    for me, (returncode, output) in outputs.items():
        assert returncode == 0, f"run {me} failed:\n{output[-6000:]}"
        assert "trained" in output.splitlines(), output[-6000:]
        assert "Found multiple active Ray instances" not in output, f"run {me}:\n{output[-6000:]}"
        # the cleaner reads its own Ray's state through that Ray's own dashboard
        assert "Failed to query Ray Train Controller actor state" not in output, f"run {me}:\n{output[-6000:]}"
        dashboards.add(_printed(output, "dashboard"))
        address = _printed(output, "address")
        assert _printed(output, "worker RAY_ADDRESS") == address  # Ray's processes name their own Ray
        assert _printed(output, "driver RAY_ADDRESS") == "None"  # the driver's environment is as it was
        addresses.add(address)
    assert len(addresses) == 2 and len(dashboards) == 2


def _printed(output: str, name: str) -> str:
    return next(line.split(": ", 1)[1] for line in output.splitlines() if line.startswith(name + ": "))
