"""The README's cluster path, as a user runs it: `ray start --head` (token auth on), then
`ray job submit --working-dir . -- python -m jobs.label ...`, then the job is listed as succeeded; and
the same through `raydar submit` / `raydar status`, with a secret passed by name only. One head node
for the module: it takes ~10 s to start."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

from cluster.submit import WORKING_DIR_EXCLUDES
from jobs.submit import submit_stage
from tests.conftest import REPO, ground_truth_files

RAY = str(Path(sys.executable).with_name("ray"))
RAYDAR = str(Path(sys.executable).with_name("raydar"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head_node():
    """A real `ray start --head` on loopback with the dashboard; token auth is Ray's default."""
    if not shutil.which(RAY):
        pytest.skip("the ray command is not installed beside this Python")
    # As after `source .venv/bin/activate`: the job's `python` is this environment's.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard, agent, client = _free_port(), _free_port(), _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rd-")  # short: Ray's socket paths must fit in 107 bytes
    # --block keeps `ray start` in the foreground, so stopping it stops this head only (`ray stop` would
    # stop every Ray on the machine). Ports Ray would otherwise take at fixed numbers are free ones, so
    # that another Ray on this machine cannot take the job agent's.
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--num-cpus", "2", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dashboard), "--dashboard-agent-listen-port", str(agent),
         "--ray-client-server-port", str(client), "--temp-dir", temp_dir],
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
        head.wait(timeout=5)
    except subprocess.TimeoutExpired:  # its GCS can take half a minute to exit; nothing of it is kept
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
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


@pytest.mark.slow
def test_raydar_submit_passes_secrets_by_name_and_status_lists_the_job(tmp_path, head_node, image_folder, teacher):
    env, dashboard = head_node
    key, extra = f"sk-test-{uuid.uuid4().hex}", f"extra-{uuid.uuid4().hex}"
    # An `openai` teacher reads its key from the variable the spec names: the job succeeds only if the value
    # reached the job's environment. The simulated teacher answers whatever the key.
    env = {**env, "RAY_ADDRESS": dashboard, "RAYDAR_TEST_KEY": key, "RAYDAR_TEST_EXTRA": extra}
    storage = tmp_path / "store"
    submit = subprocess.run(
        [RAYDAR, "submit", "label", "--spec", "datasets/demo_cells.yaml", "--storage", str(storage),
         "--set", f"images.uri={image_folder}", "--set", "images.generate=null",
         "--set", f"teacher.base_url={teacher.base_url}", "--set", "teacher.kind=openai",
         "--set", "teacher.api_key_env=RAYDAR_TEST_KEY", "--secret-env", "RAYDAR_TEST_EXTRA"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    printed = submit.stdout + submit.stderr
    assert submit.returncode == 0, printed[-3000:]
    assert "secrets passed by name: RAYDAR_TEST_EXTRA, RAYDAR_TEST_KEY" in submit.stdout
    assert "demo_cells: 40 images -> 40 labelled (40 new, 0 cached)" in submit.stdout  # the job's log, followed
    assert pq.read_table(storage / "demo_cells" / "labels" / "labels.parquet").num_rows == 40
    job_id = submit.stdout.split("submitted ", 1)[1].split()[0]

    status = subprocess.run([RAYDAR, "status"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    row = next(line for line in status.stdout.splitlines() if line.startswith(job_id))
    assert row.split()[1:4] == ["SUCCEEDED", "label", "demo_cells"], status.stdout
    logs = subprocess.run([RAY, "job", "logs", job_id], env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True,
                          text=True, timeout=60)
    assert "40 labelled" in logs.stdout
    for secret in (key, extra):
        assert secret not in printed and secret not in status.stdout and secret not in logs.stdout + logs.stderr

    refused = subprocess.run([RAYDAR, "status"], cwd=REPO, env={**env, "RAY_AUTH_TOKEN": "not-the-token"},
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "refused our auth token" in refused.stderr, refused.stderr


def test_submitting_a_stage_that_is_not_built_fails_before_submission(tmp_path):
    (tmp_path / "jobs").mkdir()
    (tmp_path / "datasets").mkdir()
    spec = tmp_path / "datasets" / "demo_cells.yaml"
    spec.write_text((REPO / "datasets" / "demo_cells.yaml").read_text())
    with pytest.raises(ValueError, match=r"jobs/evaluate.py does not exist .* not built yet"):
        submit_stage("evaluate", spec, root=tmp_path, address="http://127.0.0.1:1")
    unknown = subprocess.run([RAYDAR, "submit", "deploy", "--spec", "datasets/demo_cells.yaml",
                              "--address", "http://127.0.0.1:1"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and "unknown stage 'deploy'" in unknown.stderr
    outside = subprocess.run([RAYDAR, "submit", "label", "--spec", str(spec), "--address", "http://127.0.0.1:1"],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
    assert outside.returncode == 2 and "must be inside the project folder" in outside.stderr


def test_the_working_dir_leaves_out_environments_data_and_outputs(tmp_path):
    """Ray's own packager, with our excludes only (not .gitignore): what a job would receive."""
    from ray._private.runtime_env.packaging import create_package

    root = tmp_path / "project"
    for name in ("jobs/label.py", "datasets/demo_cells.yaml", ".venv/lib/big.py", ".git/HEAD", "data/img.png",
                 ".raydar/demo_cells/labels.parquet", "runs/a/checkpoint.pt", "raydar/__pycache__/x.pyc",
                 "model.safetensors", "raydar.egg-info/PKG-INFO"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x")
    create_package(str(root), tmp_path / "package.zip", include_gitignore=False, excludes=WORKING_DIR_EXCLUDES)
    names = {n for n in zipfile.ZipFile(tmp_path / "package.zip").namelist() if not n.endswith("/")}
    assert names == {"jobs/label.py", "datasets/demo_cells.yaml"}, names
