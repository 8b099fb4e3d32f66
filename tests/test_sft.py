"""Fine-tuning examples on the tiny real models: the student is taught exactly the answer, in its own
coordinates for the image it sees, with the loss on the answer tokens only."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from raydar.kinds import PointsTask
from raydar.kinds import kind_of
from raydar.models.families import FAMILIES
from raydar.models.tiny import TINY_FAMILIES, build_tiny_model
from raydar.sft import IGNORE, SFTExamples, collate, pack_example, unpack_example
from raydar.sources import read_ground_truth

TASK = PointsTask(kind="points", instruction="Find every mast cell.",
                  ontology={"explicit": {"description": "dark"}, "implicit": {"description": "faint"}})


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def student(request, tmp_path_factory):
    path = build_tiny_model(request.param, tmp_path_factory.mktemp("models") / request.param)
    processor = AutoProcessor.from_pretrained(path)
    family = FAMILIES[request.param]
    builder = SFTExamples(processor, family, kind_of(TASK, family.coordinates), "Find cells.")
    return family, processor, builder, path


def test_only_the_answer_is_learned_and_it_decodes_to_the_label_in_the_familys_coordinates(student, demo_folder):
    family, processor, builder, path = student
    record = read_ground_truth(demo_folder)[0]
    image = Image.open(demo_folder / record["file"])
    example = builder.example(image, record["label"])

    ids, labels = example["input_ids"][0], example["labels"][0]
    learned = labels != IGNORE
    prompt_len = builder.example(image)["input_ids"].shape[1]
    assert not learned[:prompt_len].any() and learned[prompt_len:].all()
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert (ids[:prompt_len] == image_token).any() and not (ids[prompt_len:] == image_token).any()

    answer_text = processor.tokenizer.decode(labels[learned])
    answer = json.loads(answer_text[: answer_text.rindex("}") + 1])
    width, height = builder.seen_size(example, image)
    back = kind_of(TASK, family.coordinates).parse(json.dumps(answer), width, height)
    truth = sorted(record["label"]["points"], key=lambda p: (p["y"], p["x"]))  # answers list in reading order
    assert [p["label"] for p in back["points"]] == [p["label"] for p in truth]
    tolerance = {"per_mille": 5e-4, "pixels": 0.5 / min(width, height), "normalized": 5e-3}[family.coordinates]
    assert all(abs(a["x"] - b["x"]) <= tolerance + 1e-9 and abs(a["y"] - b["y"]) <= tolerance + 1e-9
               for a, b in zip(back["points"], truth))
    if family.coordinates == "pixels" and truth:  # Qwen2.5-VL: pixels of the resized image, not the original
        assert answer["points"][0]["x"] == round(truth[0]["x"] * width) and width != image.width


def test_a_padded_batch_trains_on_answers_only(student, demo_folder):
    family, processor, builder, path = student
    records = read_ground_truth(demo_folder)[:3]
    examples = [builder.example(Image.open(demo_folder / r["file"]), r["label"]) for r in records]
    batch = collate(examples, processor.tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()
    assert (batch["labels"] != IGNORE).sum() == sum((e["labels"] != IGNORE).sum() for e in examples)

    model = AutoModelForImageTextToText.from_pretrained(path)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    # The model's loss is the cross-entropy over the answer tokens, not over the whole sequence.
    logits, vocab = out.logits[:, :-1].float(), out.logits.shape[-1]
    answers_only = F.cross_entropy(logits.reshape(-1, vocab), batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE)
    assert torch.isclose(out.loss, answers_only, atol=1e-4)
    every_token = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, IGNORE)
    whole = F.cross_entropy(logits.reshape(-1, vocab), every_token.reshape(-1), ignore_index=IGNORE)
    assert not torch.isclose(whole, answers_only, atol=1e-3)


def test_the_trainer_s_prefetch_thread_pads_packed_examples_without_a_torch_op(student, demo_folder):
    """The fine-tuning worker unpacks and pads batches on a second thread. A torch op there (torch.load,
    cat, pad) would start a second OpenMP thread team beside the training thread's, which on a machine
    the training thread fills slowed its steps 1.2-1.3x (bench/RESULTS.md)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    family, processor, builder, _ = student
    records = read_ground_truth(demo_folder)[:3]
    examples = [builder.example(Image.open(demo_folder / r["file"]), r["label"]) for r in records]
    packed = [pack_example(e) for e in examples]
    with Ops() as ops:
        batch = collate([unpack_example(p) for p in packed], processor.tokenizer.pad_token_id)
    assert set(ops.seen) <= {"aten.lift_fresh.default"}  # torch.from_numpy wrapping the arrays, no copy
    expected = collate(examples, processor.tokenizer.pad_token_id)
    assert batch.keys() == expected.keys()
    for key in batch:
        assert batch[key].dtype == expected[key].dtype and torch.equal(batch[key], expected[key]), key
    assert batch["input_ids"].shape[0] == len(records)


def test_a_kind_in_the_wrong_convention_is_refused(student):
    family, processor, _, _ = student
    other = next(c for c in ("per_mille", "pixels", "normalized") if c != family.coordinates)
    with pytest.raises(ValueError, match="coordinates"):
        SFTExamples(processor, family, kind_of(TASK, other), "Find cells.")


def test_augmentation_moves_the_points_with_the_pixels():
    """Each flip or quarter turn moves a marked pixel exactly where it moves the label's point."""
    from raydar.sft import _SYMMETRIES, augmented

    kind = kind_of(TASK, "normalized")
    size, (px, py) = 40, (9, 25)
    image = Image.new("RGB", (size, size))
    image.putpixel((px, py), (255, 255, 255))
    label = {"points": [{"label": "explicit", "x": (px + 0.5) / size, "y": (py + 0.5) / size, "score": 1.0}]}
    seen = set()
    for i in range(len(_SYMMETRIES)):
        class Pick:  # an rng that picks symmetry i
            def integers(self, n):
                return i
        out, moved = augmented(image, label, kind, Pick())
        (x, y), = [(c % size, c // size) for c, v in enumerate(out.convert("L").getdata()) if v]
        point = moved["points"][0]
        assert (point["x"], point["y"]) == pytest.approx(((x + 0.5) / size, (y + 0.5) / size))
        seen.add((x, y))
    assert len(seen) == 8  # eight different places: every symmetry really differs
