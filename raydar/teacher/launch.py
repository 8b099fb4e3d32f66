"""Starting the simulated teacher a spec asks for, in a process of its own, for the length of a run.

    with SimulatedTeacherProcess(spec, source) as base_url:   # None: the client's default endpoint
        ...
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from raydar.sources import GROUND_TRUTH_FILE
from raydar.spec import DatasetSpec, SpecError


class SimulatedTeacherProcess:
    """`raydar teacher serve` on 127.0.0.1 for `teacher.kind: simulated` without a `base_url`, answering from
    the ground truth beside the images of `source`, with the spec's `teacher.simulated` settings. For any
    other teacher nothing is started and the URL is the spec's own."""

    def __init__(self, spec: DatasetSpec, source: str) -> None:
        self.spec, self.source = spec, source
        self.process: subprocess.Popen | None = None

    def start(self) -> str | None:
        """The teacher's base URL, once the simulator (if one is needed) listens."""
        t = self.spec.teacher
        if t.kind != "simulated" or t.base_url:
            return t.base_url
        if "://" in self.source or not (Path(self.source) / GROUND_TRUTH_FILE).is_file():
            raise SpecError(
                f"{self.spec.source_file}: teacher.kind is simulated but {self.source} has no {GROUND_TRUTH_FILE}; "
                "the simulator answers only for images with ground truth (or set teacher.base_url)"
            )
        command = [sys.executable, "-m", "raydar.teacher.simulated", "--ground-truth", self.source, "--port", "0",
                   "--coordinates", t.coordinates, "--settings", t.simulated.model_dump_json()]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, start_new_session=True)
        line = self.process.stdout.readline()
        if "listening on " not in line:
            self.process.kill()
            raise RuntimeError(f"the simulated teacher did not start (exit {self.process.wait()})")
        return line.rsplit("listening on ", 1)[1].strip()

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)  # its own session: its worker processes too
            self.process.wait()
        self.process = None

    def __enter__(self) -> str | None:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
