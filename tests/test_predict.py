"""StudentDetector on real finetune checkpoints of tiny real models: the adapter is applied, answers are read in
the family's coordinates with per-object scores, bad images fail alone, heads answer for multilabel specs and point heads without generating."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from raydar.predict import StudentDetector, object_scores
from raydar.kinds import kind_of
from tests.conftest import REPO, STUDENT_ANSWER, ground_truth_files


@pytest.fixture(scope="module")
def detector(student_checkpoint) -> StudentDetector:
    return StudentDetector.from_checkpoint(str(student_checkpoint), max_new_tokens=40)


@pytest.fixture(scope="module")
def images(demo_folder) -> list[bytes]:
    return [(demo_folder / name).read_bytes() for name in ground_truth_files(demo_folder)[:4]]


@pytest.mark.slow
def test_the_checkpoint_answers_in_the_schema_with_scores(detector, images):
    results = detector.detect(images)
    kind = kind_of(detector.spec.task)
    assert len(results) == len(images)
    for result in results:
        assert result["error"] is None, result
        assert result["raw"] == STUDENT_ANSWER  # greedy, with the prompt it was trained on
        assert kind.validate(result["label"]) == result["label"]
        # 500 and 250 per mille read back as fractions of the image, not as pixels or as fractions of 1000
        [point] = result["label"]["points"]
        assert (point["label"], point["x"], point["y"]) == ("explicit", 0.5, 0.25)
        assert 0 < point["score"] <= 1  # from the answer tokens' probabilities, not the schema's default 1.0
        assert point["score"] != 1.0
    assert detector.model == "raydar-tiny-qwen2-vl"
    weights = Path(detector.checkpoint) / "adapter" / "adapter_model.safetensors"
    assert detector.adapter_version == "sha256:" + hashlib.sha256(weights.read_bytes()).hexdigest()[:12]


@pytest.mark.slow
def test_the_adapter_is_applied(detector, images):
    base = StudentDetector.from_base(detector.spec, max_new_tokens=40)
    assert base.adapter_version is None
    [tuned], [untuned] = detector.detect(images[:1]), base.detect(images[:1])
    assert untuned["raw"] != tuned["raw"]
    from PIL import Image
    import io

    inputs = detector.processor(text=[detector.builder.prompt_text], images=[Image.open(io.BytesIO(images[0]))
                                                                            .convert("RGB")], return_tensors="pt")
    with torch.no_grad():
        assert not torch.allclose(detector.network(**inputs).logits, base.network(**inputs).logits, atol=1e-4)


@pytest.mark.slow
def test_a_bad_image_fails_alone(detector, images):
    results = detector.detect([b"GIF89a-but-not-really", images[0]])
    assert results[0]["label"] is None and results[0]["error"].startswith("image 0: corrupt")
    assert results[1]["label"]["points"][0]["label"] == "explicit"


@pytest.mark.slow
def test_a_run_folder_means_its_best_checkpoint(student_checkpoint, detector, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(student_checkpoint, run / "checkpoint_000001")
    worse = run / "checkpoint_000002"
    shutil.copytree(student_checkpoint, worse)
    (worse / "metrics.json").write_text(json.dumps({"val_loss": 9.0}))
    (worse / "adapter" / "adapter_model.safetensors").write_bytes(b"not these weights")  # never loaded
    chosen = StudentDetector.from_checkpoint(str(run), max_new_tokens=2)
    assert chosen.adapter_version == detector.adapter_version


def test_missing_or_empty_checkpoints_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        StudentDetector.from_checkpoint(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="holds no finetune checkpoint"):
        StudentDetector.from_checkpoint(str(tmp_path))


@pytest.mark.slow
def test_object_scores_come_from_each_objects_own_tokens(detector):
    tokenizer = detector.processor.tokenizer
    text = '{"points": [{"label": "explicit", "x": 1, "y": 2}, {"label": "implicit", "x": 3, "y": 4}]}'
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    second = text.index('{"label": "implicit"')
    # tokens of the second object are sure (log-prob 0), every other token has probability 0.5
    ends = [len(tokenizer.decode(ids[: k + 1])) for k in range(len(ids))]
    logprobs = [0.0 if second < end <= len(text) - 2 else -0.6931 for end in ends]
    first, sure = object_scores(tokenizer, ids, logprobs, 2)
    assert first == pytest.approx(0.5, abs=0.01) and sure > 0.9
    assert object_scores(tokenizer, ids, logprobs, 3) is None  # cannot line up: the caller falls back


def test_a_multilabel_checkpoint_answers_with_its_head(tmp_path, images):
    from raydar.checkpoint import save_checkpoint
    from raydar.models import resolve_base_model
    from raydar.spec import load_spec
    from raydar.student import build_student

    spec = load_spec(REPO / "datasets" / "chest_xray.yaml", overrides={"student.base_model": "raydar-tiny-qwen2-vl"})
    torch.manual_seed(0)
    student, _, processor = build_student(spec, str(resolve_base_model(spec.student.base_model, "qwen2_vl")))
    state = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
    save_checkpoint(tmp_path, student, processor, spec, state, {"val_loss": 1.0})
    detector = StudentDetector.from_checkpoint(str(tmp_path), max_new_tokens=8)
    assert detector.head is not None
    results = detector.detect(images[:2])
    kind = kind_of(spec.task)
    for result in results:
        assert result["error"] is None  # the head answers even when the generated text is no JSON
        assert set(result["label"]["probabilities"]) == set(spec.task.ontology)
        assert kind.validate(result["label"]) == result["label"]
    first, second = (r["label"]["probabilities"] for r in results)
    assert first != second  # the head sees the image



def test_a_point_head_checkpoint_answers_from_one_forward_pass(tmp_path, images):
    from raydar.checkpoint import save_checkpoint
    from raydar.heads import PointsHead
    from raydar.models import resolve_base_model
    from raydar.spec import load_spec
    from raydar.student import build_student

    spec = load_spec(REPO / "datasets" / "demo_cells.yaml", overrides={"student.point_head": True})
    torch.manual_seed(0)
    student, _, processor = build_student(spec, str(resolve_base_model(spec.student.base_model, "qwen2_vl")))
    state = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
    save_checkpoint(tmp_path, student, processor, spec, state, {"val_loss": 1.0})
    detector = StudentDetector.from_checkpoint(str(tmp_path))
    assert isinstance(detector.head, PointsHead)
    calls = []
    detector.network.generate = lambda *a, **k: calls.append(1)  # the head needs no generated text
    results = detector.detect(images[:2] + [b"not an image"])
    assert not calls and results[2]["label"] is None and "image 2" in results[2]["error"]
    kind = kind_of(spec.task)
    for result in results[:2]:
        assert result["error"] is None and result["raw"] == ""
        assert kind.validate(result["label"]) == result["label"]
        points = result["label"]["points"]
        assert all(0.0 <= p["score"] <= 1.0 and p["score"] >= detector.head.threshold for p in points)
        assert result["score"] == max((p["score"] for p in points), default=0.0)
    # The same image answers the same alone and in a batch: the head reads each image's own tokens.
    assert detector.detect(images[1:2])[0]["label"] == results[1]["label"]
