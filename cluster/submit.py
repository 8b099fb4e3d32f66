"""Ray job plumbing for raydar's jobs: the runtime_env they are submitted with, the Job Submission
client (with the cluster's auth token), submitting, following a job's log, and listing the project's jobs.

The address is the cluster's dashboard (`--address`, else $RAY_ADDRESS, else http://127.0.0.1:8265,
where `ray dashboard ray_cluster.yaml` forwards it). The auth token comes from $RAY_AUTH_TOKEN,
$RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token. `raydar submit` and `raydar status` (jobs/submit.py) are the
commands over it.

A value passed in a job's environment is stored with the job's runtime_env on the cluster, readable by
whoever holds the cluster's token; on a shared cluster prefer `teacher.api_key_file` and a mounted secret.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
import time
from pathlib import Path

from cluster.connect import ClusterError, auth_token

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
AGENT_WAIT_S = 60  # how long a just-started cluster may take to accept jobs
PROJECT_TAG = "raydar"

# Never uploaded with the job (gitignore-style, relative to the project folder). Ray also honours the
# folder's .gitignore unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1; these hold either way.
WORKING_DIR_EXCLUDES = [
    ".git", ".venv", "/venv", "/env",  # version control, virtual environments
    "/data", ".raydar", "runs", "bench/out", "/.whl", "/.gl",  # data, run outputs, local wheel caches
    "*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt",  # model weights
    "__pycache__", "*.pyc", "*.egg-info", "/build", "/dist",  # build leftovers
    ".pytest_cache", ".mypy_cache", ".ruff_cache", ".ipynb_checkpoints",  # tool caches
]


def project_runtime_env(env_vars: dict[str, str] | None = None, root: Path = PROJECT_ROOT) -> dict:
    """The runtime_env of every raydar job: the project as working_dir, minus what a job never reads."""
    env = {"working_dir": str(root), "excludes": list(WORKING_DIR_EXCLUDES)}
    if env_vars:
        env["env_vars"] = dict(env_vars)
    return env


def job_client(address: str | None = None):
    """A Job Submission client for the cluster's dashboard, presenting the auth token if there is one."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except ConnectionError as e:
        raise ClusterError(
            f"cannot reach the Ray dashboard at {address}: {e}. Is the cluster up? For a `ray up` cluster, "
            "run `ray dashboard ray_cluster.yaml` first; --address takes the dashboard's http address."
        ) from None
    except AuthenticationError as e:
        raise ClusterError(
            f"the Ray cluster at {address} refused {'our' if token else 'to work without an'} auth token "
            f"({str(e).splitlines()[0]}). Put its token in ~/.ray/auth_token, $RAY_AUTH_TOKEN or the file named "
            "by $RAY_AUTH_TOKEN_PATH; on the head node, `ray get-auth-token` prints it."
        ) from None


def submit_job(entrypoint: str, *, submission_id: str, metadata: dict[str, str], env_vars: dict[str, str],
               address: str | None = None, root: Path = PROJECT_ROOT) -> tuple[str, str]:
    """Submit `entrypoint` as a Ray job with the project as its working_dir; (job id, dashboard address)."""
    client = job_client(address)
    request = {
        "entrypoint": entrypoint,
        "submission_id": submission_id,
        "runtime_env": project_runtime_env(env_vars, root),
        "metadata": {"project": PROJECT_TAG, **metadata},
    }
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return client.submit_job(**request), client.get_address()
        except RuntimeError as e:
            # A head that has just started answers before its job agent is up; that passes in seconds.
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise ClusterError(f"the cluster at {client.get_address()} did not take the job: {e}") from None
            time.sleep(2)


def follow(job_id: str, address: str | None = None, *, poll_s: float = 1.0, out=sys.stdout) -> str:
    """Print the job's log as it grows until the job ends; returns its final status."""
    client = job_client(address)
    shown = 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        out.write(logs[shown:])
        out.flush()
        shown = len(logs)
        if status.is_terminal():
            return str(status.value)
        time.sleep(poll_s)


def project_jobs(address: str | None = None) -> list:
    """This project's jobs on the cluster (those `raydar submit` tagged), oldest first."""
    jobs = [j for j in job_client(address).list_jobs() if (j.metadata or {}).get("project") == PROJECT_TAG]
    return sorted(jobs, key=lambda j: j.start_time or 0)


def format_jobs(jobs: list) -> str:
    """A table of id, status, stage, spec, start time and duration; never the runtime_env (it holds secrets)."""
    rows = [("JOB ID", "STATUS", "STAGE", "SPEC", "STARTED", "DURATION")]
    for j in jobs:
        meta = j.metadata or {}
        started = dt.datetime.fromtimestamp(j.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S") if j.start_time else "-"
        end = j.end_time or (time.time() * 1000 if j.start_time else None)
        duration = f"{(end - j.start_time) / 1000:.0f} s" if j.start_time and end else "-"
        rows.append((j.submission_id or j.job_id or "-", str(j.status.value), meta.get("stage", "-"),
                     meta.get("spec", "-"), started, duration))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def quiet_ray_packaging() -> None:
    """Ray logs every file it leaves out of the upload; we set those excludes, so say nothing."""
    for name in ("ray._private.runtime_env.packaging", "ray._private.runtime_env.working_dir",
                 "ray.dashboard.modules.dashboard_sdk"):
        logging.getLogger(name).setLevel(logging.ERROR)

