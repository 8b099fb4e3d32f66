"""Shared fixtures: real demo images, a real simulated teacher on 127.0.0.1, specs pointing at them.

Ray itself is started per test module (see `ray_local` in the modules that need it), because a module
that builds a multi-node cluster needs Ray to itself.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from raydar.demo import GROUND_TRUTH_FILE, make_demo_cells
from raydar.spec import load_spec
from raydar.teacher.simulated import Fault, SimulatedTeacher
from raydar.spec import SimulatedTeacherSettings

REPO = Path(__file__).resolve().parents[1]
DEMO_SPEC = REPO / "datasets" / "demo_cells.yaml"

# Ray's own processes listen on loopback only in tests, as in the embedded Ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Nothing is downloaded: models are built from config (raydar.models.tiny).
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def demo_folder(tmp_path_factory) -> Path:
    """40 demo images with ground truth, made once per session."""
    return make_demo_cells(tmp_path_factory.mktemp("demo") / "cells", n=40, size=96, seed=7)


@pytest.fixture
def image_folder(tmp_path, demo_folder) -> Path:
    """A fresh copy of the demo images (with ground truth) that a test may add to or damage."""
    folder = tmp_path / "images"
    shutil.copytree(demo_folder, folder)
    return folder


def start_teacher(folder: Path, faults: list[Fault] | None = None, latency_s: float = 0.01,
                  **settings) -> SimulatedTeacher:
    return SimulatedTeacher(
        folder,
        SimulatedTeacherSettings(latency_s=latency_s, **settings),
        faults=faults,
    ).start()


@pytest.fixture
def teacher(image_folder):
    """A simulated teacher answering for `image_folder`, with no faults."""
    sim = start_teacher(image_folder)
    yield sim
    sim.stop()


def demo_spec(image_folder: Path, base_url: str, **overrides):
    """The demo spec pointed at `image_folder` and a running teacher, with fast retries."""
    values = {
        "images.uri": str(image_folder),
        "images.generate": None,
        "teacher.base_url": base_url,
        "teacher.backoff_s": 0.05,
        "teacher.timeout_s": 5,
        "teacher.concurrency": 8,
    }
    values.update(overrides)
    return load_spec(DEMO_SPEC, overrides=values)


def ground_truth_files(folder: Path) -> list[str]:
    return [line.split('"file": "')[1].split('"')[0] for line in (folder / GROUND_TRUTH_FILE).open()]
