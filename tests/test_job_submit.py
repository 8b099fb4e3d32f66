"""The README's cluster path, as a user runs it: `ray start --head` (token auth on), then
`ray job submit --working-dir . -- python -m jobs.label ...`, then the job is listed as succeeded."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, ground_truth_files

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head_node():
    """A real `ray start --head` on loopback with the dashboard; token auth is Ray's default."""
    if not shutil.which(RAY):
        pytest.skip("the ray command is not installed beside this Python")
    # As after `source .venv/bin/activate`: the job's `python` is this environment's.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rd-")  # short: Ray's socket paths must fit in 107 bytes
    # --block keeps `ray start` in the foreground, so stopping it stops this head only (`ray stop` would
    # stop every Ray on the machine).
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--num-cpus", "2", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dashboard), "--temp-dir", temp_dir],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    url = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/api/version", timeout=2).status_code in (200, 401):
                break
        except httpx.HTTPError:
            pass
        if head.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"ray start --head failed:\n{head.stdout.read()[-3000:]}")
        time.sleep(0.5)
    yield env, url
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_label_job_and_the_dashboard_lists_it(tmp_path, head_node, image_folder, teacher):
    env, dashboard = head_node
    env = {**env, "RAY_AUTH_MODE": "token", "RAY_ADDRESS": dashboard}  # clients present ~/.ray/auth_token
    storage = tmp_path / "store"
    submit = subprocess.run(
        [RAY, "job", "submit", "--working-dir", ".", "--", "python", "-m", "jobs.label",
         "--spec", "datasets/demo_cells.yaml", "--quiet", "--storage", str(storage),
         "--set", f"images.uri={image_folder}", "--set", "images.generate=null",
         "--set", f"teacher.base_url={teacher.base_url}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "demo_cells: 40 images -> 40 labelled (40 new, 0 cached)" in submit.stdout
    assert len(teacher.log) == len(ground_truth_files(image_folder))
    assert pq.read_table(storage / "demo_cells" / "labels" / "labels.parquet").num_rows == 40

    listed = subprocess.run([RAY, "job", "list"], env=env, capture_output=True, text=True, timeout=60)
    assert "SUCCEEDED" in listed.stdout and "jobs.label" in listed.stdout

    env.pop("RAY_AUTH_MODE")
    env["RAY_AUTH_TOKEN"] = "not-the-token"  # a wrong token is refused: auth is really on
    refused = subprocess.run([RAY, "job", "list"], env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode != 0
