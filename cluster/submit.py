"""Submit a raydar stage to a Ray cluster as a Ray job, and list the project's jobs.

    raydar submit label --spec datasets/demo_cells.yaml --address http://127.0.0.1:8265
    raydar submit finetune --spec datasets/mast_cells.yaml --storage s3://bucket/raydar -- --max-steps 200
    raydar status

`ray job submit` with what raydar's jobs need: the project folder as the job's working_dir, without
virtual environments, data, run outputs, caches and .git; secrets passed by environment variable NAME
(the spec's `teacher.api_key_env` and every `--secret-env NAME`: the value is copied from this shell
into the job's environment and never printed); metadata tags (project, stage, spec) that `raydar
status` lists the project's jobs by. The address is the cluster's dashboard (`--address`, else
$RAY_ADDRESS, else http://127.0.0.1:8265, where `ray dashboard ray_cluster.yaml` forwards it). The
auth token comes from $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.

A value passed this way is stored with the job's runtime_env on the cluster, readable by whoever holds
the cluster's token; on a shared cluster prefer `teacher.api_key_file` and a mounted secret.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import re
import shlex
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from cluster.connect import ClusterError, auth_token

PROJECT_ROOT = Path(__file__).resolve().parents[1]
STAGES = ("label", "finetune", "index", "evaluate", "pipeline")
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


@dataclass
class Submission:
    job_id: str
    address: str
    entrypoint: str
    secret_names: list[str] = field(default_factory=list)
    unset_secrets: list[str] = field(default_factory=list)


def submit_stage(
    stage: str,
    spec_path: str | os.PathLike,
    *,
    address: str | None = None,
    storage: str | None = None,
    overrides: list[str] = (),
    secret_env: list[str] = (),
    extra_args: list[str] = (),
    root: Path = PROJECT_ROOT,
) -> Submission:
    """Check the stage and the spec here, then submit `python -m jobs.<stage>` as a Ray job.

    `overrides` are `FIELD=VALUE` texts (as for --set), `extra_args` go to the stage unchanged.
    Raises ValueError (bad stage, spec or secret name) before anything reaches the cluster."""
    from raydar.spec import load_spec, parse_override

    root = Path(root).resolve()
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    if not (root / "jobs" / f"{stage}.py").is_file():
        raise ValueError(f"stage {stage!r}: jobs/{stage}.py does not exist in {root}; this stage is not built yet")
    spec_file = Path(spec_path).expanduser().resolve()
    try:
        spec_rel = spec_file.relative_to(root)
    except ValueError:
        raise ValueError(f"--spec {spec_path}: the spec must be inside the project folder {root}, which is what "
                         "the job receives; copy it under datasets/") from None
    parsed = {}
    for text in overrides:
        try:
            key, value = parse_override(text)
        except ValueError:
            raise ValueError(f"--set {text!r}: expected FIELD=VALUE") from None
        parsed[key] = value
    spec = load_spec(spec_file, overrides=parsed)  # SpecError (a ValueError) names the file and the field

    names = [n for n in [spec.teacher.api_key_env, *secret_env] if n]
    names = list(dict.fromkeys(names))
    for name in names:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"--secret-env {name!r}: not an environment variable name")
    missing = [n for n in secret_env if n not in os.environ]
    if missing:
        raise ValueError(f"--secret-env: {', '.join(missing)} not set in this shell; nothing to pass")
    env_vars = {n: os.environ[n] for n in names if n in os.environ}

    if storage and "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())  # the job runs in a copy of the project elsewhere
    command = ["python", "-m", f"jobs.{stage}", "--spec", spec_rel.as_posix(), "--quiet"]
    if storage:
        command += ["--storage", storage]
    for text in overrides:
        command += ["--set", text]
    command += list(extra_args)
    entrypoint = shlex.join(command)

    client = job_client(address)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    request = {
        "entrypoint": entrypoint,
        "submission_id": f"raydar-{stage}-{spec.name}-{stamp}-{uuid.uuid4().hex[:4]}",
        "runtime_env": project_runtime_env(env_vars, root),
        "metadata": {"project": PROJECT_TAG, "stage": stage, "spec": spec.name, "spec_file": spec_rel.as_posix()},
    }
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            job_id = client.submit_job(**request)
            break
        except RuntimeError as e:
            # A head that has just started answers before its job agent is up; that passes in seconds.
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise ClusterError(f"the cluster at {client.get_address()} did not take the job: {e}") from None
            time.sleep(2)
    return Submission(job_id, client.get_address(), entrypoint, sorted(env_vars),
                      sorted(set(names) - set(env_vars)))


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


# ---------------------------------------------------------------- the commands


def main_submit(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        prog="raydar submit", description=__doc__.split("\n")[0],
        epilog="Arguments after `--` go to the stage unchanged, e.g. `-- --max-steps 100`.")
    parser.add_argument("stage", help=f"One of {', '.join(STAGES)}: runs `python -m jobs.<stage>` on the cluster.")
    parser.add_argument("--spec", required=True, help="Dataset spec (YAML) inside the project folder.")
    parser.add_argument("--address", default=None,
                        help=f"The cluster's dashboard (default: $RAY_ADDRESS, else {DEFAULT_ADDRESS}).")
    parser.add_argument("--storage", default=None, help="Storage root on the cluster: a URI every node reaches "
                        "(s3://...), or a path (default: the job's $RAYDAR_STORAGE or ~/.raydar).")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="Override a spec field in the job, e.g. --set teacher.concurrency=8. Repeatable.")
    parser.add_argument("--secret-env", action="append", default=[], metavar="NAME",
                        help="Pass this environment variable to the job (by name; never printed). Repeatable. "
                        "The spec's teacher.api_key_env is passed without asking.")
    parser.add_argument("--no-wait", action="store_true", help="Return once submitted; do not follow the log.")
    args = parser.parse_args(argv)
    _quiet_ray_packaging()
    try:
        sub = submit_stage(args.stage, args.spec, address=args.address, storage=args.storage, overrides=args.set,
                           secret_env=args.secret_env, extra_args=extra)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"submitted {sub.job_id} to {sub.address}: {sub.entrypoint}")
    if sub.secret_names:
        print(f"secrets passed by name: {', '.join(sub.secret_names)}")
    for name in sub.unset_secrets:
        print(f"note: ${name} is not set here; the job uses the cluster's own ${name}, if any")
    if args.no_wait:
        print(f"follow it with: ray job logs --follow {sub.job_id}   list jobs with: raydar status")
        return 0
    status = follow(sub.job_id, args.address)
    print(f"job {sub.job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def main_status(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raydar status", description="List this project's jobs on the cluster.")
    parser.add_argument("--address", default=None,
                        help=f"The cluster's dashboard (default: $RAY_ADDRESS, else {DEFAULT_ADDRESS}).")
    parser.add_argument("--stage", default=None, help="Only jobs of this stage.")
    parser.add_argument("--spec", default=None, help="Only jobs of this dataset (the spec's name).")
    args = parser.parse_args(argv)
    try:
        jobs = project_jobs(args.address)
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    jobs = [j for j in jobs if (args.stage is None or j.metadata.get("stage") == args.stage)
            and (args.spec is None or j.metadata.get("spec") == args.spec)]
    print(format_jobs(jobs) if jobs else "no raydar jobs on this cluster")
    return 0


def _quiet_ray_packaging() -> None:
    """Ray logs every file it leaves out of the upload; we set those excludes, so say nothing."""
    for name in ("ray._private.runtime_env.packaging", "ray._private.runtime_env.working_dir",
                 "ray.dashboard.modules.dashboard_sdk"):
        logging.getLogger(name).setLevel(logging.ERROR)

