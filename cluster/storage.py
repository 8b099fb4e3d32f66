"""Storage roots: a local folder or any pyarrow filesystem URI (s3://, gs://, hdfs://, file://).

Every stage reads and writes through `StorageRoot`, so the same job runs against a laptop folder
or a bucket shared by a cluster. Writes are atomic: a file appears whole or not at all.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

DEFAULT_ROOT = "~/.raydar"


def default_root() -> str:
    """`$RAYDAR_STORAGE`, else ~/.raydar (absolute, so jobs in a working-dir copy write to the same place)."""
    return os.environ.get("RAYDAR_STORAGE") or DEFAULT_ROOT


def _resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI, as raydar.sources.resolve (cluster/ imports nothing of ours)."""
    uri = str(uri)
    if "://" not in uri:
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pafs.ArrowInvalid if hasattr(pafs, "ArrowInvalid") else ValueError, OSError) as e:
        raise ValueError(f"{uri}: not a storage URI pyarrow can open: {e}") from None


class StorageRoot:
    """A folder (local or remote) where raydar keeps a dataset's outputs."""

    def __init__(self, uri: str | os.PathLike | None = None) -> None:
        self.uri = str(uri or default_root())
        self.fs, self.path = _resolve(self.uri)
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)
        self._scheme = "" if self.is_local else self.uri.split("://", 1)[0] + "://"
        # Filesystem options in the URI (s3://b/p?endpoint_override=...&scheme=http) carry over to child
        # roots. Credentials belong in the environment (AWS_ACCESS_KEY_ID, ...), not in the URI.
        self._query = self.uri.split("?", 1)[1] if "?" in self.uri and not self.is_local else ""

    def __repr__(self) -> str:
        return f"StorageRoot({self.uri!r})"

    def join(self, *parts: str) -> str:
        """Path inside the root, for this root's filesystem."""
        return "/".join([self.path.rstrip("/"), *[p.strip("/") for p in parts if p]])

    def uri_of(self, *parts: str) -> str:
        """Full URI of a path inside the root, for people and for other processes."""
        return self._scheme + self.join(*parts)

    def uri_for(self, path: str) -> str:
        """A URI another process can open for `path` (a path on this root's filesystem, as Ray Train
        reports checkpoints): the scheme, and the root's filesystem options such as an endpoint."""
        return self._scheme + path + (f"?{self._query}" if self._query else "")

    def child(self, *parts: str) -> StorageRoot:
        return StorageRoot(self.uri_of(*parts) + (f"?{self._query}" if self._query else ""))

    def local_path(self, *parts: str) -> Path:
        """A local path inside the root; only for roots on this machine's disk."""
        if not self.is_local:
            raise ValueError(f"{self.uri} is not a local folder")
        return Path(self.join(*parts))

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.join(*parts)).type != pafs.FileType.NotFound

    def makedirs(self, *parts: str) -> None:
        self.fs.create_dir(self.join(*parts), recursive=True)

    def list(self, *parts: str, suffix: str = "") -> list[str]:
        """Names of the files directly inside a folder of the root, sorted; [] if it does not exist."""
        folder = self.join(*parts)
        if self.fs.get_file_info(folder).type == pafs.FileType.NotFound:
            return []
        entries = self.fs.get_file_info(pafs.FileSelector(folder))
        return sorted(
            e.base_name for e in entries if e.type == pafs.FileType.File and e.base_name.endswith(suffix)
        )

    def read_bytes(self, *parts: str) -> bytes:
        with self.fs.open_input_stream(self.join(*parts)) as f:
            return f.read()

    def write_bytes(self, data: bytes, *parts: str) -> str:
        """Write atomically: to a temporary name, then move into place. Returns the path."""
        final = self.join(*parts)
        parent = final.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, final)
        return final

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_bytes(*parts))

    def write_json(self, value: Any, *parts: str) -> str:
        return self.write_bytes(json.dumps(value, indent=2, sort_keys=True).encode() + b"\n", *parts)
