"""Connect to a Ray cluster, or start an embedded local Ray, with token authentication kept on.

Ray 2.60 turns token auth on for local clusters: `ray start --head` (and a local `ray.init()`) write
`~/.ray/auth_token`, and every client must present it. We never turn it off. A client connecting to
a cluster finds the token in `$RAY_AUTH_TOKEN`, the file named by `$RAY_AUTH_TOKEN_PATH`, or
`~/.ray/auth_token` (copy it from the head node with `ray get-auth-token`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path

import ray

# An embedded Ray listens on loopback only: nothing of it is reachable from the network.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

# Ray keeps as many idle worker processes as the node has CPUs and ends the rest after a second idle.
# On a small machine that ends the Ray Data workers between two epochs (the training workers hold the
# CPUs), and each pass then waits seconds for fresh processes to import torch and transformers. An
# embedded Ray keeps at least this many warm; set RAY_num_workers_soft_limit to choose (also for `ray start`).
WARM_WORKERS = 8


class ClusterError(RuntimeError):
    """Ray cannot be reached or authenticated against; the message says what to do."""


def connect(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    namespace: str = "raydar",
    log_to_driver: bool = True,
) -> str:
    """Join the cluster at `address` (or `$RAY_ADDRESS`), else start an embedded local Ray.

    Returns the address of the cluster joined. Safe to call twice: an initialised Ray is reused.
    """
    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    address = address or os.environ.get("RAY_ADDRESS")
    quiet = {"logging_level": logging.WARNING, "log_to_driver": log_to_driver, "namespace": namespace}
    if address:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        if os.environ["RAY_AUTH_MODE"] == "token" and not auth_token_available():
            raise ClusterError(
                f"the Ray cluster at {address} needs its auth token: put it in ~/.ray/auth_token, or set "
                "RAY_AUTH_TOKEN (the token) or RAY_AUTH_TOKEN_PATH (a file). On the head node, "
                "`ray get-auth-token` prints it."
            )
        try:
            ray.init(address=address, **quiet)
        except ConnectionError as e:
            raise ClusterError(f"cannot reach the Ray cluster at {address}: {e}") from None
        except Exception as e:  # ray raises its AuthenticationError and RuntimeError variants
            if "auth" in str(e).lower() or "token" in str(e).lower():
                raise ClusterError(f"the Ray cluster at {address} refused our auth token: {e}") from None
            raise
        return address
    _listen_on_loopback()
    # Ray's processes read it from the environment when they start.
    os.environ.setdefault("RAY_num_workers_soft_limit", str(max(WARM_WORKERS, num_cpus or os.cpu_count() or 1)))
    # With its own dashboard: Ray's helpers read the cluster's state through it (Ray Train's placement-group
    # cleaner asks whether the run's controller lives), and without one they would reach whatever dashboard
    # answers on the default port: another Ray's, which knows nothing of this run's controller.
    with _address_for_ray_processes():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, **quiet)
    global _embedded_address
    _embedded_address = ray.get_runtime_context().gcs_address
    return _embedded_address


_embedded_address: str | None = None  # the embedded Ray this process started, if any


def embedded() -> bool:
    """Whether Ray here is the embedded local one `connect` started: its nodes are all it will ever have
    (no autoscaler adds any)."""
    return ray.is_initialized() and _embedded_address == ray.get_runtime_context().gcs_address


@contextlib.contextmanager
def _address_for_ray_processes():
    """Start the embedded Ray on a chosen GCS port with `$RAY_ADDRESS` naming it, so that Ray's processes
    and every worker inherit the address. Ray's helpers in workers that look Ray up by `$RAY_ADDRESS`, else
    by the GCS processes on the machine (Ray Train's placement-group cleaner), would otherwise fail with
    "Found multiple active Ray instances" while another embedded Ray runs. This process's own environment
    is restored afterwards: a later `ray.init()` here must not join a Ray that has been shut down."""
    port = os.environ.get("RAY_GCS_SERVER_PORT") or str(_free_loopback_port())
    scoped = {"RAY_GCS_SERVER_PORT": port, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    saved = {name: os.environ.get(name) for name in scoped}
    os.environ.update(scoped)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listen_on_loopback() -> None:
    """Make the embedded Ray bind 127.0.0.1. Ray reads this switch at import, so the already-imported
    constant is set too; Ray's own processes read the environment variable when they start."""
    os.environ.update(LOOPBACK_ENV)
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def auth_token_available() -> bool:
    return auth_token() is not None


def auth_token() -> str | None:
    """The token a client presents, found where Ray looks: $RAY_AUTH_TOKEN, the file named by
    $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token. None if there is none."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    token = path.read_text().strip() if path.is_file() else ""
    return token or None


def dashboard_url() -> str | None:
    """The dashboard of the connected cluster, if it runs one."""
    try:
        url = ray.get_runtime_context().worker.node.address_info.get("webui_url")
    except Exception:
        return None
    return f"http://{url}" if url and "://" not in url else url
