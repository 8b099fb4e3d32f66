"""How raydar talks to Ray: connect or start the embedded local Ray, token auth, storage roots."""

from cluster.connect import ClusterError, connect
from cluster.storage import StorageRoot

__all__ = ["ClusterError", "StorageRoot", "connect"]
