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
auth token comes from $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token. The Ray plumbing
is cluster/submit.py.

A value passed this way is stored with the job's runtime_env on the cluster, readable by whoever holds
the cluster's token; on a shared cluster prefer `teacher.api_key_file` and a mounted secret.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shlex
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from cluster.connect import ClusterError
from cluster.submit import (DEFAULT_ADDRESS, PROJECT_ROOT, follow, format_jobs, project_jobs, quiet_ray_packaging,
                            submit_job)

STAGES = ("label", "finetune", "index", "evaluate", "pipeline")


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

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    job_id, address = submit_job(
        entrypoint, submission_id=f"raydar-{stage}-{spec.name}-{stamp}-{uuid.uuid4().hex[:4]}", env_vars=env_vars,
        metadata={"stage": stage, "spec": spec.name, "spec_file": spec_rel.as_posix()}, address=address, root=root)
    return Submission(job_id, address, entrypoint, sorted(env_vars), sorted(set(names) - set(env_vars)))


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
    quiet_ray_packaging()
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
