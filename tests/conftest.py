"""Shared fixtures: real demo images, a real simulated teacher on 127.0.0.1, specs pointing at them.

Ray itself is started per test module (see `ray_local` in the modules that need it), because a module
that builds a multi-node cluster needs Ray to itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from raydar.demo import make_demo_cells
from raydar.sources import GROUND_TRUTH_FILE
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


# A user's bucket, as tests see it: moto's S3 server on 127.0.0.1 with throwaway credentials.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "raydar-test", "AWS_SECRET_ACCESS_KEY": "raydar-test",
                  "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@contextlib.contextmanager
def s3_server():
    """moto's S3 on a free loopback port, its credentials in the environment meanwhile (start Ray inside,
    so that Ray's workers inherit them as they would on a cluster). Yields the pyarrow URI options that
    reach it: `s3://bucket/path?<options>`."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    saved = {k: os.environ.get(k) for k in S3_CREDENTIALS}
    os.environ.update(S3_CREDENTIALS)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"endpoint_override=127.0.0.1:{port}&scheme=http"
    finally:
        server.stop()
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


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


# The demo's student is pretrained at set-up (minutes); tests train the tiny random Qwen2-VL built in seconds.
TEST_STUDENT = {
    "student.base_model": "raydar-tiny-qwen2-vl",
    "student.family": "qwen2_vl",
    "student.prompt": None,
    "student.augment": False,
    "student.lora.modules_to_save": [],
    # A worker stuck in an exchange fails its attempt after 2 minutes (Ray Train restarts it from the last
    # checkpoint), within the test's 10, not after torch's 30.
    "student.collective_timeout_s": 120,
}


def demo_spec(image_folder: Path, base_url: str, **overrides):
    """The demo spec pointed at `image_folder` and a running teacher, with fast retries."""
    values = {
        "images.uri": str(image_folder),
        "images.generate": None,
        "teacher.base_url": base_url,
        "teacher.backoff_s": 0.05,
        "teacher.timeout_s": 5,
        "teacher.concurrency": 8,
        **TEST_STUDENT,
    }
    values.update(overrides)
    return load_spec(DEMO_SPEC, overrides=values)


def ground_truth_files(folder: Path) -> list[str]:
    return [line.split('"file": "')[1].split('"')[0] for line in (folder / GROUND_TRUTH_FILE).open()]


# The answer the test student is taught to give for every image (Qwen2-VL writes 0-1000 integers).
STUDENT_LABEL = {"points": [{"label": "explicit", "x": 0.5, "y": 0.25}]}
STUDENT_ANSWER = '{"points": [{"label": "explicit", "x": 500, "y": 250}]}'


@pytest.fixture(scope="session")
def student_checkpoint(tmp_path_factory, demo_folder) -> Path:
    """A real finetune checkpoint of the tiny Qwen2-VL student taught to answer STUDENT_ANSWER (see
    `teach_one_answer`)."""
    from PIL import Image

    images = [Image.open(demo_folder / name).convert("RGB") for name in ground_truth_files(demo_folder)[:2]]
    return teach_one_answer(images, tmp_path_factory.mktemp("student") / "run" / "checkpoint_000001")


def teach_one_answer(images: list, folder: Path, steps: int = 60) -> Path:
    """Train the tiny Qwen2-VL student's LoRA adapter in-process until greedy decoding gives STUDENT_ANSWER
    for `images`, and save it as the finetune job does (raydar.checkpoint.save_checkpoint). A random tiny model learns
    nothing useful about cells on a CPU, but it can learn one answer in the task's format, which is enough
    to tell the adapter is applied, the answer is read in the right coordinates, and to load-test serving."""
    import torch

    from raydar.checkpoint import save_checkpoint
    from raydar.models import resolve_base_model
    from raydar.sft import collate
    from raydar.student import build_student

    spec = load_spec(DEMO_SPEC, overrides={
        "student.lora.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "student.lora.dropout": 0.0,
        "student.point_head": False,  # answers in text: the path this student tests
        # At most 16 image tokens (the tests' 96-px images have 9): at the demo's 64 the two-layer model does not
        # learn the answer in 60 steps from bench/serve_load.py's 224-px images.
        "student.max_pixels": 112 * 112,
    })
    torch.manual_seed(0)
    student, builder, processor = build_student(spec, str(resolve_base_model(spec.student.base_model, "qwen2_vl")))
    batch = collate([builder.example(image, STUDENT_LABEL) for image in images], processor.tokenizer.pad_token_id)
    optimiser = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    student.train()
    for _ in range(steps):
        student(batch, [STUDENT_LABEL] * len(images)).backward()
        optimiser.step()
        optimiser.zero_grad()
    student.eval()
    inputs = processor(text=[builder.prompt_text], images=images[:1], return_tensors="pt")
    with torch.no_grad():
        out = student.model.generate(**inputs, max_new_tokens=40, do_sample=False)
    answer = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer == STUDENT_ANSWER, f"the test student did not learn its answer: {answer!r}"
    state = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
    save_checkpoint(folder, student, processor, spec, state, {"step": steps, "epoch": 0, "val_loss": 0.5})
    return folder


# Ray, gRPC, Chroma and torch leave native threads behind; in a fresh-clone run one of them crashed the
# interpreter's own teardown (SIGSEGV) after every test had run and the summary was printed, turning
# pytest's exit status into a crash. By the end of the session the outcome is known: leave with it.
@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    session.config._raydar_exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    status = getattr(config, "_raydar_exit_status", None)
    if status is not None and os.environ.get("RAYDAR_TEST_HARD_EXIT", "1") == "1":
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


# Task heads' synthetic set (tests/test_heads.py, the head job test in tests/test_finetune.py).
COLOURS = {"red": (230, 30, 30), "green": (30, 200, 30), "blue": (40, 60, 230)}


def squares(rng: np.random.Generator) -> tuple[Image.Image, dict, dict]:
    """A 64x64 image with a random subset of coloured squares; its multilabel and regression labels."""
    img = Image.new("RGB", (64, 64), (20, 20, 20))
    draw = ImageDraw.Draw(img)
    present = {c: bool(rng.random() < 0.5) for c in COLOURS}
    area = 0
    for colour, shown in present.items():
        if shown:
            side = int(rng.integers(14, 30))
            x, y = (int(v) for v in rng.integers(0, 64 - side, 2))
            draw.rectangle([x, y, x + side, y + side], fill=COLOURS[colour])
            area += side * side
    multilabel = {"probabilities": {c: float(v) for c, v in present.items()}}
    regression = {"values": {"squares": float(sum(present.values())), "cover": min(100.0, 100 * area / 64**2)}}
    return img, multilabel, regression
