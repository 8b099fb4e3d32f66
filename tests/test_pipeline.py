"""The main job end to end on a small demo: label -> index -> finetune -> evaluate -> deploy, on a real
local Ray with the simulated teacher; then a re-run that skips what is unchanged, and a changed
student that re-runs exactly finetune and evaluate."""

from __future__ import annotations

import json
import socket

import httpx
import pytest
import ray
from ray import serve

from cluster import StorageRoot, connect
from jobs.pipeline import run_pipeline
from raydar.spec import load_spec
from tests.conftest import DEMO_SPEC, TEST_STUDENT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def ray_local():
    connect()
    yield
    serve.shutdown()
    ray.shutdown()


def _overrides(folder, **more):
    return {"images.uri": str(folder), "images.generate": None, "teacher.simulated.latency_s": 0.01, **TEST_STUDENT,
            "student.epochs": 1, "student.batch_size": 8, **more}


def test_the_pipeline_runs_end_to_end_and_skips_what_is_unchanged(ray_local, image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYDAR_SERVE_TOKEN", "pipeline-test-token")
    storage = StorageRoot(str(tmp_path / "store"))
    overrides = _overrides(image_folder)
    spec = load_spec(DEMO_SPEC, overrides=overrides)

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    first = run_pipeline(spec, storage, progress=False, port=port, overrides=overrides)
    try:
        assert first.ran == ["label", "index", "finetune", "evaluate", "deploy"] and first.ok
        evaluation = first.outputs["evaluate"]
        assert set(evaluation["headline"]) == {"base", "finetuned", "rag", "ensemble", "teacher"}
        assert evaluation["reference"] == "ground truth" and evaluation["metric"] == "overall.f1"
        # The teacher answers from the ground truth with a little noise: it must score high.
        assert evaluation["headline"]["teacher"] > 0.8
        # The report's numbers are the ones the run printed.
        report_dir = storage.child(spec.name, "report").path
        metrics = json.loads((tmp_path / "store" / spec.name / "report" / "metrics.json").read_text())
        assert evaluation["report"].startswith(report_dir)
        for member, value in evaluation["headline"].items():
            assert metrics["headline"][member] == pytest.approx(value, abs=1e-4)
        # The run's best checkpoint is the dataset's `train/latest`, the name serving configs use.
        from raydar.checkpoint import local_checkpoint

        latest = storage.child(spec.name).read_bytes("train", "latest").decode().strip()
        assert latest == first.outputs["finetune"]["checkpoint"]
        assert local_checkpoint(storage.child(spec.name).uri_of("train", "latest")) == local_checkpoint(latest)
        # Every member's per-image answers are kept beside the report, one row per image and member.
        import pyarrow.parquet as pq

        kept = pq.read_table(tmp_path / "store" / spec.name / "report" / "predictions.parquet")
        assert set(kept["member"].to_pylist()) == set(evaluation["headline"])
        assert kept.num_rows == evaluation["images"] * len(evaluation["headline"])
        # The endpoint is up and answers with the token, and refuses without it.
        image = next(image_folder.glob("*.png")).read_bytes()
        answer = httpx.post(f"{first.endpoint}/v1/detect", files={"image": ("x.png", image)},
                            headers={"Authorization": "Bearer pipeline-test-token"}, timeout=120)
        assert answer.status_code == 200, answer.text
        assert "points" in json.dumps(answer.json())
        assert httpx.post(f"{first.endpoint}/v1/detect", files={"image": ("x.png", image)}, timeout=60).status_code == 401
        assert "curl -H" in first.summary() and first.endpoint in first.summary()
    finally:
        first.close()
        serve.delete(spec.name)

    stages = ("label", "index", "finetune", "evaluate")
    again = run_pipeline(spec, storage, stages=stages, progress=False)
    assert again.ran == [] and again.skipped == list(stages)
    assert again.outputs["evaluate"]["headline"] == evaluation["headline"]

    changed = load_spec(DEMO_SPEC, overrides=_overrides(image_folder, **{"student.learning_rate": 2e-3}))
    third = run_pipeline(changed, storage, stages=stages, progress=False)
    assert third.skipped == ["label", "index"] and third.ran == ["finetune", "evaluate"]
    assert third.outputs["finetune"]["checkpoint"] != first.outputs["finetune"]["checkpoint"]
